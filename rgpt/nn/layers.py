"""The building blocks of the transformer, each a forward/backward pair written by hand.

Dimension legend used in every shape comment of the package:
    B batch, T time (sequence), C channels (n_embd), V vocabulary, H heads, D head size (C // H),
    F feed-forward hidden size (n_hidden), N number of target tokens in a batch.

Conventions (after llm.c):
- ``forward`` keeps in ``self.cache`` only what ``backward`` needs, and ``backward`` sets it back to None,
  so a second backward without a forward fails loudly.
- ``backward(dout)`` returns the gradient w.r.t. the input and ADDS into ``self.grads`` (never assigns),
  so gradients of several micro-batches accumulate until the caller zeroes them.
- ``self.params`` / ``self.grads`` are dicts with the same keys; the model rebinds their values to views
  of its parameter store (rgpt/params.py), so layers always look parameters up through the dicts.
- Mixed precision: a Linear's params may be a bfloat16 working copy while its grads stay float32 (the
  master copy). Linear casts its input to its weight's dtype, so the residual stream, LayerNorm,
  softmax and the loss stay float32 while the matrix products run in bfloat16.
No autograd anywhere: every gradient below is derived by hand and checked against torch.autograd in tests.
"""

import math

import torch


class Layer:
    """Base class: named parameters and their gradient accumulators."""

    low_precision = False  # computes from the store's low-precision working copy under mixed precision
    frozen = (
        False  # True: backward still returns the input gradient but computes no parameter gradient (LoRA)
    )

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.cache = None

    def add_param(self, name: str, value: torch.Tensor) -> None:
        self.params[name] = value
        self.grads[name] = torch.zeros_like(value)


def add_matmul_(acc, a, b, alpha=1.0):
    """acc += alpha * (a @ b), with acc possibly float32 while a, b are a lower precision (mixed precision)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    # the product is accumulated in float32 inside the kernel and rounded once; it is then added in blocks
    # of rows, because widening it whole would allocate a float32 temporary as large as acc (25 MB for the
    # lm_head, at the start of the backward pass when memory use peaks)
    prod = torch.mm(a, b)
    rows = max(1, (1 << 18) // max(1, acc.shape[1]))
    for i in range(0, acc.shape[0], rows):
        acc[i : i + rows].add_(prod[i : i + rows], alpha=alpha)


FEW_ROWS = 4  # products with at most this many rows (decoding: 1 row per sequence or beam) take _few_rows


def _few_rows(x2, w, b):
    """x2 @ w.T + b for a handful of rows, as one batched product over k blocks of w's rows.

    The same dot products, from a different kernel: on CPU, torch's (1, in) @ (in, out) float32 product
    streams w at a fraction of the memory bandwidth, while the batch of k row blocks streams it 2-3x
    faster (batch-1 decoding of model=base: 250 -> ~600 tokens/s, see scripts/bench.py). bfloat16 products
    are already fast. Returns None where it does not apply (then the caller takes the plain product).
    """
    out, M = w.shape[0], x2.shape[0]
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64) or M > FEW_ROWS:
        return None
    k = next((k for k in (2, 3, 5, 7) if out % k == 0), None)  # w's rows split into k equal blocks
    if k is None:
        return None
    wk = w.view(k, out // k, w.shape[1])  # (k, out/k, in)
    xk = x2.t().expand(k, -1, -1)  # (k, in, M), no copy
    yk = torch.bmm(wk, xk) if b is None else torch.baddbmm(b.view(k, out // k, 1), wk, xk)  # (k, out/k, M)
    return yk.view(out, M).t().contiguous()  # (M, out)


def _packed(x2, packed, b):
    """x2 @ W.T + b with W packed by Linear.pack. oneDNN gives a row the same float32 result in any company
    of 2 or more rows, but a lone row of a wide input (1,536 and more on an AVX-512 CPU) takes another
    kernel: batch-invariant callers pass a lone row twice."""
    return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed, b, "none", [], "")


class Linear(Layer):
    """y = x @ W.T + b, with W of shape (out, in) as in torch.nn.Linear (so nanoGPT weights load by name)."""

    low_precision = True  # its products run in the compute dtype (bfloat16 under mixed precision)
    packed = None  # inference only: W in oneDNN's own layout (see pack); the products then read it
    packed_rows = FEW_ROWS + 1  # float32 products of at least this many rows read the packed W (see pack)

    def __init__(self, n_in, n_out, *, std, device, dtype, bias=True):
        super().__init__()
        self.add_param("weight", torch.randn(n_out, n_in, device=device, dtype=dtype) * std)
        if bias:
            self.add_param("bias", torch.zeros(n_out, device=device, dtype=dtype))

    def pack(self, every_row: bool = False) -> bool:
        """Inference on CPU: keep a copy of W reordered into oneDNN's blocked layout, which the products then
        read. torch's plain bfloat16 product reorders W on every call, so one decoded row read it at ~10 GB/s
        (model=base decoded slower in bf16 than in fp32); packed, bf16 gives the same numbers bit for bit,
        several times faster, whatever the number of rows (batch-invariant, tested). float32 products of more
        than FEW_ROWS rows (replies decoded together) read it too: 1.3-2x faster than addmm; fewer rows keep
        _few_rows, faster there (one decoded row: up to a third on this project's CPU), unless every_row: then every
        float32 product reads it, and a row's product no longer depends on how many rows share it (tested).
        Training never packs: W changes every step. Returns whether it packed (not on other devices or
        dtypes, or without oneDNN)."""
        w = self.params["weight"]
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return False
        if not torch.backends.mkldnn.is_available():
            return False
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)  # 16: a batch-size hint only
        self.packed_rows = 1 if every_row else FEW_ROWS + 1
        return True

    def forward(self, x):  # x: (..., in)
        w, b = self.params["weight"], self.params.get("bias")
        x2 = x.reshape(-1, x.shape[-1]).to(w.dtype)  # (M, in), M = product of the leading dims
        if self.packed is not None and (w.dtype == torch.bfloat16 or x2.shape[0] >= self.packed_rows):
            one = self.packed_rows == 1 and x2.shape[0] == 1  # a lone row, batch-invariant: see _packed
            y = _packed(x2.expand(2, -1) if one else x2, self.packed, b)[: x2.shape[0]]
            return y.view(*x.shape[:-1], w.shape[0])
        y = _few_rows(x2, w, b)  # None unless a handful of float32 rows on CPU (decoding)
        if y is None:
            y = torch.addmm(b, x2, w.t()) if b is not None else x2 @ w.t()  # (M, out)
        self.cache = x2
        return y.view(*x.shape[:-1], w.shape[0])

    def backward(self, dy):  # dy: (..., out)
        x2 = self.cache
        w = self.params["weight"]
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, out)
        if self.frozen:  # a frozen W (LoRA's W0): dx only, not even the product dW would need
            self.cache = None
            return (dy2.to(w.dtype) @ w).view(*dy.shape[:-1], w.shape[1])
        if "bias" in self.grads:  # db += sum of dy over rows, in dy's own dtype (float32 in the blocks)
            self.grads["bias"] += dy2.sum(0)
        dy2 = dy2.to(w.dtype)
        add_matmul_(self.grads["weight"], dy2.t(), x2)  # dW += dy^T x    (out, in)
        dx = dy2 @ w  # (M, in)
        self.cache = None
        return dx.view(*dy.shape[:-1], w.shape[1])


class TiedHead(Linear):
    """The output projection sharing the token embedding (V, C): logits = (x @ W_wte.T) / sqrt(C) + b.

    The weight is not its own: the model binds params["weight"] / grads["weight"] to wte's, so the
    gradients of both uses add up in one place. The fixed 1/sqrt(C) keeps the logits' scale that of an
    untied head although the embedding rows have RMS sqrt(1/2) (see GPT); it is folded into the input.
    """

    tied = {"weight": "wte.weight"}  # parameter key -> the name of the parameter it shares

    def __init__(self, n_embd, n_vocab, *, device, dtype, bias=True):
        Layer.__init__(self)
        self.scale = 1.0 / math.sqrt(n_embd)
        if bias:
            self.add_param("bias", torch.zeros(n_vocab, device=device, dtype=dtype))

    def forward(self, x):  # x: (..., C)
        return super().forward(x * self.scale)

    def backward(self, dy):  # y = (x * s) @ W.T + b: dW += dy^T (x * s), dx = s * (dy @ W)
        return super().backward(dy) * self.scale


class Embedding(Layer):
    """Token embedding: out[b, t] = W[idx[b, t]]."""

    def __init__(self, n_vocab, n_embd, *, std, device, dtype):
        super().__init__()
        self.add_param("weight", torch.randn(n_vocab, n_embd, device=device, dtype=dtype) * std)

    def forward(self, idx):  # idx: (B, T) long
        self.cache = idx
        return self.params["weight"][idx]  # (B, T, C)

    def backward(self, dout):  # dout: (B, T, C)
        idx = self.cache
        self.cache = None
        if self.frozen:
            return
        # a scatter-add: a token id that occurs several times receives the sum of its rows' gradients
        self.grads["weight"].index_add_(0, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))


def sinusoidal_positions(n_pos, n_embd, *, device, dtype):
    """PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(pos / 10000^(2i/C)); a fixed (n_pos, C) table."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)  # (n_pos, 1)
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float64)  # (C/2,) the even channel indices 2i
    angle = pos / torch.pow(10000.0, two_i / n_embd)  # (n_pos, C/2)
    pe = torch.zeros(n_pos, n_embd, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : n_embd // 2])  # an odd C has one more sin than cos column
    return pe.to(device=device, dtype=dtype)


class LayerNorm(Layer):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last dim."""

    def __init__(self, n_embd, *, device, dtype, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.add_param("weight", torch.ones(n_embd, device=device, dtype=dtype))
        self.add_param("bias", torch.zeros(n_embd, device=device, dtype=dtype))

    def forward(self, x):  # x: (B, T, C)
        # two passes, the mean and then the mean square about it: as exact as Welford's update, and
        # several times faster on CPU than torch.var_mean (0.14 vs 1.4 ms at 4x256x512, 2 threads)
        xc = x - x.mean(-1, keepdim=True)  # (B, T, C) centred
        rstd = (xc * xc).mean(-1, keepdim=True).add_(self.eps).rsqrt_()  # (B, T, 1) = 1/sqrt(var + eps)
        xhat = xc.mul_(rstd)
        self.cache = (xhat, rstd)  # xhat is reused twice below; recomputing it costs more than it saves
        return torch.addcmul(self.params["bias"], xhat, self.params["weight"])

    def backward(self, dy):
        xhat, rstd = self.cache
        if not self.frozen:
            self.grads["weight"] += (dy * xhat).flatten(0, -2).sum(0)
            self.grads["bias"] += dy.flatten(0, -2).sum(0)
        g = dy * self.params["weight"]  # dL/dxhat
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)): the three paths through x, mean and var
        dx = g - g.mean(-1, keepdim=True)
        dx.addcmul_(xhat, (g * xhat).mean(-1, keepdim=True), value=-1.0).mul_(rstd)
        self.cache = None
        return dx


class RMSNorm(Layer):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim: LayerNorm without the centring and the bias."""

    def __init__(self, n_embd, *, device, dtype, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.add_param("weight", torch.ones(n_embd, device=device, dtype=dtype))

    def forward(self, x):  # x: (B, T, C)
        rstd = (x * x).mean(-1, keepdim=True).add_(self.eps).rsqrt_()  # (B, T, 1) = 1/rms(x)
        xhat = x * rstd
        self.cache = (xhat, rstd)
        return xhat * self.params["weight"]

    def backward(self, dy):
        xhat, rstd = self.cache
        if not self.frozen:
            self.grads["weight"] += (dy * xhat).flatten(0, -2).sum(0)
        g = dy * self.params["weight"]  # dL/dxhat
        # xhat = x * rstd with rstd = mean(x^2)^(-1/2): dx = rstd * (g - xhat * mean(g * xhat))
        dx = g.addcmul_(xhat, (g * xhat).mean(-1, keepdim=True), value=-1.0).mul_(rstd)
        self.cache = None
        return dx


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


class Dropout(Layer):
    """Inverted dropout: y = x * mask / (1 - p) in training, identity in eval; masks come from `generator`."""

    def __init__(self, p, generator):
        super().__init__()
        self.p = p
        self.generator = generator
        self.training = True

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.cache = None
            return x
        # keep where u < 1 - p with u ~ U[0, 1): a Bernoulli(1 - p) draw, twice as fast as bernoulli_ on CPU.
        # The mask is at least float32 (1/(1-p) is not exact in bfloat16).
        u = torch.rand(
            x.shape,
            dtype=torch.promote_types(x.dtype, torch.float32),
            device=x.device,
            generator=self.generator,
        )
        mask = u.lt_(1.0 - self.p).div_(1.0 - self.p)  # 0 or 1/(1-p): the scale is folded into the mask
        self.cache = mask
        return x * mask

    def backward(self, dy):
        mask, self.cache = self.cache, None
        return dy if mask is None else dy * mask


def swiglu_hidden(n_hidden: int) -> int:
    """SwiGLU's width: two input projections instead of one, so 2/3 of n_hidden keeps the parameter count."""
    return max(1, round(2 * n_hidden / 3))


class MLP(Layer):
    """Position-wise feed-forward: c_fc -> activation -> c_proj.

    relu (the reference's) or gelu: a = act(h). swiglu: c_fc yields [g | u] and a = silu(g) * u, with
    silu(g) = g * sigmoid(g), at the width swiglu_hidden(n_hidden).
    """

    def __init__(self, n_embd, n_hidden, *, activation, std, proj_std, device, dtype, bias=True):
        super().__init__()
        self.activation = activation
        width = swiglu_hidden(n_hidden) if activation == "swiglu" else n_hidden
        n_fc = 2 * width if activation == "swiglu" else width
        self.c_fc = Linear(n_embd, n_fc, std=std, device=device, dtype=dtype, bias=bias)
        self.c_proj = Linear(width, n_embd, std=proj_std, device=device, dtype=dtype, bias=bias)
        self._act, self._dact = ACTIVATIONS[activation]

    def sublayers(self):
        return {"c_fc": self.c_fc, "c_proj": self.c_proj}

    def forward(self, x):  # x: (B, T, C)
        h = self.c_fc.forward(x)  # (B, T, F), or (B, T, 2F) for swiglu
        a, self.cache = self._act(h)  # (B, T, F), and what the derivative needs
        return self.c_proj.forward(a)

    def backward(self, dy):
        da = self.c_proj.backward(dy)  # (B, T, F)
        dh = self._dact(da, self.cache)
        self.cache = None
        return self.c_fc.backward(dh)


# each activation: forward h -> (a, saved) and backward (da, saved) -> dh
def _relu(h):
    a = torch.relu(h)
    return a, a  # relu'(h) = (a > 0): the output alone suffices


def _drelu(da, a):
    return da * (a > 0)


def _gelu(h):
    return h * _phi_cdf(h), h  # exact GELU: h * Phi(h)


def _dgelu(da, h):
    # d/dh [h * Phi(h)] = Phi(h) + h * phi(h), phi the standard normal density
    return da * (_phi_cdf(h) + h * torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi)))


def _swiglu(h):
    g, u = h.chunk(2, dim=-1)  # (B, T, F) each: the gate and the value
    sg = torch.sigmoid(g)
    return g * sg * u, (g, u, sg)


def _dswiglu(da, saved):
    g, u, sg = saved
    # a = silu(g) * u: du = da * silu(g); dg = da * u * silu'(g), silu'(g) = sg * (1 + g * (1 - sg))
    du = da * g * sg
    dg = da * u * sg * (1.0 + g * (1.0 - sg))
    return torch.cat((dg, du), dim=-1)  # (B, T, 2F), the layout of h


ACTIVATIONS = {"relu": (_relu, _drelu), "gelu": (_gelu, _dgelu), "swiglu": (_swiglu, _dswiglu)}


def _phi_cdf(x):
    """Standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
