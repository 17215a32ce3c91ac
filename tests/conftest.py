import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_no_grad():
    """Every test starts from the same seed; library code runs with grad mode off, as in production."""
    torch.manual_seed(1234)
    with torch.no_grad():
        yield
