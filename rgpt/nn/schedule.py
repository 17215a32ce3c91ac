"""Learning rate per optimizer step: a pure function of (step, epoch), so a resumed run replays it exactly."""

import math


def learning_rate(s, step: int, epoch: int) -> float:
    """lr for optimizer step `step` (0-based) in epoch `epoch`, under TrainSettings `s`.

    cosine:      linear warmup over warmup_steps, then cosine annealing from lr to min_lr_ratio * lr with
                 warm restarts (SGDR): cycles of cycle_steps, each cycle_mult times longer than the last.
    exponential: warmup, then lr * decay^(epoch / 10) (the reference's rule).
    constant:    warmup, then lr.
    """
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "exponential":
        return s.lr * s.decay ** (epoch / 10)
    t, period = step - s.warmup_steps, float(s.cycle_steps)
    while t >= period:  # find the position inside the current cycle
        t -= period
        period *= s.cycle_mult
    floor = s.lr * s.min_lr_ratio
    return floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t / period))
