"""Metric names (module constants: the one place the keys are spelled) and their definitions.

Training metrics are averaged over the steps between two reads (``SAEConfig.log_every_steps``); evaluation
metrics are over a whole held-out set. Definitions (x [B,D] input, x_hat reconstruction, f [B,F] latents):

=========================  ==========================================================================
key                        definition
=========================  ==========================================================================
``loss``                   total training loss (reconstruction + sparsity + auxiliary)
``mse``                    mean over tokens of sum_d (x_hat - x)^2 (SAELens training convention)
``fvu``                    sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean_b x||^2 (Gao et al. 2.1)
``explained_variance``     1 - fvu
``l0``                     mean over tokens of #{i : f_i != 0}
``l0_sparsity``            l0 / d_sae (average firing frequency)
``l1_magnitude``           mean over tokens of sum_i |f_i|
``sparsity_loss``          the weighted sparsity term actually added to the loss (ReLU: L1, JumpReLU: L0)
``aux_loss``               AuxK (TopK family, normalised, times alpha) or ghost-grad loss (ReLU); 0 if none
``dead_fraction``          fraction of latents that have not fired in the last ``dead_tokens_window`` tokens
``grad_norm``              global gradient norm before clipping
``lr``                     learning rate of the step
``threshold``              BatchTopK running threshold (mean JumpReLU threshold for JumpReLU)
``l2_ratio``               mean_b ||x_hat_b|| / ||x_b|| (shrinkage; evaluation)
``rel_reconstruction_bias``  E||x_hat||^2 / E[x . x_hat] (evaluation)
``unfired_fraction``       fraction of latents that never fired on the evaluation set
``ce_loss_clean`` / ``ce_loss_sae`` / ``ce_loss_zero_ablation``  next-token CE (nats) of the model as is,
                           with the SAE reconstruction spliced in, with the hook zero-ablated
``ce_loss_recovered``      (ce_zero - ce_sae) / (ce_zero - ce_clean)
``kl_sae`` / ``kl_zero_ablation``  mean KL(clean || patched) of the next-token distributions
``kl_score``               (kl_zero - kl_sae) / kl_zero
=========================  ==========================================================================
"""

from __future__ import annotations

import mlx.core as mx

LOSS = "loss"
MSE = "mse"
FVU = "fvu"
EXPLAINED_VARIANCE = "explained_variance"
L0 = "l0"
L0_SPARSITY = "l0_sparsity"
L1_MAGNITUDE = "l1_magnitude"
SPARSITY_LOSS = "sparsity_loss"
AUX_LOSS = "aux_loss"
DEAD_FRACTION = "dead_fraction"
GRAD_NORM = "grad_norm"
LR = "lr"
THRESHOLD = "threshold"
L2_RATIO = "l2_ratio"
REL_RECONSTRUCTION_BIAS = "rel_reconstruction_bias"
UNFIRED_FRACTION = "unfired_fraction"
CE_LOSS_CLEAN = "ce_loss_clean"
CE_LOSS_SAE = "ce_loss_sae"
CE_LOSS_ZERO_ABLATION = "ce_loss_zero_ablation"
CE_LOSS_RECOVERED = "ce_loss_recovered"
KL_SAE = "kl_sae"
KL_ZERO_ABLATION = "kl_zero_ablation"
KL_SCORE = "kl_score"

#: keys the trainer reports every ``log_every_steps``
TRAIN_KEYS = (LOSS, MSE, FVU, EXPLAINED_VARIANCE, L0, L0_SPARSITY, L1_MAGNITUDE, SPARSITY_LOSS, AUX_LOSS,
              DEAD_FRACTION, GRAD_NORM, LR, THRESHOLD)
#: keys of ``evaluate_reconstruction``
RECONSTRUCTION_KEYS = (MSE, FVU, EXPLAINED_VARIANCE, L0, L0_SPARSITY, L1_MAGNITUDE, L2_RATIO,
                       REL_RECONSTRUCTION_BIAS, UNFIRED_FRACTION)
#: keys of ``evaluate_model`` (spliced-in reconstruction)
MODEL_KEYS = (CE_LOSS_CLEAN, CE_LOSS_SAE, CE_LOSS_ZERO_ABLATION, CE_LOSS_RECOVERED, KL_SAE, KL_ZERO_ABLATION,
              KL_SCORE)


def sse(x: mx.array, x_hat: mx.array) -> mx.array:
    """sum_b sum_d (x_hat - x)^2 of [B,D] arrays (a scalar)."""
    return mx.sum(mx.square(x_hat - x))


def total_variance(x: mx.array) -> mx.array:
    """sum_b ||x_b - mean_b x||^2 of a [B,D] batch (a scalar)."""
    return mx.sum(mx.square(x - mx.mean(x, axis=0, keepdims=True)))


def fvu(x: mx.array, x_hat: mx.array) -> mx.array:
    """Fraction of variance unexplained over a [B,D] batch, centred by the batch mean."""
    return sse(x, x_hat) / mx.maximum(total_variance(x), 1e-30)


def mse(x: mx.array, x_hat: mx.array) -> mx.array:
    """Mean over tokens of the per-token squared error summed over d."""
    return mx.mean(mx.sum(mx.square(x_hat - x), axis=-1))


def l0(f: mx.array) -> mx.array:
    """Mean number of non-zero latents per token of a [B,F] latent array."""
    return mx.mean(mx.sum((f != 0).astype(mx.float32), axis=-1))


def l1_magnitude(f: mx.array) -> mx.array:
    return mx.mean(mx.sum(mx.abs(f), axis=-1))
