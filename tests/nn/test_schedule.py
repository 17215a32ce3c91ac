"""Learning-rate schedules: linear warmup, cosine annealing with warm restarts, the floor, exponential decay."""

import math

import pytest

from rgpt.nn.schedule import learning_rate
from rgpt.training.settings import TrainSettings


def settings(**kw) -> TrainSettings:
    s = TrainSettings(lr=1e-3, warmup_steps=10, cycle_steps=20, cycle_mult=2.0, min_lr_ratio=0.1, **kw)
    s.validate()
    return s


def lrs(s, steps, epoch=0):
    return [learning_rate(s, step, epoch) for step in steps]


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
def test_warmup_is_linear_from_zero_to_the_peak(schedule):
    s = settings(schedule=schedule)
    got = lrs(s, range(10), epoch=7)  # warmup ignores the epoch, whatever the schedule
    want = [1e-3 * (k + 1) / 10 for k in range(10)]
    assert got == pytest.approx(want, rel=1e-12), f"warmup {got} != {want}"
    steps = [b - a for a, b in zip(got, got[1:])]
    assert max(steps) - min(steps) < 1e-15, "warmup increments are not constant"


def test_cosine_cycles_restart_with_growing_periods():
    s = settings()
    # cycles after warmup: [10, 30) of 20 steps, [30, 70) of 40, [70, 150) of 80
    for start, period in ((10, 20), (30, 40), (70, 80)):
        assert learning_rate(s, start, 0) == pytest.approx(1e-3), f"no restart to the peak at step {start}"
        mid = learning_rate(s, start + period // 2, 0)
        assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5), f"cycle at {start}: mid-cycle lr {mid}"
        inside = lrs(s, range(start, start + period))
        assert all(a > b for a, b in zip(inside, inside[1:])), f"cycle at {start} is not decreasing"
        last = inside[-1]
        want = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (period - 1) / period))
        assert last == pytest.approx(want, rel=1e-12), f"cycle at {start}: last lr {last} != {want}"


def test_cosine_with_cycle_mult_one_repeats_the_same_period():
    s = settings(schedule="cosine")
    s.cycle_mult = 1.0
    first = lrs(s, range(10, 30))
    assert lrs(s, range(30, 50)) == first
    assert lrs(s, range(1010, 1030)) == first


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_cosine_never_goes_below_the_floor_and_reaches_it_at_each_cycle_end(ratio):
    s = settings()
    s.min_lr_ratio = ratio
    floor = 1e-3 * ratio
    values = lrs(s, range(10, 2000))
    assert min(values) >= floor - 1e-18, f"lr {min(values)} below the floor {floor}"
    assert max(values) <= 1e-3 + 1e-18
    # the step before each restart sits within one step's worth of the floor
    for end, period in ((29, 20), (69, 40), (149, 80)):
        near = floor + (1e-3 - floor) * 0.5 * (1 - math.cos(math.pi / period))
        assert floor <= learning_rate(s, end, 0) <= near + 1e-18


def test_exponential_is_the_references_rule_per_epoch():
    s = settings(schedule="exponential")
    s.warmup_steps = 0
    for epoch in (0, 1, 5, 10, 37, 200):
        want = 1e-3 * 0.95 ** (epoch / 10)
        for step in (0, 3, 999):  # a function of the epoch only once warmup is over
            got = learning_rate(s, step, epoch)
            assert got == pytest.approx(want, rel=1e-12), f"epoch {epoch} step {step}: {got} != {want}"
    assert learning_rate(s, 0, 10) == pytest.approx(0.95e-3, rel=1e-12)


def test_constant_holds_the_peak_after_warmup():
    s = settings(schedule="constant")
    assert set(lrs(s, range(10, 500), epoch=3)) == {1e-3}


def test_warmup_of_zero_starts_at_the_peak():
    s = settings()
    s.warmup_steps = 0
    assert learning_rate(s, 0, 0) == pytest.approx(1e-3)
    assert learning_rate(s, 20, 0) == pytest.approx(1e-3), "first restart at cycle_steps"
