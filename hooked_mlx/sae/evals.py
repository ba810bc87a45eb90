"""SAE evaluation: reconstruction metrics on held-out activations, and the model with the SAE spliced in.

``evaluate_reconstruction(sae, acts)`` -> {mse, fvu, explained_variance, l0, l0_sparsity, l1_magnitude,
l2_ratio, rel_reconstruction_bias, unfired_fraction} over all rows (FVU is centred by the mean of the whole
held-out set; sums are accumulated in float64).

``evaluate_model(model, sae, texts)`` -> {ce_loss_clean, ce_loss_sae, ce_loss_zero_ablation,
ce_loss_recovered, kl_sae, kl_zero_ablation, kl_score}: next-token cross-entropy and KL(clean || patched)
when the hook's activation is replaced by the SAE reconstruction, or by zeros. The replacement happens
at the positions the SAE was trained on (not at BOS or pad positions, when ``exclude_special_tokens``);
log-softmax runs in float32. Keys are the constants of ``hooked_mlx.sae.metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import numpy as np

from ..host import to_float
from . import metrics as M
from .sae import SAE


def _batches(acts, batch_size: int) -> Iterable[mx.array]:
    if isinstance(acts, (mx.array, np.ndarray)):
        n = acts.shape[0]
        for i in range(0, n, batch_size):
            yield mx.array(acts[i:i + batch_size])
    else:
        for b in acts:
            yield mx.array(b)


def evaluate_reconstruction(sae: SAE, acts, batch_size: int = 4096, targets=None) -> dict[str, float]:
    """Reconstruction metrics of ``sae`` over held-out activations [N, d_in] (an array or batches of rows).
    A transcoder's are against ``targets`` [N, d_out] (the activations at its output hook, row for row)."""
    if sae.cfg.is_transcoder and targets is None:
        raise ValueError(f"This is a transcoder ({sae.cfg.hook_name} -> {sae.cfg.hook_name_out}): its output is "
                         f"compared with the activations at its output hook. Pass targets= (row for row).")
    if targets is not None and not sae.cfg.is_transcoder:
        raise ValueError("targets= is for transcoders; an SAE's reconstruction is compared with its input.")
    D, Do, F = sae.d_in, sae.d_out, sae.d_sae
    n = 0
    sum_x = np.zeros(Do)
    sum_sq = sse = l0 = l1 = ratio = xhat_sq = x_dot = 0.0
    fired = mx.zeros((F,), dtype=mx.bool_)
    pairs = zip(_batches(acts, batch_size), _batches(targets, batch_size)) if targets is not None else (
        (a, a) for a in _batches(acts, batch_size))
    for inp, tgt in pairs:
        inp = inp.reshape(-1, D).astype(mx.float32)
        x = tgt.reshape(-1, Do).astype(mx.float32)  # what the output is compared with
        if x.shape[0] != inp.shape[0]:
            raise ValueError(f"targets have {x.shape[0]} rows where the inputs have {inp.shape[0]}.")
        f = sae.encode(inp)
        x_hat = sae.predict(f, inp)
        xn = mx.linalg.norm(x, axis=-1)
        hn = mx.linalg.norm(x_hat, axis=-1)
        stats = [mx.sum(x, axis=0), mx.sum(x * x), mx.sum(mx.square(x_hat - x)), mx.sum(f != 0),
                 mx.sum(mx.abs(f)), mx.sum(hn / mx.maximum(xn, 1e-12)), mx.sum(hn * hn), mx.sum(x * x_hat)]
        fired = fired | mx.any(f != 0, axis=0)
        mx.eval(stats, fired)
        sx, sq, e, a, b, r, h2, xd = (np.array(s, dtype=np.float64) for s in stats)
        sum_x += sx
        sum_sq += float(sq)
        sse += float(e)
        l0 += float(a)
        l1 += float(b)
        ratio += float(r)
        xhat_sq += float(h2)
        x_dot += float(xd)
        n += x.shape[0]
    if n == 0:
        raise ValueError("evaluate_reconstruction got no activations.")
    total_var = sum_sq - float(np.dot(sum_x, sum_x)) / n
    fvu = sse / max(total_var, 1e-30)
    return {
        M.MSE: sse / n,
        M.FVU: fvu,
        M.EXPLAINED_VARIANCE: 1.0 - fvu,
        M.L0: l0 / n,
        M.L0_SPARSITY: l0 / n / F,
        M.L1_MAGNITUDE: l1 / n,
        M.L2_RATIO: ratio / n,
        M.REL_RECONSTRUCTION_BIAS: xhat_sq / x_dot if x_dot else float("nan"),
        M.UNFIRED_FRACTION: 1.0 - to_float(mx.mean(fired.astype(mx.float32))),
    }


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _ce_kl(logp: mx.array, logp_clean: mx.array, tokens: mx.array, keep: mx.array) -> tuple[mx.array, mx.array]:
    """Summed next-token NLL and summed KL(clean || this) over the kept prediction positions."""
    lp = logp[:, :-1]
    nll = -mx.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    lc = logp_clean[:, :-1]
    kl = mx.sum(mx.exp(lc) * (lc - lp), axis=-1)
    return mx.sum(nll * keep), mx.sum(kl * keep)


def splice_positions(model, tokens: mx.array, mask: mx.array, exclude_special: bool = True) -> mx.array:
    """[B,P] bool: where the SAE reconstruction replaces the activation (real tokens, not BOS if excluded)."""
    pos = mask
    bos = getattr(model, "bos_token_id", None)
    if exclude_special and bos is not None:
        pos = pos & (tokens != bos)
    return pos


def evaluate_model(model, sae: SAE, texts, *, batch_size: int = 8, hook_name: str | None = None,
                   prepend_bos: bool | None = True, exclude_special: bool | None = None) -> dict[str, float]:
    """CE loss recovered and KL score of ``sae`` spliced into ``model`` at its hook, over ``texts``.

    ``texts``: a string, a list of strings (padded per batch; pad positions are excluded), or token ids
    [B,P]. Returns the ``metrics.MODEL_KEYS``. A transcoder replaces its output hook (``hook_name`` overrides
    ``cfg.hook_name_out``) with its prediction from its input hook; zero ablation zeroes the output hook.
    """
    transcoder = sae.cfg.is_transcoder
    hook = hook_name or (sae.cfg.hook_name_out if transcoder else sae.cfg.hook_name)
    if not hook:
        raise ValueError("The SAE has no hook_name; pass hook_name= (e.g. 'blocks.2.hook_resid_post').")
    for name in [hook] + ([sae.cfg.hook_name] if transcoder else []):
        if name not in model.hook_dict:
            from ..names import unknown_name_error

            raise unknown_name_error(name, list(model.hook_dict))
    exclude = sae.cfg.exclude_special_tokens if exclude_special is None else exclude_special
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, mx.array):
        chunks = [(texts[i:i + batch_size], mx.ones(texts[i:i + batch_size].shape, dtype=mx.bool_))
                  for i in range(0, texts.shape[0], batch_size)]
    else:
        texts = list(texts)
        chunks = []
        for i in range(0, len(texts), batch_size):
            toks, mask = model.to_tokens(texts[i:i + batch_size], prepend_bos=prepend_bos, return_mask=True)
            chunks.append((toks, mask))
    sums = dict(n=0.0, ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    for toks, mask in chunks:
        if toks.shape[1] < 2:
            continue
        where = splice_positions(model, toks, mask, exclude)[..., None]

        seen: dict[str, mx.array] = {}

        def record(act, hook_point, seen=seen):  # a transcoder's input
            seen["x"] = act
            return act

        def with_sae(act, hook_point, where=where, seen=seen):
            x = seen["x"] if transcoder else act
            x_hat = sae(x.reshape(-1, x.shape[-1])).reshape(act.shape)
            return mx.where(where, x_hat, act).astype(act.dtype)

        def zero(act, hook_point, where=where):
            return mx.where(where, mx.zeros_like(act), act)

        keep = (mask[:, 1:] & mask[:, :-1]).astype(mx.float32)
        lp_clean = _log_softmax(model(toks, attention_mask=mask))
        spliced = ([(sae.cfg.hook_name, record)] if transcoder else []) + [(hook, with_sae)]
        lp_sae = _log_softmax(model.run_with_hooks(toks, fwd_hooks=spliced, attention_mask=mask))
        lp_zero = _log_softmax(model.run_with_hooks(toks, fwd_hooks=[(hook, zero)], attention_mask=mask))
        ce_c, _ = _ce_kl(lp_clean, lp_clean, toks, keep)
        ce_s, kl_s = _ce_kl(lp_sae, lp_clean, toks, keep)
        ce_z, kl_z = _ce_kl(lp_zero, lp_clean, toks, keep)
        vals = [mx.sum(keep), ce_c, ce_s, ce_z, kl_s, kl_z]
        mx.eval(vals)
        for k, v in zip(sums, vals):
            sums[k] += to_float(v)
    n = sums["n"]
    if n == 0:
        raise ValueError("evaluate_model got no predicted positions (texts of at least 2 tokens are needed).")
    ce_clean, ce_sae, ce_zero = sums["ce_clean"] / n, sums["ce_sae"] / n, sums["ce_zero"] / n
    kl_sae, kl_zero = sums["kl_sae"] / n, sums["kl_zero"] / n
    denom = ce_zero - ce_clean
    return {
        M.CE_LOSS_CLEAN: ce_clean,
        M.CE_LOSS_SAE: ce_sae,
        M.CE_LOSS_ZERO_ABLATION: ce_zero,
        M.CE_LOSS_RECOVERED: (ce_zero - ce_sae) / denom if denom != 0 else float("nan"),
        M.KL_SAE: kl_sae,
        M.KL_ZERO_ABLATION: kl_zero,
        M.KL_SCORE: (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"),
    }
