"""Pure-MLX reference kernels of the SAE hot path: arrays in, arrays out, nothing about models.

These are the definitions a fused back end (CUDA / Metal ``mx.custom_function`` with a ``.vjp``) must match.
Shapes: x [B,D], pre [B,F], W_enc [D,F], b_enc [F], W_dec [F,D], b_dec [D], values / indices [B,k].

All functions are differentiable through MLX autodiff where it makes sense (the TopK indices are
integer and carry no gradient; the JumpReLU pseudo-gradients are ``mx.custom_function`` VJPs).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx


def encode_pre(x: mx.array, W_enc: mx.array, b_enc: mx.array, b_dec: mx.array | None = None) -> mx.array:
    """Pre-activations [B,F] = (x - b_dec) @ W_enc + b_enc (``b_dec`` None: not subtracted)."""
    if b_dec is not None:
        x = x - b_dec
    return x @ W_enc + b_enc


def topk_select(pre: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest of relu(pre) per row: (values [B,k] >= 0, indices [B,k] uint32), in no particular order.

    relu is applied after selection, which gives the same values as selecting on relu(pre) (sparsify) and
    the same dense latents as SAELens (top-k of raw pre, then relu): when fewer than k entries are
    positive the extra picks are zeros either way.
    """
    F = pre.shape[-1]
    idx = mx.stop_gradient(mx.argpartition(pre, F - k, axis=-1)[..., F - k:])
    vals = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0)
    return vals, idx


def topk_encode(x, W_enc, b_enc, b_dec, k: int, apply_b_dec_to_input: bool = True):
    """TopK encoder: (values [B,k], indices [B,k]) of ``topk_select(encode_pre(x))``."""
    return topk_select(encode_pre(x, W_enc, b_enc, b_dec if apply_b_dec_to_input else None), k)


def sparse_decode(values: mx.array, indices: mx.array, W_dec: mx.array, b_dec: mx.array | None = None) -> mx.array:
    """x_hat [B,D] = sum_j values[:,j] * W_dec[indices[:,j]] (+ b_dec): gathers the k rows, never [B,F]."""
    out = mx.sum(W_dec[indices] * values[..., None], axis=-2)
    return out if b_dec is None else out + b_dec


def topk_decode(values, indices, W_dec, b_dec):
    """TopK decoder: ``sparse_decode`` with the decoder bias."""
    return sparse_decode(values, indices, W_dec, b_dec)


def scatter_dense(values: mx.array, indices: mx.array, d_sae: int) -> mx.array:
    """The dense latents [B,F] of a sparse (values, indices) pair."""
    zeros = mx.zeros(values.shape[:-1] + (d_sae,), dtype=values.dtype)
    return mx.put_along_axis(zeros, indices, values, axis=-1)


def batchtopk_mask(acts: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """BatchTopK over a [B,F] batch of non-negative activations: keep the k*B largest entries overall.

    Returns (kept [B,F], smallest kept value: a scalar, the candidate for the running threshold).
    Ties at the cut keep every tied entry.
    """
    B, F = acts.shape
    n_keep = min(k * B, B * F)
    flat = mx.stop_gradient(acts.reshape(-1))
    cut = mx.min(mx.topk(flat, n_keep))
    kept = mx.where(acts >= cut, acts, 0)
    return kept, cut


def dense_decode(f: mx.array, W_dec: mx.array, b_dec: mx.array) -> mx.array:
    return f @ W_dec + b_dec


def _rect(u: mx.array) -> mx.array:
    """Rectangle kernel K(u) = 1[-1/2 < u < 1/2]."""
    return (mx.abs(u) < 0.5).astype(u.dtype)


@cache
def jumprelu_fn(bandwidth: float):
    """JumpReLU f = relu(z) * H(z - theta), with straight-through pseudo-gradients (rectangle kernel, eps).

    d/dz = H(z - theta) * 1[z > 0];  d/dtheta = -(theta / eps) * K((z - theta) / eps)  (summed over batch).
    """

    @mx.custom_function
    def jumprelu(z, theta):
        return mx.where(z > theta, mx.maximum(z, 0), 0)

    @jumprelu.vjp
    def jumprelu_vjp(primals, cotangent, output):
        z, theta = primals
        g = cotangent
        gate = ((z > theta) & (z > 0)).astype(g.dtype)
        dz = gate * g
        dtheta = -(theta / bandwidth) * _rect((z - theta) / bandwidth) * g
        dtheta = dtheta.reshape(-1, theta.shape[-1]).sum(axis=0)
        return dz, dtheta

    return jumprelu


@cache
def step_fn(bandwidth: float):
    """Heaviside step H(z - theta) with pseudo-gradient d/dtheta = -(1/eps) K((z - theta)/eps); d/dz = 0."""

    @mx.custom_function
    def step(z, theta):
        return (z > theta).astype(z.dtype)

    @step.vjp
    def step_vjp(primals, cotangent, output):
        z, theta = primals
        g = cotangent
        dtheta = -(1.0 / bandwidth) * _rect((z - theta) / bandwidth) * g
        dtheta = dtheta.reshape(-1, theta.shape[-1]).sum(axis=0)
        return mx.zeros_like(z), dtheta

    return step


def jumprelu(z: mx.array, theta: mx.array, bandwidth: float) -> mx.array:
    return jumprelu_fn(float(bandwidth))(z, theta)


def heaviside(z: mx.array, theta: mx.array, bandwidth: float) -> mx.array:
    return step_fn(float(bandwidth))(z, theta)
