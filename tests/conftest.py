import pytest
import torch

from tests.fixtures_ckpt import one_thread, tiny_run  # noqa: F401  (fixtures for every test module)

# tests use tiny tensors: one thread avoids the workers' synchronisation cost (10x faster on 2 busy cores)
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _config_schemas():
    """Every command's settings registered with Hydra, as importing its entry point does: tests that
    compose a config (or check overrides) see what the command sees."""
    import rgpt.chat
    import rgpt.eval
    import rgpt.inspect
    import rgpt.serve
    import rgpt.train  # noqa: F401


@pytest.fixture(autouse=True)
def _seed_and_no_grad():
    """Every test starts from the same seed; library code runs with grad mode off, as in production."""
    torch.manual_seed(1234)
    with torch.no_grad():
        yield


@pytest.fixture
def small_tiles(monkeypatch):
    """FlashAttention in 4-row tiles, so the tests' short sequences span several (and a ragged last one)."""
    from rgpt.nn import flash

    monkeypatch.setattr(flash, "TILE", 4)
