"""``StepKernels``: what a training step computes with, chosen once per trainer.

It composes a kernel module (``kernels.reference``: pure MLX with MLX's autodiff, the definition; or
``kernels.fused``: the device's ``Ops`` with the sparse TopK VJP and the radix BatchTopK cut) with a
``World`` for data-parallel runs, whose batch-wide statistics (the BatchTopK cut, the AuxK normaliser) are
then global. The trainer calls these methods only; there is no attribute probing and no proxy.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import metrics as M
from .distributed import World
from .kernels import get_backend, resolve_kernels


class StepKernels:
    """The per-op functions of a training step for ``kernels`` ("auto" | "fused" | "reference"), on
    ``world`` (None or size 1: local statistics)."""

    def __init__(self, kernels: str, world: World | None = None):
        self.module_name = resolve_kernels(kernels)
        self.module = get_backend(self.module_name)
        #: the fused ops object (None on the reference path)
        self.ops = self.module.get_ops() if self.module_name == "fused" else None
        self.world = world if world is not None and world.distributed else None

    # -- per-op functions (the same on both modules) ----------------------------------------------------
    def encode_pre(self, x, W_enc, b_enc, b_dec=None):
        return self.module.encode_pre(x, W_enc, b_enc, b_dec)

    def topk_select(self, pre, k: int):
        return self.module.topk_select(pre, k)

    def topk_decode(self, vals, idx, W_dec, b_dec):
        return self.module.topk_decode(vals, idx, W_dec, b_dec)

    def dense_decode(self, f, W_dec, b_dec):
        return self.module.dense_decode(f, W_dec, b_dec)

    def jumprelu(self, pre, threshold, bandwidth: float):
        return self.module.jumprelu(pre, threshold, bandwidth)

    def heaviside(self, pre, threshold, bandwidth: float):
        return self.module.heaviside(pre, threshold, bandwidth)

    # -- batch-wide statistics: global on a data-parallel world -------------------------------------------
    def batchtopk_mask(self, acts, k: int):
        if self.world is not None:
            return self.world.batchtopk_mask(acts, k)
        return self.module.batchtopk_mask(acts, k)

    def total_variance(self, e):
        """The AuxK normaliser: this batch's total variance, or on N ranks the global batch's divided by N
        (each rank's share of a loss whose gradients are then averaged)."""
        if self.world is not None:
            return self.world.total_variance_share(e)
        return M.total_variance(e)

    # -- the fully fused TopK branch ---------------------------------------------------------------------
    @property
    def fused_topk(self) -> bool:
        """Whether TopK runs ``topk_forward`` (the fused ops' sparse forward and backward, AuxK included)."""
        return self.ops is not None

    @property
    def fused_batchtopk(self) -> bool:
        """Whether BatchTopK runs ``batchtopk_forward`` (the back end keeps the batch's entries sparse; one process:
        on N ranks the global cut gives each rank a different number of entries, and the dense mask runs)."""
        return self.ops is not None and self.ops.sparse_batchtopk and self.world is None

    def lowp_dtypes(self) -> dict[str, mx.Dtype]:
        """The parameters whose low-precision copies the fused forwards read (name -> dtype: the encoder's bf16
        matmul operand, the decoder's bf16 rows on the GPU back ends; empty elsewhere). A trainer that keeps them
        (written by its Adam passes) passes them as ``lowp``; without them the forward casts each step."""
        if self.ops is None:
            return {}
        dts = {"W_enc": self.ops.matmul_dtype, "W_dec": self.ops.decoder_dtype}
        # HOOKED_MLX_SAE_LOWP_COPIES: which copies to keep (default both; e.g. "W_dec" or "" trade the per-step casts
        # for memory: each copy is half its parameter)
        keep = [n for n in os.environ.get("HOOKED_MLX_SAE_LOWP_COPIES", "W_enc,W_dec").replace(" ", "").split(",") if n]
        if set(keep) - set(dts):
            raise ValueError(f"HOOKED_MLX_SAE_LOWP_COPIES names {sorted(set(keep) - set(dts))}; expected a comma-separated "
                             f"subset of {', '.join(dts)} (or nothing, for no copies).")
        return {n: dt for n, dt in dts.items() if dt is not None and n in keep}

    def batchtopk_forward(self, sae, x, dead, use_dead: bool, target=None, skip=None, lowp=None):
        """``topk_forward`` for BatchTopK: (x_hat [B,D], vals [k*B], cols [k*B], aux), the batch's kept entries
        flattened (their latents in ``cols``)."""
        return self._fused(self.module.batchtopk_sae_forward, sae, x, dead, use_dead, target, skip, lowp)

    def topk_forward(self, sae, x, dead, use_dead: bool, target=None, skip=None, lowp=None):
        """The trainer's TopK branch on the fused ops: (x_hat [B,D], vals [B,k], idx [B,k], aux) where aux
        is the AuxK term (raw dead pre-activations, no decoder bias, normalised by ``total_variance`` of the
        residual, times ``aux_k_coefficient``; 0 when no latent is dead or ``use_dead`` is False). ``target``:
        what a transcoder predicts (default x); ``skip``: a skip transcoder's ``sae.skip_term(x)``, added to x_hat;
        ``lowp``: the parameters' copies of ``lowp_dtypes`` (a dict; missing ones are cast here)."""
        return self._fused(self.module.topk_sae_forward, sae, x, dead, use_dead, target, skip, lowp)

    def _fused(self, forward, sae, x, dead, use_dead: bool, target, skip, lowp):
        """One fused forward (``forward``: the TopK or the BatchTopK one) with the trainer's AuxK term: (x_hat with
        the skip term, vals, idx, aux)."""
        cfg = sae.cfg
        aux_on = bool(use_dead) and cfg.aux_k_coefficient > 0
        lowp = lowp or {}
        out = forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, cfg.k, dead if aux_on else None,
                      cfg.resolved_aux_k if aux_on else None, apply_b_dec_to_input=cfg.apply_b_dec_to_input,
                      aux_relu=False, W_enc_lowp=lowp.get("W_enc"), W_dec_lowp=lowp.get("W_dec"), ops=self.ops)
        x_hat = out.x_hat if skip is None else out.x_hat + skip
        aux = mx.array(0.0)
        if aux_on:
            e = mx.stop_gradient((x if target is None else target) - x_hat)
            loss = mx.sum(mx.square(out.e_hat - e)) / mx.maximum(self.total_variance(e), 1e-12)
            aux = cfg.aux_k_coefficient * mx.where(mx.sum(dead) > 0, loss, 0.0)
        return x_hat, out.vals, out.idx, aux
