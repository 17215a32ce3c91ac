"""The GPT: token embedding (+ sinusoidal positions), Pre-LN blocks, final norm, output projection.

Every parameter lives in the model's parameter store (`self.store`, rgpt/params.py): flat master weights
and gradients, and under mixed precision the Linear layers' bfloat16 working copy. Write weights through
the store, never through `self.params`. Names follow nanoGPT (``wte.weight``, ``h.0.attn.c_attn.weight``).
"""

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from rgpt.nn.attention import CausalSelfAttention, KVCache
from rgpt.nn.layers import MLP, NORMS, Dropout, Embedding, Linear, TiedHead, sinusoidal_positions
from rgpt.nn.loss import IGNORE_INDEX, CrossEntropy
from rgpt.nn.params import ParamStore
from rgpt.settings import INTERNAL

# the choices of each architecture option; the first is the default (the reference's architecture)
CHOICES = {
    "activation": ("relu", "gelu", "swiglu"),  # feed-forward nonlinearity (rgpt.nn.layers.MLP)
    "norm": ("layernorm", "rmsnorm"),  # the blocks' and the final normalisation (rgpt.nn.layers.NORMS)
    "pos": ("sinusoidal", "rope"),  # fixed sinusoids added to the input, or q/k rotations (rgpt.nn.attention)
    "attn": ("standard", "flash"),  # the (T, T) softmax, or FlashAttention's tiles (rgpt.nn.flash)
}


@dataclass
class GPTConfig:
    """The architecture: the one definition of every model setting, its default and its check.

    rgpt/conf/model/*.yaml override these fields (and nothing else: an unknown key is an error); checkpoints
    record them, and loading one builds the architecture it records (a key it predates takes the default).
    """

    # set from the tokenizer at start-up, never in a config
    vocab_size: int = field(default=0, metadata=INTERNAL)
    n_embd: int = 512  # width of the residual stream (the reference's documented model)
    n_head: int = 8  # attention heads; n_embd / n_head is the head size
    # key/value heads (grouped-query attention), each shared by n_head / n_kv_head query heads; 0 means
    # n_head (ordinary multi-head attention, the reference's); the KV cache shrinks by n_head / n_kv_head
    n_kv_head: int = 0
    n_layer: int = 4  # transformer blocks
    n_hidden: int = 1024  # feed-forward width (swiglu uses 2/3 of it, keeping the parameter count)
    block_size: int = 256  # context window in tokens
    dropout: float = 0.1  # inverted dropout on both residual branches; a run's choice, not a checkpoint's
    activation: str = "relu"  # relu as in the reference; gelu or swiglu
    norm: str = "layernorm"  # layernorm as in the reference; rmsnorm
    pos: str = "sinusoidal"  # sinusoidal as in the reference; rope
    tie_embeddings: bool = False  # lm_head shares wte's weight (rgpt.nn.layers.TiedHead)
    attn: str = "standard"  # standard; flash computes the same in tiles, in O(T) memory
    # biases in every Linear (attention, feed-forward, lm_head) as in the reference; Llama has none
    bias: bool = True

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: n_kv_head, or n_head where it is 0."""
        return self.n_kv_head or self.n_head

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From a checkpoint's record: keys it predates take their defaults; an unknown key is a ValueError."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model setting {unknown[0]} (a newer rgpt's checkpoint?)")
        return cls(**d).validate()

    def validate(self, allow_no_vocab=False) -> "GPTConfig":
        """Raise ValueError('model.<key>=<value>: why') for the first bad field; return self."""

        def check(ok, key, why):
            if not ok:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: {why}")

        check(self.vocab_size >= (0 if allow_no_vocab else 1), "vocab_size", "must be a positive integer")
        for key in ("n_embd", "n_head", "n_layer", "n_hidden", "block_size"):
            check(getattr(self, key) >= 1, key, "must be a positive integer")
        check(self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        check(
            self.n_kv_head >= 0 and self.n_head % self.kv_heads == 0,
            "n_kv_head",
            f"must divide n_head={self.n_head} (0: the same as n_head)",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        for key, choices in CHOICES.items():
            check(getattr(self, key) in choices, key, f"must be one of {', '.join(choices)}")
        check(
            self.pos != "rope" or (self.n_embd // self.n_head) % 2 == 0,
            "pos",
            f"rope rotates pairs of channels: the head size n_embd/n_head={self.n_embd // self.n_head} must be even",
        )
        return self


class Block:
    """Pre-LN transformer block: x = x + drop(attn(ln_1(x))); x = x + drop(mlp(ln_2(x)))."""

    def __init__(self, cfg: GPTConfig, generator, *, device, dtype):
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections scaled by depth
        kw = dict(device=device, dtype=dtype)
        Norm = NORMS[cfg.norm]
        self.ln_1 = Norm(cfg.n_embd, **kw)
        self.attn = CausalSelfAttention(
            cfg.n_embd,
            cfg.n_head,
            cfg.block_size,
            std=std,
            proj_std=proj_std,
            rope=cfg.pos == "rope",
            flash=cfg.attn == "flash",
            n_kv_head=cfg.kv_heads,
            bias=cfg.bias,
            **kw,
        )
        self.drop_1 = Dropout(cfg.dropout, generator)
        self.ln_2 = Norm(cfg.n_embd, **kw)
        self.mlp = MLP(
            cfg.n_embd,
            cfg.n_hidden,
            activation=cfg.activation,
            std=std,
            proj_std=proj_std,
            bias=cfg.bias,
            **kw,
        )
        self.drop_2 = Dropout(cfg.dropout, generator)

    def sublayers(self):
        return {"ln_1": self.ln_1, "attn": self.attn, "ln_2": self.ln_2, "mlp": self.mlp}

    def forward(self, x):  # x: (B, T, C)
        x = x + self.drop_1.forward(self.attn.forward(self.ln_1.forward(x)))
        return x + self.drop_2.forward(self.mlp.forward(self.ln_2.forward(x)))

    def backward(self, dy):  # the forward read from the bottom up; the residuals pass dy through unchanged
        dx = dy + self.ln_2.backward(self.mlp.backward(self.drop_2.backward(dy)))
        return dx + self.ln_1.backward(self.attn.backward(self.drop_1.backward(dx)))

    def forward_cached(self, x, cache):  # inference: no dropout
        a = self.ln_1.forward(x)
        x = x + self.attn.forward_cached(a, cache)
        return x + self.mlp.forward(self.ln_2.forward(x))

    def forward_rows(self, x, cache, pos, later):  # many replies' next tokens, each at its own position
        x = x + self.attn.forward_rows(self.ln_1.forward(x), cache, pos, later)
        return x + self.mlp.forward(self.ln_2.forward(x))


def _walk(prefix, layer):
    """Yield (dotted name, layer) for a layer and all its sublayers, depth first."""
    yield prefix, layer
    for name, sub in getattr(layer, "sublayers", dict)().items():
        yield from _walk(f"{prefix}.{name}", sub)


class GPT:
    """A GPT whose every gradient is written by hand. Initialised from torch's global RNG."""

    def __init__(self, cfg: GPTConfig, device="cpu", dtype=torch.float32, compute_dtype=None):
        self.config = cfg.validate()
        self.device, self.dtype = torch.device(device), dtype
        self.compute_dtype = compute_dtype or dtype  # dtype of the matrix products
        kw = dict(device=self.device, dtype=dtype)
        # dropout masks come from a private generator seeded from the global RNG: reproducible from the
        # seed, and its state can be checkpointed without touching anyone else's random stream
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        # tokens get the same per-channel energy as the sinusoids (RMS sqrt(1/2)), so neither drowns the other
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, std=math.sqrt(0.5), **kw)
        # (T_max, C) fixed, not learned; rope models rotate q and k inside attention instead
        self.wpe = sinusoidal_positions(cfg.block_size, cfg.n_embd, **kw) if cfg.pos == "sinusoidal" else None
        self.h = [Block(cfg, self.generator, **kw) for _ in range(cfg.n_layer)]
        self.ln_f = NORMS[cfg.norm](cfg.n_embd, **kw)
        if cfg.tie_embeddings:
            self.lm_head = TiedHead(cfg.n_embd, cfg.vocab_size, bias=cfg.bias, **kw)
        else:
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, std=0.02, bias=cfg.bias, **kw)
        self.criterion = CrossEntropy()
        self._bind_params()
        self.training = True
        self.batch_invariant = False  # see pack_for_inference

    # ---- parameters -------------------------------------------------------------------------------
    def _named_layers(self):
        yield from _walk("wte", self.wte)
        for i, block in enumerate(self.h):
            yield from _walk(f"h.{i}", block)
        yield from _walk("ln_f", self.ln_f)
        yield from _walk("lm_head", self.lm_head)

    def _bind_params(self):
        """Hand every parameter to the store and point each layer at its views there (see rgpt.nn.params).

        A layer's `tied` keys (TiedHead's weight) are not parameters of their own but the named one's:
        the layer gets that parameter's views, so both uses read one weight and add into one gradient.
        """
        layers = list(self._named_layers())
        owned = [(f"{p}.{k}", layer, k) for p, layer in layers for k in getattr(layer, "params", {})]
        shared = [(name, layer, k) for _, layer in layers for k, name in getattr(layer, "tied", {}).items()]
        low = {name for name, layer, _ in owned + shared if layer.low_precision}
        entries = [(name, layer.params[k], name in low) for name, layer, k in owned]
        self.store = ParamStore(
            entries, device=self.device, dtype=self.dtype, compute_dtype=self.compute_dtype
        )
        for name, layer, k in owned + shared:
            layer.params[k] = (
                self.store.compute_view(name) if layer.low_precision else self.store.params[name]
            )
            layer.grads[k] = self.store.grads[name]
        self.params, self.grads = self.store.params, self.store.grads  # name -> master weight / gradient

    def num_params(self, non_embedding=False):
        n = self.store.numel()
        return n - self.params["wte.weight"].numel() if non_embedding else n

    def zero_grad(self):
        self.store.zero_grad()

    def train(self):
        self._set_mode(True)

    def eval(self):
        self._set_mode(False)

    def _set_mode(self, training):
        self.training = training
        for block in self.h:
            block.drop_1.training = block.drop_2.training = training

    # ---- training: forward and backward --------------------------------------------------------
    def _embed(self, idx, start):
        """Token embeddings of idx (B, T), plus the sinusoids of positions start .. start + T - 1."""
        x = self.wte.forward(idx)  # (B, T, C)
        return x if self.wpe is None else x + self.wpe[start : start + idx.shape[1]]

    def forward(self, idx, targets=None):
        """idx (B, T) long -> logits (B, T, V); with targets (B, T), the mean NLL over targets != -100."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self._embed(idx, 0)  # (B, T, C)
        for block in self.h:
            x = block.forward(x)
        x = self.ln_f.forward(x)  # (B, T, C)
        self._kept, self._bt = None, (B, T)
        if targets is None:
            return self.lm_head.forward(x)  # (B, T, V)
        if self.device.type == "cpu":  # (on CUDA, finding the rows would cost a host sync per step)
            # only positions with a target reach the (., V) projection and the loss: padding and masked
            # user turns are skipped in the largest matmul; their gradient would be exactly zero anyway
            keep = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
            if keep.numel() < targets.numel():
                self._kept = (keep, x.shape)
                x, targets = (
                    x.reshape(-1, x.shape[-1]).index_select(0, keep),
                    targets.reshape(-1)[keep],
                )  # (N, C)
        return self.criterion.forward(self.lm_head.forward(x), targets)

    def residual_streams(self, idx):
        """Inference: the residual stream (B, T, C) after the embedding and after each block, n_layer + 1 of
        them, exactly as forward() computes it (its last one through ln_f and lm_head gives the logits)."""
        x = self._embed(idx, 0)  # (B, T, C)
        streams = [x]
        for block in self.h:
            x = block.forward(x)
            streams.append(x)
        return streams

    def _row_sequence(self):
        """(N,) the sequence (batch row) of every row that reached the loss in the last forward."""
        return self._rows() // self._bt[1]

    def sequence_logprobs(self):
        """(B,) each sequence's summed log-probability of its targets in the last forward(idx, targets)."""
        logp = self.criterion.row_logprobs()  # (N,) 0 on rows without a target
        return logp.new_zeros(self._bt[0]).index_add_(0, self._row_sequence(), logp)

    def _rows(self):
        """(N,) the flat (B*T) position of every row that reached the loss in the last forward."""
        B, T = self._bt
        return self._kept[0] if self._kept is not None else torch.arange(B * T, device=self.device)

    def token_logprobs(self):
        """(B, T) each position's log-probability of its target in the last forward(idx, targets), 0 where
        there is no target (the per-token form of sequence_logprobs: GRPO's ratios and KL are per token)."""
        B, T = self._bt
        logp = self.criterion.row_logprobs()  # (N,)
        return logp.new_zeros(B * T).index_copy_(0, self._rows(), logp).view(B, T)

    def backward(self, scale=1.0, dlogp=None, dtoken_logp=None):
        """Add d(loss * scale)/d(param) into self.grads for the loss of the last forward(idx, targets).

        dlogp (B,): instead, the gradient of some loss with respect to each sequence's summed log-probability
        (sequence_logprobs); the cross-entropy backward is then scaled per row by -dlogp (DPO).
        dtoken_logp (B, T): the same per token, with respect to token_logprobs (GRPO); positions without a
        target are ignored."""
        row_coef = None
        if dlogp is not None:
            row_coef = -dlogp[self._row_sequence()]  # (N,)
        elif dtoken_logp is not None:
            row_coef = -dtoken_logp.reshape(-1)[self._rows()]  # (N,) d logp_row / d logits = onehot - softmax
        dx = self.lm_head.backward(self.criterion.backward(scale, row_coef))  # (B, T, C), or (N, C) kept rows
        if self._kept is not None:  # rows that were skipped get a zero gradient
            keep, shape = self._kept
            dx = dx.new_zeros(shape[0] * shape[1], shape[2]).index_copy_(0, keep, dx).view(shape)
        dx = self.ln_f.backward(dx)  # (B, T, C)
        for block in reversed(self.h):
            dx = block.backward(dx)
        self.wte.backward(dx)  # the positional table (if any) is fixed: nothing to accumulate there

    # ---- inference with a KV cache ----------------------------------------------------------------
    def pack_for_inference(self, batch_invariant: bool = False) -> int:
        """Inference only, once the weights are final: the bfloat16 products on CPU read weights packed for
        oneDNN (Linear.pack; faster, the same numbers). batch_invariant: every float32 product reads them too,
        and replies decoded together attend over the whole slab (rgpt.inference.batch), so a reply's logits
        in company are its lone logits bit for bit (bfloat16's already are). Returns how many layers packed
        (0 elsewhere)."""
        layers = [layer for _, layer in self._named_layers() if type(layer) in (Linear, TiedHead)]
        packed = sum(layer.pack(every_row=batch_invariant) for layer in layers)
        self.batch_invariant = batch_invariant and packed == len(layers)  # unpacked products are not
        return packed

    def new_kv_caches(self, batch, max_len=None):
        cfg = self.config
        max_len = max_len or cfg.block_size
        return [
            KVCache(
                batch,
                cfg.kv_heads,
                max_len,
                cfg.n_embd // cfg.n_head,
                device=self.device,
                # float32 at least: batch-1 attention products are tiny, and bfloat16 ones cost more
                # in kernel overhead than they save (base, CPU: 350 -> 600 tokens/s); also more exact
                dtype=torch.promote_types(self.compute_dtype, torch.float32),
            )
            for _ in range(cfg.n_layer)
        ]

    def forward_cached(self, idx, caches, last_only=False):
        """Logits (B, T_new, V) for tokens idx that follow what the caches hold; the caches grow by T_new.

        last_only: only the last position's logits, (B, 1, V) -- all that decoding needs after a prefill.
        """
        start, T = caches[0].length, idx.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"KV cache overflow: {start} + {T} > block_size {self.config.block_size}")
        x = self._embed(idx, start)  # (B, T, C)
        for block, cache in zip(self.h, caches):
            x = block.forward_cached(x, cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head.forward(
            self.ln_f.forward(x)
        )  # (B, T_new or 1, V); layer caches are left as they are

    def forward_rows(self, idx, caches, pos, n_keys=None):
        """Logits (B, V) of one new token for each of B replies decoded together (rgpt.inference.batch).

        idx (B,) long: each reply's newest token; pos (B,) long: its position, which is also how many
        earlier tokens rows [0, B) of the caches (new_kv_caches(slots), slots >= B) hold for it. Each
        reply's key and value are written at its own position; the caller advances its lengths.
        n_keys: how many cache positions attention spans, each row masked past its own (default: the
        fewest, max(pos) + 1). A fixed span (the caches' length) gives a row's products the same shapes
        whatever its company: with packed weights (Linear.pack) its logits are then its lone ones bit for bit.
        """
        last, room = int(pos.max()), caches[0].k.shape[2]
        n_keys = last + 1 if n_keys is None else n_keys
        if last >= room or not last < n_keys <= room:
            raise ValueError(
                f"KV cache overflow: position {last} with attention over {n_keys} of the caches' {room} positions"
            )
        if idx.shape[0] == 1 and n_keys == last + 1:  # a lone reply at its own length: nothing to mask
            pos, later = last, None  # (the attention takes an int position for it: see its forward_rows)
        else:
            later = torch.arange(n_keys, device=pos.device)[None, :] > pos[:, None]  # (B, L): not written yet
        x = self.wte.forward(idx[:, None])  # (B, 1, C)
        if self.wpe is not None:
            x = x + (self.wpe[pos : pos + 1] if later is None else self.wpe[pos])[:, None]
        for block, cache in zip(self.h, caches):
            x = block.forward_rows(x, cache, pos, later)
        return self.lm_head.forward(self.ln_f.forward(x))[:, 0]  # (B, V)
