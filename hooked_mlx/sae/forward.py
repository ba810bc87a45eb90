"""The per-architecture training math: ``train_forward`` (SAE parameters and a batch in, loss, metrics and the
fired-latent mask out; pure), AuxK and ghost grads, and the initialisation helpers (geometric-median
``b_dec``, the input scale, the learning-rate schedule)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import mlx.core as mx
import mlx.optimizers as optim

from ..host import to_float
from . import metrics as M
from .config import SAEConfig
from .sae import SAE
from .step_kernels import StepKernels


def geometric_median(x: mx.array, iters: int = 50, eps: float = 1e-6, tol: float = 1e-6) -> mx.array:
    """Geometric median of the rows of x [N,D] by Weiszfeld's algorithm (float32)."""
    x = x.astype(mx.float32)
    m = mx.mean(x, axis=0)
    for _ in range(iters):
        w = 1.0 / mx.maximum(mx.linalg.norm(x - m, axis=-1), eps)
        new = mx.sum(w[:, None] * x, axis=0) / mx.sum(w)
        shift = to_float(mx.linalg.norm(new - m))
        m = new
        if shift <= tol * max(1.0, to_float(mx.linalg.norm(m))):
            break
    return m


def estimate_input_scale(batches: Iterable[mx.array], d_in: int) -> float:
    """SAELens ``expected_average_only_in``: s = sqrt(d_in) / E||x|| over the given batches."""
    total, n = 0.0, 0
    for x in batches:
        total += to_float(mx.sum(mx.linalg.norm(x.astype(mx.float32), axis=-1)))
        n += x.shape[0]
    if n == 0 or total <= 0 or not math.isfinite(total):
        raise ValueError(
            f"Cannot estimate the input normalisation: mean activation norm over {n} tokens is {total / max(n, 1)}. "
            f"Check the hook and the data, or set normalize_activations='none'."
        )
    return math.sqrt(d_in) / (total / n)


def lr_schedule(cfg: SAEConfig) -> Callable:
    """Linear warmup from 0 to ``lr``, then constant / cosine / linear decay to ``lr * lr_end_factor``."""
    total = cfg.total_steps
    warm = min(cfg.lr_warmup_steps, total)
    rest = max(total - warm, 1)
    end = cfg.lr * cfg.lr_end_factor
    if cfg.lr_schedule == "constant":
        main = lambda step: mx.array(cfg.lr, dtype=mx.float32)  # noqa: E731
    elif cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(cfg.lr, rest, end)
    else:
        main = optim.linear_schedule(cfg.lr, end, rest)
    if warm == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, warm), main], [warm])


def _auxk_loss(pre, x, x_hat, W_dec, dead, k_aux: int, kernels):
    """Normalised AuxK loss: reconstruct the residual with the top-k_aux dead latents (no decoder bias).

    The dead latents' raw pre-activations are used (no relu, as SAELens): a dead latent's pre-activation is
    usually negative, and relu would give it no gradient. Fewer than k_aux dead latents: all of them are
    used. The selection is a per-row threshold (the k_aux-th largest dead pre-activation) and the decode a
    dense matmul: on every back end measured this beat gathering k_aux rows, whose backward is a scatter of
    [B, k_aux, D] (the main TopK path, with k << k_aux, stays sparse).
    """
    e = mx.stop_gradient(x - x_hat)
    pre_dead = mx.where(dead, pre, -mx.inf)
    kth = mx.stop_gradient(mx.min(mx.topk(pre_dead, k_aux, axis=-1), axis=-1, keepdims=True))
    z = mx.where((pre_dead >= kth) & dead, pre, 0.0)
    e_hat = z @ W_dec
    # on a data-parallel world, the global batch's variance (see step_kernels.StepKernels.total_variance)
    denom = mx.maximum(kernels.total_variance(e), 1e-12)
    return mx.sum(mx.square(e_hat - e)) / denom


def _ghost_grad_loss(pre, x, x_hat, W_dec, dead):
    """Ghost grads (Anthropic, Jan 2024): a loss whose value matches the MSE and whose gradient reaches
    only the dead latents, through exp(pre) of those latents."""
    r = x - x_hat
    rho = mx.linalg.norm(r, axis=-1, keepdims=True)
    g_acts = mx.where(dead, mx.exp(mx.minimum(pre, 20.0)), 0.0)
    g = g_acts @ W_dec
    g = g * mx.stop_gradient(rho / (2 * mx.linalg.norm(g, axis=-1, keepdims=True) + 1e-6))
    ell = mx.sum(mx.square(g - mx.stop_gradient(r)), axis=-1)
    main = mx.stop_gradient(mx.sum(mx.square(x_hat - x), axis=-1))
    ell = mx.stop_gradient(main / (ell + 1e-6)) * ell
    return mx.mean(ell)


def fused_path(sae: SAE, kernels: StepKernels) -> bool:
    """Whether ``train_forward`` runs ``sae`` through the fully fused forward (TopK, or BatchTopK where the back end
    keeps its entries sparse). The fused step assumes one width in and out: a transcoder with d_out != d_in takes
    the per-op path, whose decode and latent sums live in the decoder's width alone."""
    sel = sae.cfg.arch.selection
    fused = kernels.fused_topk if sel == "row" else kernels.fused_batchtopk if sel == "batch" else False
    return fused and sae.d_out == sae.d_in


def train_forward(sae: SAE, x: mx.array, dead: mx.array, sparsity_scale: mx.array,
                  kernels: StepKernels | None = None, use_dead: bool = True, target: mx.array | None = None,
                  lowp: dict[str, mx.array] | None = None):
    """The training-time forward of one batch: (loss, (metrics dict, fired [F] bool, extras)).

    x [B,D] already normalised. ``dead`` [F] bool marks dead latents (AuxK / ghost grads);
    ``sparsity_scale`` in [0,1] is the sparsity warm-up factor. ``extras`` holds the BatchTopK minimum kept
    value. ``use_dead=False`` skips the dead-latent losses entirely (valid while fewer tokens than the dead
    window have been seen, when no latent can be dead). ``target`` [B, d_out]: what a transcoder predicts
    (default: x itself, an SAE); a skip transcoder's output adds x @ W_skip.T. ``lowp``: the parameters'
    low-precision copies the fused forwards read (``StepKernels.lowp_dtypes``), if the caller keeps them.
    """
    kernels = kernels if kernels is not None else StepKernels("reference")
    cfg = sae.cfg
    arch = cfg.arch  # the architecture's record: its selection (TopK, BatchTopK) or its sparsity penalty
    sel = arch.selection
    B = x.shape[0]
    pre = kernels.encode_pre(x, sae.W_enc, sae.b_enc, sae.b_dec if cfg.apply_b_dec_to_input else None)
    zero = mx.array(0.0)
    extras = {}
    sparsity = zero
    aux = zero
    f = None
    fused = fused_path(sae, kernels)
    fused_topk, fused_btk = fused and sel == "row", fused and sel == "batch"
    skip = sae.skip_term(x)  # a skip transcoder's linear term (None otherwise)
    if fused_topk:
        # the fully fused path (CUDA / Metal / the sparse CPU ops): sparse encoder backward, AuxK included,
        # never a dense [B,F] gradient (AuxK normalised by the global batch's variance on N ranks)
        x_hat, vals, idx, aux = kernels.topk_forward(sae, x, dead, use_dead, target, skip, lowp)
    elif fused_btk:  # the same, with the batch's k*B entries kept as a flattened list (the native CPU ops)
        x_hat, vals, idx, aux = kernels.batchtopk_forward(sae, x, dead, use_dead, target, skip, lowp)
    else:
        vals = idx = None
    if sel == "row" or fused_btk:
        if not (fused_topk or fused_btk):
            vals, idx = kernels.topk_select(pre, cfg.k)
            x_hat = kernels.topk_decode(vals, idx, sae.W_dec, sae.b_dec)
        # bookkeeping from the sparse latents (TopK's [B,k], BatchTopK's flattened entries), never a dense [B,F]
        v = mx.stop_gradient(vals)
        active = (v > 0).astype(mx.float32)
        fired = mx.zeros((sae.d_sae,), dtype=mx.float32).at[idx.reshape(-1)].add(active.reshape(-1)) > 0
        l0 = mx.sum(active) / B
        l1 = mx.sum(v) / B
        if fused_btk:
            extras["min_kept"] = mx.min(mx.where(v > 0, v, mx.inf))
    elif sel == "batch":
        f, cut = kernels.batchtopk_mask(mx.maximum(pre, 0), cfg.k)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        extras["min_kept"] = mx.min(mx.where(f > 0, mx.stop_gradient(f), mx.inf))
    elif arch.sparsity == "l1":  # ReLU
        f = mx.maximum(pre, 0)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        dec_norm = mx.linalg.norm(sae.W_dec, axis=-1)
        sparsity = cfg.l1_coefficient * sparsity_scale * mx.mean(mx.sum(f * dec_norm, axis=-1))
    elif arch.sparsity == "l0":  # JumpReLU: the learned threshold's straight-through step
        f = kernels.jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        l0_ste = mx.mean(mx.sum(kernels.heaviside(pre, sae.threshold, cfg.jumprelu_bandwidth), axis=-1))
        sparsity = cfg.l0_coefficient * sparsity_scale * l0_ste
    else:  # pragma: no cover - the trainer takes trainable architectures only
        raise ValueError(f"{arch.name} SAEs are not trained here.")
    t = x if target is None else target
    if skip is not None and not fused:  # (the fused branches add it themselves, before their AuxK residual)
        x_hat = x_hat + skip
    mse = M.mse(t, x_hat)
    if use_dead and arch.uses_k and cfg.aux_k_coefficient > 0 and not fused:
        n_dead = mx.sum(dead)
        aux = mx.where(n_dead > 0, _auxk_loss(pre, t, x_hat, sae.W_dec, dead, cfg.resolved_aux_k, kernels), 0.0)
        aux = cfg.aux_k_coefficient * aux
    elif use_dead and arch.sparsity == "l1" and cfg.ghost_grads:
        n_dead = mx.sum(dead)
        aux = mx.where(n_dead > 0, _ghost_grad_loss(pre, t, x_hat, sae.W_dec, dead), 0.0)
    loss = mse + sparsity + aux
    if f is not None:
        fs = mx.stop_gradient(f)
        l0 = M.l0(fs)
        l1 = M.l1_magnitude(fs)
        fired = mx.any(fs > 0, axis=0)
    metrics = {
        M.LOSS: loss,
        M.MSE: mse,
        M.FVU: M.fvu(t, mx.stop_gradient(x_hat)),
        M.L0: l0,
        M.L0_SPARSITY: l0 / sae.d_sae,
        M.L1_MAGNITUDE: l1,
        M.SPARSITY_LOSS: sparsity,
        M.AUX_LOSS: aux,
    }
    return loss, (metrics, fired, extras)
