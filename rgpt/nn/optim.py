"""Adam (with optional decoupled weight decay) and global-norm gradient clipping, by hand.

Both work on the parameter store's flat weight and gradient buffers (rgpt/params.py), so a step is a handful of whole-buffer ops
instead of a Python loop over dozens of small tensors.
"""

import math

import torch


def clip_coef(grad: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(global L2 norm of grad, the factor that clips it to max_norm), both 0-dim tensors (no host sync).

    Same rule as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6) where that is < 1, else 1;
    a non-finite norm gives coef 1 (the gradient is left alone for the caller to judge).
    Pass coef to Adam.step(grad_scale=...) to clip inside the optimizer's pass over the gradient.
    """
    norm = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32))
    coef = (max_norm / (norm + 1e-6)).clamp_max(1.0)
    return norm, torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))


def clip_grad_norm_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale `grad` in place so its global L2 norm is at most max_norm; return the norm before clipping."""
    norm, coef = clip_coef(grad, max_norm)
    grad.mul_(coef.to(grad.dtype))
    return norm


# elements updated together: the chunk's m, v, g, p (4 MiB in float32) stay in cache across all of Adam's
# ops, while each op still has enough work to hide its launch cost (2 threads, base: 1<<16 19.5 ms,
# 1<<17 16.5 ms, 1<<18 15.0 ms, 1<<20 15.2 ms a step, i.e. ~40 GB/s of the ~55 a plain sum streams)
CHUNK = 1 << 18


class Adam:
    """Adam with bias correction; weight_decay > 0 makes it AdamW (decoupled), applied to `decay` names only.

    store: the model's parameter store (rgpt/params.py); m and v are flat buffers laid out like its weights.
    frozen: names that must not move (their gradients and first moments are zeroed before every step).
    The update runs chunk by chunk: each chunk goes through every operation while it is in cache, so the
    step reads and writes each buffer about once, and needs no parameter-sized scratch buffer; the store
    then refreshes its low-precision working copy of the chunk (if it keeps one).
    """

    def __init__(self, store, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay=(), frozen=()):
        self.store = store
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        # Adam state is kept in float32 at least, even when the weights it updates are lower precision
        state_dtype = torch.promote_types(store.data.dtype, torch.float32)
        self.m = torch.zeros(store.numel(), device=store.data.device, dtype=state_dtype)
        self.v = torch.zeros_like(self.m)
        self.t = 0
        self.decay = [store.params[n] for n in decay]
        self.frozen = list(frozen)

    def step(self, lr: float, grad_scale: torch.Tensor | None = None):
        """One update from the gradients in the store, first multiplied by grad_scale if given (in place,
        chunk by chunk: clipping by clip_coef's factor costs no extra pass over the gradient buffer)."""
        for name in self.frozen:  # gradients still flowed *through* these weights; they just do not move
            self.store.grads[name].zero_()
            self.store.view(self.m, name).zero_()
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        bias1, bias2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        if self.weight_decay and self.decay:
            torch._foreach_mul_(self.decay, 1.0 - lr * self.weight_decay)  # p -= lr * wd * p, before the step
        # p -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / bias1, v_hat = v / bias2; multiplying through by
        # sqrt(bias2): p -= (lr * sqrt(bias2) / bias1) * m / (sqrt(v) + eps * sqrt(bias2))
        step_size, eps = lr * math.sqrt(bias2) / bias1, self.eps * math.sqrt(bias2)
        n, store = self.m.numel(), self.store
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            p, g, m, v = store.data[a:b], store.grad[a:b], self.m[a:b], self.v[a:b]
            if grad_scale is not None:
                g.mul_(grad_scale.to(g.dtype))  # the chunk is in cache now: clipping is nearly free here
            g = g.to(m.dtype)
            m.lerp_(g, 1.0 - b1)  # m = b1 m + (1 - b1) g
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)  # v = b2 v + (1 - b2) g^2
            denom = v.sqrt().add_(eps)
            if p.dtype == m.dtype:
                p.addcdiv_(m, denom, value=-step_size)
            else:
                p.add_((m / denom).mul_(-step_size).to(p.dtype))
            store.sync(a, b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by name (safetensors-friendly): step, and m/v per parameter."""
        out = {"step": torch.tensor(self.t, dtype=torch.int64)}
        for name in self.store.params:
            out[f"m.{name}"] = self.store.view(self.m, name)
            out[f"v.{name}"] = self.store.view(self.v, name)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"step"} | {f"{k}.{n}" for n in self.store.params for k in ("m", "v")}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(
                f"optimizer state does not match the model (missing {missing}, unexpected {extra})"
            )
        self.t = int(state["step"])
        for name in self.store.params:
            for key, buf in (("m", self.m), ("v", self.v)):
                src, dst = state[f"{key}.{name}"], self.store.view(buf, name)
                if src.shape != dst.shape:
                    raise ValueError(
                        f"optimizer state {key}.{name} has shape {tuple(src.shape)}, want {tuple(dst.shape)}"
                    )
                dst.copy_(src)
