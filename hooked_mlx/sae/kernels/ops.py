"""The ``Ops`` interface of the SAE kernels and its pure-MLX implementation.

``Ops`` (= ``ReferenceOps``) is the one kernel interface: arrays in, arrays out, nothing about configs, SAEs
or metrics. Each primitive's docstring is its contract; ``ReferenceOps`` implements it with MLX ops on any
device, and the back ends (``cpu.CpuOps``, ``cuda.CudaOps``, ``metal.MetalOps``) subclass it and override
what they do faster. ``select.get_ops`` picks the device's back end and checks it against this one.
Also here: the Adam hyper-parameter vector the fused update passes read (``adam_hparams``) and the
radix select over the flattened batch built from ``radix_histogram`` (``radix_kth_largest``).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx


def float_keys(a: mx.array) -> mx.array:
    """Order-preserving uint32 keys of float values (larger value -> larger key; -inf smallest)."""
    bits = a.astype(mx.float32).view(mx.uint32)
    neg = (bits >> 31) == 1
    return mx.where(neg, ~bits, bits | mx.array(0x80000000, dtype=mx.uint32))


def keys_to_float(keys: mx.array) -> mx.array:
    pos = (keys >> 31) == 1
    bits = mx.where(pos, keys & mx.array(0x7FFFFFFF, dtype=mx.uint32), ~keys)
    return bits.view(mx.float32)


class ReferenceOps:
    """Pure-MLX primitives (any device). GPU back ends subclass this and override what they fuse."""

    name = "reference"
    matmul_dtype: mx.Dtype | None = None  # None: the inputs' dtype (float32)
    #: True (GPU kernels): adam_rows is one pass per decoder row (projection, Adam, renorm), so the trainer's
    #: update runs as ``fused_update.fused_adam_update``. False (CPU): compiled MLX fuses the reference
    #: update's elementwise work already, and each extra reduction is a separate pass, so the trainer keeps it.
    fused_optimizer = False
    lowp_backward = False  # True: the per-latent gradient sums read bf16 copies of dY and xc (fp32 sums)
    #: dtype of the W_dec copy that decode and the gathered dot products read (``decoder_weights``); None: W_dec
    decoder_dtype: mx.Dtype | None = None
    #: True: a BatchTopK step keeps the batch's k*B entries as a flattened list (``batch_entries``) and decodes and
    #: differentiates them sparsely (``entries_decode``, ``entries_dot``, ``latent_grads``), as TopK does; False:
    #: a dense [B,F] mask (where ``batch_entries`` over the flattened batch is the slower choice)
    sparse_batchtopk = False

    # encoder ---------------------------------------------------------------------------------------
    def pre(self, xc: mx.array, W_enc: mx.array, b_enc: mx.array, W_lowp: mx.array | None = None) -> mx.array:
        """Pre-activations [B,F] = xc @ W_enc + b_enc (``W_lowp``: a ready low-precision copy of W_enc)."""
        if self.matmul_dtype is None:
            return xc @ W_enc + b_enc
        dt = self.matmul_dtype
        W = W_lowp if W_lowp is not None and W_lowp.size else W_enc.astype(dt)
        return mx.addmm(b_enc.astype(dt), xc.astype(dt), W)

    def row_topk(self, pre: mx.array, k: int, dead: mx.array | None = None, relu: bool = True
                 ) -> tuple[mx.array, mx.array]:
        """(the k largest pre per row [B,k] float32, relu'd unless ``relu=False``; their indices [B,k]
        uint32), any order. ``dead`` [F] (nonzero = eligible): entries of other latents count as -inf
        (value 0 if picked)."""
        if dead is not None:
            pre = mx.where(dead.astype(mx.bool_), pre, -mx.inf)
        F = pre.shape[-1]
        idx = mx.argpartition(pre, F - k, axis=-1)[..., F - k:].astype(mx.uint32)
        vals = mx.take_along_axis(pre, idx, axis=-1)
        vals = mx.maximum(vals, 0) if relu else mx.where(mx.isfinite(vals), vals, 0)
        return vals.astype(mx.float32), idx

    def radix_histogram(self, keys: mx.array, prefix: mx.array, shift: int) -> mx.array:
        """256-bin histogram of digit (key >> shift) & 255 over keys whose bits above the digit equal
        ``prefix`` [1] uint32's (a radix-select pass over the flattened batch)."""
        hi_mask = mx.array(0xFFFFFFFF, dtype=mx.uint32) << (shift + 8) if shift < 24 else mx.array(0, mx.uint32)
        match = (keys & hi_mask) == (prefix & hi_mask)
        digit = ((keys >> shift) & 255).astype(mx.int32)
        return mx.zeros((256,), dtype=mx.uint32).at[digit.reshape(-1)].add(match.reshape(-1).astype(mx.uint32))

    def batch_kth_largest(self, pre: mx.array, n_keep: int) -> mx.array:
        """The n_keep-th largest entry of relu(pre) over the whole batch (a float32 scalar), exact."""
        return radix_kth_largest(self, pre, n_keep)

    def batch_entries(self, pre: mx.array, n_keep: int) -> tuple[mx.array, mx.array, mx.array]:
        """The n_keep largest entries of relu(pre) [B,F] over the whole batch (ties at the cut broken arbitrarily,
        as a top-k over the flattened batch does): (rows [n_keep] uint32, cols [n_keep] uint32, vals [n_keep]
        float32, relu'd), any order."""
        B, F = pre.shape
        acts = mx.maximum(pre, 0).astype(mx.float32).reshape(-1)
        i = mx.argpartition(acts, acts.size - n_keep)[acts.size - n_keep:].astype(mx.uint32)
        return i // F, i % F, acts[i]

    def entries_decode(self, rows: mx.array, cols: mx.array, vals: mx.array, W: mx.array, n_rows: int) -> mx.array:
        """[n_rows, D]: row r = sum over the entries e with rows_e = r of vals_e * W[cols_e] (no bias)."""
        return mx.zeros((n_rows, W.shape[-1]), dtype=mx.float32).at[rows].add(vals[:, None] * W[cols])

    def entries_dot(self, dY: mx.array, rows: mx.array, cols: mx.array, W: mx.array) -> mx.array:
        """[n]: dY[rows_e] . W[cols_e]."""
        return mx.sum(dY[rows] * W[cols], axis=-1)

    def acts_keys(self, pre: mx.array) -> mx.array:
        """Keys of relu(pre), flattened (what BatchTopK ranks)."""
        return float_keys(mx.maximum(pre, 0)).reshape(-1)

    # decoder ---------------------------------------------------------------------------------------
    def decoder_weights(self, W_dec: mx.array) -> mx.array:
        """What ``decode`` / ``gather_dot`` / ``entries_*`` read for W_dec: W_dec itself, or a back end's
        low-precision copy (``decoder_dtype``; the GPU back ends: bf16, sums in fp32)."""
        return W_dec if self.decoder_dtype is None else W_dec.astype(self.decoder_dtype)

    def decode(self, vals: mx.array, idx: mx.array, W: mx.array) -> mx.array:
        """[B,D] = sum_j vals[:,j] * W[idx[:,j]] (no bias)."""
        return mx.sum(W[idx] * vals[..., None], axis=-2)

    def gather_dot(self, dY: mx.array, idx: mx.array, W: mx.array) -> mx.array:
        """[B,k]: dY_b . W[idx_bj]."""
        return mx.sum(W[idx] * dY[:, None, :], axis=-1)

    def latent_grads(self, cols, rows_dec, rows_enc, coef_dec, coef_enc, Y, xc, F: int, deterministic=True):
        """Per-latent sums over the kept entries e = (row, col):

        dW_dec [F,D] = sum_e coef_dec_e * Y[rows_dec_e]  at row col_e
        dW_enc [D,F] = sum_e coef_enc_e * xc[rows_enc_e] at column col_e
        db_enc [F]   = sum_e coef_enc_e                  at col_e
        """
        D = Y.shape[-1]
        dW_dec = mx.zeros((F, D), dtype=mx.float32).at[cols].add(coef_dec[:, None] * Y[rows_dec])
        if coef_enc is None:
            return dW_dec, None, None
        dW_encT = mx.zeros((F, D), dtype=mx.float32).at[cols].add(coef_enc[:, None] * xc[rows_enc])
        db_enc = mx.zeros((F,), dtype=mx.float32).at[cols].add(coef_enc)
        return dW_dec, dW_encT.T, db_enc

    def enc_rows_sum(self, dpre: mx.array, idx: mx.array, W_enc: mx.array) -> mx.array:
        """dx [B,D] = sum_j dpre_bj * W_enc[:, idx_bj]."""
        return mx.sum(W_enc.T[idx] * dpre[..., None], axis=-2)

    # optimizer -------------------------------------------------------------------------------------
    def sq_norm(self, g: mx.array, W: mx.array | None = None) -> mx.array:
        """Squared L2 norm (float32 scalar) of ``g``; with ``W`` (the shape of g, [R, C]): of g with each row's
        component along the same row of W removed, sum_r |g_r|^2 - (g_r.W_r)^2 (2 - |W_r|^2), without
        forming the projected gradient. Non-finite entries make it non-finite (the trainer's skip test)."""
        if W is None:
            return mx.sum(mx.square(g.astype(mx.float32)))
        gw = mx.sum(g * W, axis=-1)
        return mx.sum(mx.square(g)) - mx.sum(mx.square(gw) * (2.0 - mx.sum(mx.square(W), axis=-1)))

    def adam_rows(self, W, g, m, v, hp, remove_parallel: bool, renorm: bool, renorm_eps: float, lowp_dtype=None):
        """Decoder pass: g -= (g.w) w; Adam; w /= (|w| + eps). ``hp`` = ``adam_hparams(...)``: [lr, b1, 1-b1, b2,
        1-b2, eps, c1, c2, apply] float32 with c1 = lr / (1 - b1^t), c2 = rsqrt(1 - b2^t) (MLX Adam,
        bias_correction=True); apply = 0: no update and no renorm. Returns (W, m, v), and with ``lowp_dtype`` the
        new W in that dtype too (written in the same pass where the back end can)."""
        out = _adam_rows_fn(bool(remove_parallel), bool(renorm), float(renorm_eps))(W, g, m, v, hp)
        return out if lowp_dtype is None else (*out, out[0].astype(lowp_dtype))

    def adam(self, p, g, m, v, hp, lowp_dtype=None):
        """Elementwise Adam (the formula of ``adam_rows``): (p, m, v), and with ``lowp_dtype`` the new p in that
        dtype too."""
        if lowp_dtype is None:
            return _adam_elementwise(p, g, m, v, hp)
        return _adam_elementwise_lowp(p, g, m, v, hp, lowp_dtype)


def row_view(g: mx.array) -> mx.array:
    """``g`` as rows [R, C] for a per-row reduction whose total is all that matters: a matrix keeps its
    rows; a vector becomes rows of 4096, 1024 or 256 entries when its length allows (one row otherwise)."""
    if g.ndim == 2:
        return g
    n = g.size
    for c in (4096, 1024, 256):
        if n % c == 0 and n > c:
            return g.reshape(n // c, c)
    return g.reshape(1, n)


def _finite(g: mx.array) -> mx.array:
    """g with non-finite entries read as 0 (only a skipped step has any). |g| < inf is False for NaN and
    inf alike, and unlike mx.isfinite it fuses into a compiled CPU kernel."""
    return mx.where(mx.abs(g) < mx.inf, g, 0.0)


@cache
def _adam_rows_fn(remove_parallel: bool, renorm: bool, renorm_eps: float):
    def fn(W, g, m, v, hp):
        g = _finite(g)
        if remove_parallel:
            g = g - mx.sum(g * W, axis=-1, keepdims=True) * W
        W, m, v = _adam_math(W, g, m, v, hp)
        if renorm:
            W = mx.where(hp[8] > 0, W / (mx.linalg.norm(W, axis=-1, keepdims=True) + renorm_eps), W)
        return W, m, v

    return mx.compile(fn)


def _adam_math(p, g, m, v, hp):
    b1, ob1, b2, ob2, eps, c1, c2 = hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7]
    g = _finite(g)
    m = b1 * m + ob1 * g
    v = b2 * v + ob2 * mx.square(g)
    return p - (c1 * m) / (mx.sqrt(v) * c2 + eps), m, v


_adam_elementwise = mx.compile(_adam_math)


@cache
def _adam_lowp_fn(dtype):
    def fn(p, g, m, v, hp):
        p, m, v = _adam_math(p, g, m, v, hp)
        return p, m, v, p.astype(dtype)

    return mx.compile(fn)


def _adam_elementwise_lowp(p, g, m, v, hp, dtype):
    """Adam plus the low-precision copy of the new parameter, in the same (compiled, fused) pass."""
    return _adam_lowp_fn(dtype)(p, g, m, v, hp)



def radix_kth_largest(ops, pre: mx.array, n_keep: int) -> mx.array:
    """The n_keep-th largest entry of relu(pre) by a 4-pass 8-bit radix select over order-preserving keys."""
    keys = ops.acts_keys(pre)
    prefix = mx.array([0], dtype=mx.uint32)
    remaining = mx.array(n_keep, dtype=mx.int32)
    rev = mx.arange(255, -1, -1)
    # bfloat16 values have float32 keys whose low 16 bits are zero: two passes decide them
    for shift in ((24, 16) if pre.dtype == mx.bfloat16 else (24, 16, 8, 0)):
        hist = ops.radix_histogram(keys, prefix, shift).astype(mx.int32)
        h = hist[rev]  # bins from high to low
        cum = mx.cumsum(h)
        j = mx.argmax(cum >= remaining)  # first (highest) bin reaching the count
        remaining = remaining - (cum[j] - h[j])
        digit = (255 - j).astype(mx.uint32)
        prefix = prefix | (digit << shift)
    return keys_to_float(prefix)[0]


def adam_hparams(lr, b1, b2, eps, step, grad_scale=None, apply=None) -> mx.array:
    """[lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply] float32 for step ``step`` (1-based, an int or array).

    1-b is rounded from double, as MLX's Adam does with its Python-float betas. ``grad_scale`` s (e.g. a
    gradient-clipping factor) folds into the vector: (1-b1)*s and (1-b2)*s^2 update m and v exactly as the
    gradient s*g would, with no pass over the gradient. ``apply`` (a bool array; default True) False makes
    the update a no-op (b = 1, 1-b = 0, c1 = 0, no renorm): a non-finite step skipped inside the update's
    own pass. Every Adam pass reads non-finite gradient entries as 0, so a skipped step leaves p, m and v
    exactly as they were."""
    lr = mx.array(lr, dtype=mx.float32) if not isinstance(lr, mx.array) else lr.astype(mx.float32)
    t = mx.array(step, dtype=mx.float32) if not isinstance(step, mx.array) else step.astype(mx.float32)
    c1 = lr / (1 - mx.power(mx.array(b1, mx.float32), t))
    c2 = mx.rsqrt(1 - mx.power(mx.array(b2, mx.float32), t))
    f = lambda a: mx.array(a, mx.float32)  # noqa: E731
    ob1, ob2 = f(1.0 - b1), f(1.0 - b2)
    b1_, b2_ = f(b1), f(b2)
    if grad_scale is not None:
        s = mx.array(grad_scale, mx.float32) if not isinstance(grad_scale, mx.array) else grad_scale.astype(mx.float32)
        ob1, ob2 = ob1 * s, ob2 * mx.square(s)
    on = f(1.0)
    if apply is not None:
        ok = mx.array(apply) if not isinstance(apply, mx.array) else apply
        b1_, b2_ = mx.where(ok, b1_, 1.0), mx.where(ok, b2_, 1.0)
        ob1, ob2 = mx.where(ok, ob1, 0.0), mx.where(ok, ob2, 0.0)
        c1 = mx.where(ok, c1, 0.0)
        c2 = mx.where(ok, c2, 1.0)
        on = ok.astype(mx.float32)
    return mx.stack([lr, b1_, ob1, b2_, ob2, f(eps), c1, c2, on]).astype(mx.float32)


#: the interface (its reference implementation is its definition)
Ops = ReferenceOps
