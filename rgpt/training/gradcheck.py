"""A live gradient check: the hand-written backward against central finite differences, on the weights being
trained and the micro-batch they are training on (monitor.gradcheck_every).

The model is copied to float64 (a separate GPT: the training model, its gradients and random streams are
left alone). Its loss on the micro-batch is evaluated with fixed dropout masks (the generator re-seeded
before every evaluation) and, for the finite differences, with every ReLU's on/off pattern held at the
unperturbed one: the loss is then smooth along any direction, and its gradient at the unperturbed weights is
the true gradient (kinks are crossed by no evaluation, so none is mistaken for a bug; how many units a step
would have moved across theirs is reported). Along a random unit direction u, one per parameter tensor and
one over all of them,

    numeric  = Richardson's (4 D(eps/2) - D(eps)) / 3,  D(e) = (L(theta + e u) - L(theta - e u)) / 2e
    analytic = <hand-written gradient, u>
    relative error = (|numeric - analytic| - slack) / max(|numeric|, |analytic|), at least 0,
    slack = 3 ROUNDING |L| / eps: what float64 rounding of the losses alone can move `numeric` by

Richardson's combination cancels the e^2 term of the central difference, so a step of 1e-2 is accurate to
~1e-8 (measured on a random 2-layer model: worst error 2e-8 at eps=1e-2, against 7e-7 for a plain central
difference at its best step, 1e-4). Directions whose derivative is tiny (1e-8) are limited by rounding
instead, which the slack discounts. A correct backward stays below 1e-6; an error above TOLERANCE is a loud
warning that names the parameter.
"""

import time
from dataclasses import dataclass

import torch

from rgpt.nn.model import GPT

TOLERANCE = 1e-5  # relative error above which the check fails loudly
EPS = 1e-2  # the finite-difference step along a unit direction (see the module docstring)
DROPOUT_SEED = 12345  # the fixed dropout masks' seed
# rounding of a float64 loss, relative: one machine epsilon. The many roundings of a forward pass are larger
# but nearly the same at theta + e u and theta - e u, and cancel in the difference (measured: the differences
# of a random 2-layer model were off by 3e-14 at eps=1e-2, a tenth of this bound's 2.6e-13)
ROUNDING = torch.finfo(torch.float64).eps


@dataclass
class Direction:
    name: str  # the parameter perturbed, or "all" for the direction over every parameter
    analytic: float
    numeric: float
    rel_error: float  # beyond what rounding explains (the module docstring)
    raw_error: float  # |numeric - analytic| / max(|numeric|, |analytic|), rounding included
    kinks: int  # ReLU units that the largest step would have moved across their kink (held fixed)


@dataclass
class Report:
    directions: list[Direction]
    seconds: float

    @property
    def worst(self) -> Direction:
        return max(self.directions, key=lambda d: d.rel_error)

    @property
    def failed(self) -> bool:
        return self.worst.rel_error > TOLERANCE

    def summary(self) -> str:
        w, kinks = self.worst, sum(d.kinks for d in self.directions)
        raw = max(self.directions, key=lambda d: d.raw_error)
        beyond = f"{w.rel_error:.1e} ({w.name})" if w.rel_error > 0 else "0"
        return (
            f"gradient check along {len(self.directions)} directions, float64 finite differences: worst "
            f"relative error {raw.raw_error:.1e} ({raw.name}), beyond rounding {beyond}; "
            f"{kinks} ReLU kinks held fixed; {self.seconds:.1f} s"
        )

    def warning(self) -> str:
        w = self.worst
        bar = "!" * 100
        return (
            f"{bar}\nWARNING: GRADIENT CHECK FAILED for {w.name}: relative error {w.rel_error:.2e} > "
            f"{TOLERANCE:g} (hand-written {w.analytic:.6e}, finite differences {w.numeric:.6e}).\n"
            f"The hand-written backward of {w.name} disagrees with the loss it differentiates.\n{bar}"
        )


def float64_twin(model) -> GPT:
    """A float64 copy of `model` (same config, same weights by name), built without touching the global
    random streams (the training run's must not move)."""
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        twin = GPT(model.config, device=model.device, dtype=torch.float64)
    twin.store.load(model.params)  # float32 (or float64) master weights, widened
    twin.train()  # dropout on, with masks fixed by re-seeding before each evaluation
    return twin


def _hold_relu_patterns(twin) -> list:
    """Make each ReLU MLP of `twin` keep the on/off pattern of its last forward (which must still be cached).
    Returns a counter per MLP of the units whose side a later forward would have changed."""
    crossed = []
    for block in twin.h:
        mlp = block.mlp
        if getattr(mlp, "activation", None) != "relu":
            continue
        on = mlp.cache > 0  # (B, T, F): relu output > 0 where the unit is on
        count = [0]

        def forward(x, mlp=mlp, on=on, count=count):
            h = mlp.c_fc.forward(x)  # (B, T, F)
            count[0] = max(count[0], int(((h > 0) != on).sum()))
            return mlp.c_proj.forward(h * on)

        mlp.forward = forward
        crossed.append(count)
    return crossed


def _loss(twin, idx, targets) -> float:
    twin.generator.manual_seed(DROPOUT_SEED)
    return float(twin.forward(idx, targets))


def _directional(twin, idx, targets, tensors, u, eps) -> float:
    """(L(theta + eps u) - L(theta - eps u)) / 2 eps along u (one tensor per parameter in `tensors`)."""
    saved = [p.clone() for p in tensors]
    values = []
    for sign in (1.0, -1.0):
        for p, d in zip(tensors, u):
            p.add_(d, alpha=sign * eps)
        values.append(_loss(twin, idx, targets))
        for p, s in zip(tensors, saved):
            p.copy_(s)
    return (values[0] - values[1]) / (2 * eps)


def gradient_check(model, idx, targets, *, seed: int = 0, eps: float = EPS) -> Report:
    """Check the hand-written gradient of `model`'s loss on (idx, targets) along random directions."""
    t0 = time.perf_counter()
    twin = float64_twin(model)
    twin.zero_grad()
    twin.generator.manual_seed(DROPOUT_SEED)
    loss = float(twin.forward(idx, targets))
    crossed = _hold_relu_patterns(twin)  # from the caches of this forward, before backward clears them
    twin.backward()
    gen = torch.Generator(device=twin.device).manual_seed(seed)
    names = list(twin.params)
    directions = []
    for group in [[n] for n in names] + [names]:
        tensors = [twin.params[n] for n in group]
        u = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in tensors]
        norm = torch.sqrt(sum((d * d).sum() for d in u))
        u = [d / norm for d in u]  # one unit direction over the group
        analytic = float(sum((twin.grads[n] * d).sum() for n, d in zip(group, u)))
        for c in crossed:
            c[0] = 0
        wide = _directional(twin, idx, targets, tensors, u, eps)
        kinks = sum(c[0] for c in crossed)
        numeric = (4 * _directional(twin, idx, targets, tensors, u, eps / 2) - wide) / 3
        # what rounding alone can move the numeric value by: each loss is good to ~ROUNDING relative, and
        # Richardson's D's divide their differences by eps / 2 and eps: about 3 ROUNDING |L| / eps in all
        slack = 3 * ROUNDING * abs(loss) / eps
        scale = max(abs(numeric), abs(analytic), 1e-300)
        error, raw = max(abs(numeric - analytic) - slack, 0.0) / scale, abs(numeric - analytic) / scale
        name = group[0] if len(group) == 1 else "all"
        directions.append(Direction(name, analytic, numeric, error, raw, kinks))
    return Report(directions, time.perf_counter() - t0)
