"""The parameter store: the one owner of where every parameter and gradient lives.

All parameters live in one flat buffer (`data`, the master weights) and all gradients in another (`grad`);
each layer's ``params`` / ``grads`` entries are views into them, so the optimizer, gradient clipping and
the distributed all-reduce work on one tensor instead of dozens.

Mixed precision (compute_dtype=torch.bfloat16 with dtype=torch.float32): the master weights, gradients
and Adam state stay float32, while layers that declare ``low_precision`` (Linear: its products run in the
compute dtype) read a bfloat16 working copy of their weights (`working`). The store keeps the two equal:
every write to the master weights goes through `write()`, `load()`, `restore()` or `sync(start, end)`
(Adam's step, for the slice it just updated), and each refreshes the copy. How the copy is laid out
(the low-precision parameters first, as one slice) is the store's business alone.
"""

from contextlib import contextmanager

import torch


class ParamStore:
    """Flat master weights, their gradients, an optional low-precision working copy and the name -> slice map.

    entries: (name, initial value, low_precision) in any order; the store decides the layout.
    """

    def __init__(self, entries, *, device, dtype, compute_dtype=None):
        entries = sorted(entries, key=lambda e: not e[2])  # stable: low-precision first, order otherwise kept
        total = sum(value.numel() for _, value, _ in entries)
        self.data = torch.empty(total, device=device, dtype=dtype)  # the master weights
        self.grad = torch.zeros(total, device=device, dtype=dtype)
        self.slices, self.shapes, self.low = {}, {}, set()
        offset = 0
        for name, value, low in entries:
            if name in self.slices:
                raise ValueError(f"parameter {name} is registered twice")
            self.slices[name], self.shapes[name] = slice(offset, offset + value.numel()), value.shape
            self.data[self.slices[name]].copy_(value.reshape(-1))
            self.low |= {name} if low else set()
            offset += value.numel()
        self.n_low = sum(self.shapes[n].numel() for n in self.low)  # the working copy covers data[:n_low]
        mixed = compute_dtype is not None and compute_dtype != dtype and self.n_low > 0
        self.working = torch.empty(self.n_low, device=device, dtype=compute_dtype) if mixed else None
        self.params = {n: self.view(self.data, n) for n in self.slices}  # name -> master weight view
        self.grads = {n: self.view(self.grad, n) for n in self.slices}
        self.sync()

    # ---- views ----------------------------------------------------------------------------------------
    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """Parameter `name`'s part of a flat buffer laid out like `data` (the gradients, Adam's m and v)."""
        return buf[self.slices[name]].view(self.shapes[name])

    def compute_view(self, name: str) -> torch.Tensor:
        """What the layer computes with: the working copy for low-precision parameters, else the master."""
        if self.working is not None and name in self.low:
            return self.view(self.working, name)
        return self.params[name]

    def numel(self) -> int:
        return self.data.numel()

    # ---- writes to the master weights ----------------------------------------------------------------
    def sync(self, start: int = 0, end: int | None = None) -> None:
        """Refresh the working copy from the master weights data[start:end] (all by default)."""
        if self.working is None:
            return
        end = self.n_low if end is None else min(end, self.n_low)
        if start < end:
            self.working[start:end].copy_(self.data[start:end])

    @contextmanager
    def write(self):
        """`with store.write() as data:` change the flat master weights in place; the copy follows."""
        try:
            yield self.data
        finally:
            self.sync()

    def load(self, tensors: dict) -> None:
        """Copy weights in by name; names and shapes must match exactly (ValueError saying what differs)."""
        if set(tensors) != set(self.slices):
            diff = sorted(set(tensors) ^ set(self.slices))[:3]
            raise ValueError(f"parameter names differ (e.g. {diff})")
        for name, value in tensors.items():
            if value.shape != self.shapes[name]:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)}, the model has {tuple(self.shapes[name])}"
                )
        with self.write():
            for name, value in tensors.items():
                self.params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Each parameter as a contiguous CPU tensor that owns its storage (what safetensors wants)."""
        return {n: p.detach().clone().cpu() for n, p in self.params.items()}

    def snapshot(self) -> torch.Tensor:
        """A copy of all master weights, for `restore` (early stopping's rollback)."""
        return self.data.clone()

    def restore(self, snapshot: torch.Tensor) -> None:
        with self.write() as data:
            data.copy_(snapshot)

    def zero_grad(self) -> None:
        self.grad.zero_()
