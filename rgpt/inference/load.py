"""Opening a trained model for inference: a checkpoint, a run directory, or the newest trained one."""

from dataclasses import dataclass
from pathlib import Path

import torch

from rgpt.inference.conversation import note
from rgpt.runtime.checkpoint import CheckpointError, default_for_inference, find, load_model
from rgpt.runtime.device import resolve_precision


def open_model(checkpoint, out_dir, device, precision: str = "fp32", batch_invariant: bool = False):
    """(model, tokenizer, checkpoint path): `checkpoint` (a checkpoint, a run or its checkpoints/ dir) or,
    when None, the best checkpoint of the newest SFT run under out_dir (else pretraining, with a notice).
    precision: fp32, or bf16 (the products in bfloat16, as training's precision=bf16). batch_invariant: see
    GPT.pack_for_inference."""
    if checkpoint is None:
        path = default_for_inference(out_dir, warn=lambda m: note(f"note: {m}"))
        if path is None:
            raise CheckpointError(
                f"no trained checkpoint found under {out_dir}/ (looked in {out_dir}/sft/*/checkpoints and "
                f"{out_dir}/pretrain/*/checkpoints). Train one first: python -m rgpt.train stage=pretrain, "
                "then python -m rgpt.train stage=sft; or pass checkpoint=PATH"
            )
    else:
        path = Path(checkpoint)
        if not (path / "state.json").exists():  # a run directory or its checkpoints/ directory also do
            for ckpt_dir in (path / "checkpoints", path):
                found = [find(ckpt_dir, kind, warn=note) for kind in ("best", "final", "last")]
                if any(found):
                    path = next(f for f in found if f)
                    break
    compute = torch.bfloat16 if precision == "bf16" else None
    model, tok, _ = load_model(path, device=device, compute_dtype=compute)
    model.pack_for_inference(batch_invariant)  # on CPU: weights in oneDNN's layout (the same numbers, faster)
    if batch_invariant and not model.batch_invariant:
        note("note: batch_invariant=true needs every weight packed for oneDNN (CPU); decoding as without it")
    return model, tok, path


@dataclass
class ModelChoice:
    """Which trained model a command opens (chat, eval, serve and inspect alike)."""

    # a checkpoint, run or checkpoints/ directory; None: best of the newest SFT run under out_dir (else
    # pretraining, with a notice)
    checkpoint: str | None = None
    out_dir: str = "outputs"  # where training put its runs (the same default as training's out_dir)
    # fp32 | bf16 | auto, as training's key: bf16 runs the matrix products on bfloat16 copies of the weights
    # (half the bytes a token reads: faster with many replies at once where bf16 is native; one reply alone
    # is faster in fp32 on CPU, see the README's serving table); auto: bf16 where the hardware has it natively
    precision: str = "fp32"
    # true: a reply decoded among others gets its lone logits bit for bit in fp32 too (bf16 already does):
    # every product reads oneDNN-packed weights and attention spans the whole window. Costs one reply alone
    # up to a third of its fp32 speed on CPU (README: serving); only CPU with oneDNN packs
    batch_invariant: bool = False

    def open(self, device):
        """(model, tokenizer, checkpoint path): see open_model; precision is checked here (ConfigError)."""
        precision = resolve_precision(self.precision, torch.device(device), log=note)
        return open_model(self.checkpoint, self.out_dir, device, precision, self.batch_invariant)
