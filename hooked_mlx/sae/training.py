"""SAE training: per-architecture losses, the compiled step, checkpoints and the training loop.

``SAETrainer`` holds one SAE, its Adam state and its on-device bookkeeping (tokens since each latent
fired, the BatchTopK threshold, metric accumulators). ``train_saes`` drives one trainer per hook point
from one activation source (one model forward feeds them all), with a tqdm bar, optional W&B, atomic
checkpoints and exact resume.

The per-architecture math lives in ``train_forward`` (pure: SAE parameters and a batch in, loss and
metrics out); fused kernels plug in through ``hooked_mlx.sae.kernels``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..outputs import OutputExistsError
from ..readers import CorruptFileError, check_safetensors
from . import distributed as D
from . import metrics as M
from .config import FORMAT_VERSION, TOPK_FAMILY, SAEConfig
from .fused_update import adam_pass, update_hparams
from .sae import SAE
from .step_kernels import StepKernels

CHECKPOINT_FILE = "checkpoint.safetensors"


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or inf; the update was skipped, the state is the last good one."""


# ---------------------------------------------------------------------------------------------------
# initialisation helpers
# ---------------------------------------------------------------------------------------------------


def geometric_median(x: mx.array, iters: int = 50, eps: float = 1e-6, tol: float = 1e-6) -> mx.array:
    """Geometric median of the rows of x [N,D] by Weiszfeld's algorithm (float32)."""
    x = x.astype(mx.float32)
    m = mx.mean(x, axis=0)
    for _ in range(iters):
        w = 1.0 / mx.maximum(mx.linalg.norm(x - m, axis=-1), eps)
        new = mx.sum(w[:, None] * x, axis=0) / mx.sum(w)
        shift = mx.linalg.norm(new - m).item()
        m = new
        if shift <= tol * max(1.0, mx.linalg.norm(m).item()):
            break
    return m


def estimate_input_scale(batches: Iterable[mx.array], d_in: int) -> float:
    """SAELens ``expected_average_only_in``: s = sqrt(d_in) / E||x|| over the given batches."""
    total, n = 0.0, 0
    for x in batches:
        total += mx.sum(mx.linalg.norm(x.astype(mx.float32), axis=-1)).item()
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


# ---------------------------------------------------------------------------------------------------
# the per-architecture math
# ---------------------------------------------------------------------------------------------------


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


def train_forward(sae: SAE, x: mx.array, dead: mx.array, sparsity_scale: mx.array,
                  kernels: StepKernels | None = None, use_dead: bool = True):
    """The training-time forward of one batch: (loss, (metrics dict, fired [F] bool, extras)).

    x [B,D] already normalised. ``dead`` [F] bool marks dead latents (AuxK / ghost grads);
    ``sparsity_scale`` in [0,1] is the sparsity warm-up factor. ``extras`` holds the BatchTopK minimum kept
    value. ``use_dead=False`` skips the dead-latent losses entirely (valid while fewer tokens than the dead
    window have been seen, when no latent can be dead).
    """
    kernels = kernels if kernels is not None else StepKernels("reference")
    cfg = sae.cfg
    arch = cfg.architecture
    B = x.shape[0]
    pre = kernels.encode_pre(x, sae.W_enc, sae.b_enc, sae.b_dec if cfg.apply_b_dec_to_input else None)
    zero = mx.array(0.0)
    extras = {}
    sparsity = zero
    aux = zero
    f = None
    fused_topk = arch == "topk" and kernels.fused_topk
    if fused_topk:
        # the fully fused path (CUDA / Metal / the sparse CPU ops): sparse encoder backward, AuxK included,
        # never a dense [B,F] gradient (AuxK normalised by the global batch's variance on N ranks)
        x_hat, vals, idx, aux = kernels.topk_forward(sae, x, dead, use_dead)
    else:
        vals = idx = None
    if arch == "topk":
        if not fused_topk:
            vals, idx = kernels.topk_select(pre, cfg.k)
            x_hat = kernels.topk_decode(vals, idx, sae.W_dec, sae.b_dec)
        # bookkeeping from the sparse latents, never a dense [B,F]
        v = mx.stop_gradient(vals)
        active = (v > 0).astype(mx.float32)
        fired = mx.zeros((sae.d_sae,), dtype=mx.float32).at[idx.reshape(-1)].add(active.reshape(-1)) > 0
        l0 = mx.sum(active) / B
        l1 = mx.sum(v) / B
    elif arch == "batchtopk":
        f, cut = kernels.batchtopk_mask(mx.maximum(pre, 0), cfg.k)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        extras["min_kept"] = mx.min(mx.where(f > 0, mx.stop_gradient(f), mx.inf))
    elif arch == "relu":
        f = mx.maximum(pre, 0)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        dec_norm = mx.linalg.norm(sae.W_dec, axis=-1)
        sparsity = cfg.l1_coefficient * sparsity_scale * mx.mean(mx.sum(f * dec_norm, axis=-1))
    elif arch == "jumprelu":
        f = kernels.jumprelu(pre, sae.threshold, cfg.jumprelu_bandwidth)
        x_hat = kernels.dense_decode(f, sae.W_dec, sae.b_dec)
        l0_ste = mx.mean(mx.sum(kernels.heaviside(pre, sae.threshold, cfg.jumprelu_bandwidth), axis=-1))
        sparsity = cfg.l0_coefficient * sparsity_scale * l0_ste
    else:  # pragma: no cover - SAEConfig validates
        raise ValueError(arch)
    mse = M.mse(x, x_hat)
    if use_dead and arch in TOPK_FAMILY and cfg.aux_k_coefficient > 0 and not fused_topk:
        n_dead = mx.sum(dead)
        aux = mx.where(n_dead > 0, _auxk_loss(pre, x, x_hat, sae.W_dec, dead, cfg.resolved_aux_k, kernels), 0.0)
        aux = cfg.aux_k_coefficient * aux
    elif use_dead and arch == "relu" and cfg.ghost_grads:
        n_dead = mx.sum(dead)
        aux = mx.where(n_dead > 0, _ghost_grad_loss(pre, x, x_hat, sae.W_dec, dead), 0.0)
    loss = mse + sparsity + aux
    if f is not None:
        fs = mx.stop_gradient(f)
        l0 = M.l0(fs)
        l1 = M.l1_magnitude(fs)
        fired = mx.any(fs > 0, axis=0)
    metrics = {
        M.LOSS: loss,
        M.MSE: mse,
        M.FVU: M.fvu(x, mx.stop_gradient(x_hat)),
        M.L0: l0,
        M.L0_SPARSITY: l0 / sae.d_sae,
        M.L1_MAGNITUDE: l1,
        M.SPARSITY_LOSS: sparsity,
        M.AUX_LOSS: aux,
    }
    return loss, (metrics, fired, extras)


# ---------------------------------------------------------------------------------------------------
# the trainer of one SAE
# ---------------------------------------------------------------------------------------------------


def _where_into(tree: dict, old: dict, ok: mx.array) -> None:
    """tree[k] = where(ok, tree[k], old[k]) recursively, in place (the compiled step's captured containers)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _where_into(v, old[k], ok)
        elif isinstance(v, mx.array):
            tree[k] = mx.where(ok, v, old[k])


class SAETrainer:
    """One SAE, its optimizer and its on-device bookkeeping; ``step(x)`` runs one compiled update.

    Inputs to ``step`` are raw activations [B, d_in]; the trainer applies the input scale itself.
    ``world`` (``distributed.World`` of size > 1): ``step`` takes this rank's slice of the global batch and
    the step reduces gradients, metrics and dead-latent counters over the ranks (see ``distributed``).
    """

    def __init__(self, cfg: SAEConfig, sae: SAE | None = None, kernels: str | None = None,
                 world: D.World | None = None):
        if cfg.d_in <= 0:
            raise ValueError("SAETrainer needs cfg.d_in > 0 (train_saes fills it in from the activation source).")
        self.cfg = cfg
        self.world = world if world is not None and world.distributed else None
        #: what the step computes with (the step all_sums the gradients before the update, so on N ranks the
        #: fused forward and update run unchanged; only the batch-wide statistics become global)
        self.kernels = StepKernels(kernels if kernels is not None else cfg.kernels, self.world)
        #: the fused ops object whose passes run the update (None: the per-op reference update)
        self.fused_ops = self.kernels.ops
        #: what runs the step: "reference", or the fused back end ("cuda", "metal", "cpu")
        self.kernels_name = self.fused_ops.name if self.fused_ops is not None else "reference"
        #: the update in the back end's fused passes (GPU kernels; see ``fused_update``), else MLX's Adam
        self.fused_update = self.fused_ops is not None and self.fused_ops.fused_optimizer
        #: dtype of the large gradients in a data-parallel all_sum (``SAEConfig.grad_reduce_dtype`` resolved)
        lowp = self.fused_ops is not None and self.fused_ops.lowp_backward
        self.grad_reduce_dtype = (("bfloat16" if lowp else "float32") if cfg.grad_reduce_dtype == "auto"
                                  else cfg.grad_reduce_dtype)
        self.sae = sae if sae is not None else SAE(cfg)
        #: fused update only: run the Adam passes one parameter at a time after the step (lower peak memory,
        #: two more synchronisations per step); by default when the parameters take more than 2 GB
        self.low_memory = 4 * sum(v.size for _, v in tree_flatten(self.sae.trainable_parameters())) > 2e9
        self._fresh = sae is None  # b_dec is initialised from data only for a new SAE
        self.optimizer = optim.Adam(
            learning_rate=lr_schedule(cfg), betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
            bias_correction=True,
        )
        self.input_scale = 1.0
        F = self.sae.d_sae
        self.aux = {
            "step": mx.array(0, dtype=mx.int32),
            "tokens_since_fired": mx.zeros((F,), dtype=mx.int64),
            "theta": mx.array(-1.0, dtype=mx.float32),  # BatchTopK running threshold; < 0 = unset
            "bad_step": mx.array(-1, dtype=mx.int32),
            "sums": {k: mx.array(0.0, dtype=mx.float32) for k in M.TRAIN_KEYS},
            "count": mx.array(0, dtype=mx.int32),
        }
        self.initialized = False
        self._step_fns = None
        self._host_step = 0  # mirrors aux["step"] without a device sync

    # -- setup ------------------------------------------------------------------------------------------
    def initialize(self, first_batch: mx.array, input_scale: float = 1.0) -> None:
        """Input scale, b_dec init from the first (scaled) batch, optimizer state, compiled step."""
        self.input_scale = float(input_scale)
        if self.world is not None:
            first_batch = self.world.gather_rows(first_batch)  # b_dec from the global first batch
        x = first_batch.astype(mx.float32) * self.input_scale
        if not self._fresh:
            pass  # continue training the given SAE as it is
        elif self.cfg.b_dec_init == "geometric_median":
            self.sae.b_dec = geometric_median(x)
        elif self.cfg.b_dec_init == "mean":
            self.sae.b_dec = mx.mean(x, axis=0)
        if self.world is not None:
            self.sae.update(self.world.broadcast(self.sae.parameters()))  # identical start on every rank
        self.optimizer.init(self.sae.trainable_parameters())
        mx.eval(self.sae.parameters(), self.optimizer.state)
        self.initialized = True
        self._build()

    def _state(self):
        return [self.sae.state, self.optimizer.state, self.aux]

    def _build(self):
        cfg = self.cfg
        unit_norm = cfg.resolved_decoder_unit_norm
        window = cfg.dead_tokens_window
        warm = cfg.sparsity_warmup_steps
        scale = self.input_scale
        self._step_fns = {use: self._make_step(use, unit_norm, window, warm, scale) for use in (False, True)}

    def _make_step(self, use_dead: bool, unit_norm: bool, window: int, warm: int, scale: float):
        cfg = self.cfg
        sae, opt, aux, kernels, world = self.sae, self.optimizer, self.aux, self.kernels, self.world
        fused_ops = self.fused_ops if self.fused_update else None
        low_memory = fused_ops is not None and self.low_memory
        reduce_dtype = self.grad_reduce_dtype
        lr_fn = lr_schedule(cfg)
        loss_and_grad = nn.value_and_grad(
            sae, lambda x, dead, sp: train_forward(sae, x, dead, sp, kernels, use_dead=use_dead))

        @partial(mx.compile, inputs=self._state(), outputs=self._state())
        def step(x_raw):
            x = x_raw.astype(mx.float32) * scale
            B = x.shape[0]
            step_i = aux["step"]
            sp = mx.minimum((step_i + 1).astype(mx.float32) / warm, 1.0) if warm > 0 else mx.array(1.0)
            dead = aux["tokens_since_fired"] >= window
            (loss, (mets, fired, extras)), grads = loss_and_grad(x, dead, sp)
            deferred = None
            if world is not None:  # all_sums: averaged gradients, global metrics / fired mask / FVU
                loss, mets, fired, grads = world.reduce_step(x, loss, mets, fired, grads, reduce_dtype)
                B = B * world.size
                if "min_kept" in extras:
                    extras["min_kept"] = world.global_min(extras["min_kept"])
            old_aux = (aux["tokens_since_fired"], aux["theta"], aux["step"])
            old_sae = old_opt = None
            if fused_ops is not None:
                # the fused passes: clip and the non-finite guard folded into Adam's hyper-parameters,
                # projection and renorm in the decoder's own pass; a skipped step changes nothing
                params = dict(sae.trainable_parameters())
                grads, hp, gnorm, lr, ok = update_hparams(
                    params, grads, opt.state, lr_fn, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                    clip=cfg.grad_clip_norm, unit_norm=unit_norm, ops=fused_ops,
                    ok=mx.isfinite(loss) & (aux["bad_step"] < 0))
                if low_memory:
                    deferred = (grads, hp)  # the passes run after this step, one parameter at a time
                else:
                    sae.update({name: adam_pass(name, params[name], g, opt.state, hp, unit_norm=unit_norm,
                                                ops=fused_ops) for name, g in grads.items()})
            else:
                old_sae = tree_map(lambda a: a, sae.parameters())
                old_opt = tree_map(lambda a: a, opt.state)
                if unit_norm:
                    W = sae.W_dec
                    g = grads["W_dec"]
                    grads["W_dec"] = g - mx.sum(g * W, axis=-1, keepdims=True) * W
                if cfg.grad_clip_norm > 0:
                    grads, gnorm = optim.clip_grad_norm(grads, cfg.grad_clip_norm)
                else:
                    gnorm = mx.sqrt(sum(mx.sum(mx.square(v)) for _, v in tree_flatten(grads)))
                opt.update(sae, grads)
                lr = opt.learning_rate.astype(mx.float32)  # the rate this update used
                if unit_norm:
                    W = sae.W_dec
                    sae.W_dec = W / (mx.linalg.norm(W, axis=-1, keepdims=True) + 1e-8)
                # A non-finite loss or gradient skips the update (and every later one until the host reads
                # the flag): the state stays exactly as before the bad step.
                ok = mx.isfinite(loss) & mx.isfinite(gnorm) & (aux["bad_step"] < 0)
            if cfg.architecture == "jumprelu" and deferred is None:
                sae.threshold = mx.maximum(sae.threshold, 0.0)
            tsf = mx.where(fired, 0, aux["tokens_since_fired"] + B)
            aux["tokens_since_fired"] = tsf
            theta = aux["theta"]
            if cfg.architecture == "batchtopk":
                mn = extras["min_kept"]
                r = cfg.batchtopk_threshold_lr
                new = mx.where(theta < 0, mn, (1 - r) * theta + r * mn)
                theta = mx.where(mx.isfinite(mn), new, theta)
                aux["theta"] = theta
                thr_metric = mx.maximum(theta, 0.0)
            elif cfg.architecture == "jumprelu":
                thr_metric = mx.mean(sae.threshold)
            else:
                thr_metric = mx.array(0.0)
            mets = dict(mets)
            mets[M.EXPLAINED_VARIANCE] = 1.0 - mets[M.FVU]
            mets[M.DEAD_FRACTION] = mx.mean((tsf >= window).astype(mx.float32))
            mets[M.GRAD_NORM] = gnorm
            mets[M.LR] = lr
            mets[M.THRESHOLD] = thr_metric
            sums = aux["sums"]
            for k in M.TRAIN_KEYS:
                sums[k] = sums[k] + mets[k].astype(mx.float32)
            aux["count"] = aux["count"] + 1
            aux["bad_step"] = mx.where((aux["bad_step"] < 0) & ~ok, step_i, aux["bad_step"])
            aux["step"] = step_i + 1
            if old_sae is not None:
                sae.update(tree_map(lambda new, old: mx.where(ok, new, old), sae.parameters(), old_sae))
                _where_into(opt.state, old_opt, ok)
            aux["tokens_since_fired"] = mx.where(ok, aux["tokens_since_fired"], old_aux[0])
            aux["theta"] = mx.where(ok, aux["theta"], old_aux[1])
            aux["step"] = mx.where(ok, aux["step"], old_aux[2])
            return deferred if deferred is not None else ()

        return step

    def _deferred_update(self, grads: dict[str, mx.array], hp: mx.array) -> None:
        """``low_memory``: the fused Adam passes after the compiled step, largest parameter first, each
        evaluated before the next, so that the old and new (p, m, v) of only one parameter coexist (a
        custom kernel cannot update in place). Two more synchronisations per step."""
        mx.eval(grads, hp, self._state())
        params = dict(self.sae.trainable_parameters())
        unit_norm = self.cfg.resolved_decoder_unit_norm
        for name in sorted(grads, key=lambda n: -grads[n].size):
            new = adam_pass(name, params.pop(name), grads.pop(name), self.optimizer.state, hp, unit_norm=unit_norm,
                            ops=self.fused_ops)
            if name == "threshold" and self.cfg.architecture == "jumprelu":
                new = mx.maximum(new, 0.0)
            self.sae.update({name: new})
            mx.eval(new, self.optimizer.state[name])

    # -- running ----------------------------------------------------------------------------------------
    def step(self, x: mx.array) -> None:
        """One update on a raw batch x [B, d_in] (lazy: evaluate with ``mx.eval(trainer.state_arrays())``)."""
        if not self.initialized:
            self.initialize(x, 1.0)
        if x.ndim != 2 or x.shape[1] != self.sae.d_in:
            raise ValueError(f"Training batch has shape {tuple(x.shape)}; expected [B, {self.sae.d_in}].")
        # No latent can be dead before dead_tokens_window tokens were seen: skip the dead-latent losses then.
        n_ranks = self.world.size if self.world is not None else 1
        use_dead = self._host_step * x.shape[0] * n_ranks >= self.cfg.dead_tokens_window
        deferred = self._step_fns[use_dead](x)
        if deferred:
            self._deferred_update(*deferred)
        self._host_step += 1

    def state_arrays(self):
        return self._state()

    @property
    def step_count(self) -> int:
        return int(self.aux["step"].item())

    def has_non_finite_step(self) -> bool:
        """Whether a step since the last metrics read was non-finite (and skipped); one host read."""
        return int(self.aux["bad_step"].item()) >= 0

    def read_metrics(self) -> dict[str, float]:
        """Averages of the metrics since the last read (one host sync); raises on a non-finite loss."""
        packed = mx.concatenate([mx.stack([self.aux["sums"][k] for k in M.TRAIN_KEYS]),
                                 mx.stack([self.aux["count"], self.aux["bad_step"]]).astype(mx.float32)])
        values = packed.tolist()  # one device read
        count, bad = int(values[-2]), int(values[-1])
        if bad >= 0:
            # The compiled step skipped every update from step ``bad`` on: the state is the one before it.
            for k in M.TRAIN_KEYS:
                self.aux["sums"][k] = mx.array(0.0, dtype=mx.float32)
            self.aux["count"] = mx.array(0, dtype=mx.int32)
            self.aux["bad_step"] = mx.array(-1, dtype=mx.int32)
            self._host_step = int(self.aux["step"].item())
            raise NonFiniteLossError(
                f"SAE training on {self.cfg.hook_name or 'the activations'} hit a non-finite loss or gradient at "
                f"step {bad} (0-based). That update and any later ones were skipped, so the trainer state is the "
                f"one from before step {bad} (the last good one). Usual causes: a learning rate too high (lr = "
                f"{self.cfg.lr}), unnormalised inputs with huge norms (normalize_activations = "
                f"{self.cfg.normalize_activations!r}), NaN/inf in the activations themselves (check the model and "
                f"hook), or a sparsity coefficient that collapses the latents."
            )
        out = {k: (v / count if count else float("nan")) for k, v in zip(M.TRAIN_KEYS, values)}
        for k in M.TRAIN_KEYS:
            self.aux["sums"][k] = mx.array(0.0, dtype=mx.float32)
        self.aux["count"] = mx.array(0, dtype=mx.int32)
        return out

    def finalize(self) -> SAE:
        """The trained SAE, taking raw activations: BatchTopK threshold set, input scale folded. (A copy.)"""
        sae = SAE(self.cfg)
        sae.update(tree_map(lambda a: a, self.sae.parameters()))
        if self.cfg.architecture == "batchtopk":
            sae.set_batchtopk_threshold(max(float(self.aux["theta"].item()), 0.0))
        sae.fold_input_scale(self.input_scale)
        mx.eval(sae.parameters())
        return sae

    # -- checkpoint tensors -------------------------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, mx.array]:
        out = {}
        for k, v in tree_flatten(self.sae.parameters()):
            out[f"{prefix}sae.{k}"] = v
        for k, v in tree_flatten(self.optimizer.state):
            out[f"{prefix}opt.{k}"] = v
        for k, v in tree_flatten(self.aux):
            out[f"{prefix}aux.{k}"] = v
        return out

    def load_tensors(self, tensors: dict[str, mx.array], prefix: str, input_scale: float) -> None:
        def sub(p):
            return [(k[len(p):], v) for k, v in tensors.items() if k.startswith(p)]

        self.sae.update(tree_unflatten(sub(prefix + "sae.")))
        self.optimizer.state = tree_unflatten(sub(prefix + "opt."))
        aux = tree_unflatten(sub(prefix + "aux."))
        self.aux.clear()
        self.aux.update(aux)
        self.input_scale = float(input_scale)
        self.initialized = True
        mx.eval(self.sae.parameters(), self.optimizer.state, self.aux)
        self._host_step = int(self.aux["step"].item())
        self._build()


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(path: str, trainers: list[SAETrainer], source, step: int, extra: dict | None = None) -> str:
    """Write every trainer's state and the source's state to ``path``/checkpoint.safetensors atomically.

    The file is written beside its destination under a temporary name, flushed, then ``os.replace``-d,
    so a crash leaves either the previous checkpoint or the new one, never a partial file.
    """
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, mx.array] = {}
    for i, t in enumerate(trainers):
        tensors.update(t.tensors(f"t{i}."))
    src_meta = {}
    if source is not None and hasattr(source, "state_dict"):
        src_arrays, src_meta = source.state_dict()
        for k, v in src_arrays.items():
            tensors[f"source.{k}"] = mx.array(v)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "configs": [t.cfg.to_dict() for t in trainers],
        "input_scales": [t.input_scale for t in trainers],
        "source": src_meta,
        "extra": extra or {},
    }
    dest = os.path.join(path, CHECKPOINT_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp.safetensors", dir=path)  # MLX appends .safetensors otherwise
    os.close(fd)
    try:
        mx.save_safetensors(tmp, tensors, metadata={"hooked_mlx": json.dumps(meta)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def load_checkpoint(path: str) -> tuple[dict[str, mx.array], dict]:
    f = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FileNotFoundError(f"No checkpoint at {f}; train with checkpoint_path set to create one.")
    check_safetensors(f)
    tensors, metadata = mx.load(f, return_metadata=True)
    if "hooked_mlx" not in metadata:
        raise CorruptFileError(f"{f} is a safetensors file but not a hooked_mlx training checkpoint (no "
                               f"'hooked_mlx' metadata). Point checkpoint_path at a folder written by train_saes.")
    return tensors, json.loads(metadata["hooked_mlx"])


def check_checkpoint_path(path: str | None, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint file in folder ``path`` (None without one), checked before any work: ``path`` may not
    be a file, and a checkpoint already there is continued (``resume``) or replaced (``overwrite``), never
    silently overwritten."""
    if not path:
        return None
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"checkpoint_path {path} is a file; expected a folder for {CHECKPOINT_FILE}. "
                                f"Choose a folder path.")
    f = os.path.join(path, CHECKPOINT_FILE)
    if os.path.exists(f) and not resume and not overwrite:
        step = load_checkpoint(f)[1].get("step", "?")
        raise OutputExistsError(
            f"{f} already holds a training checkpoint (step {step}) from an earlier run. Pass resume=True "
            f"(--resume) to continue it, overwrite=True (--overwrite) to start again and replace it, or choose "
            f"another checkpoint folder."
        )
    return f


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------


def _check_configs(cfgs: list[SAEConfig]):
    shared = ("train_batch_size_tokens", "training_tokens", "log_every_steps", "checkpoint_every_steps",
              "context_size", "seed")
    for c in cfgs[1:]:
        for name in shared:
            if getattr(c, name) != getattr(cfgs[0], name):
                raise ValueError(
                    f"SAEs trained together from one source must share {name}: {getattr(cfgs[0], name)!r} "
                    f"({cfgs[0].hook_name}) vs {getattr(c, name)!r} ({c.hook_name})."
                )
    names = [c.hook_name for c in cfgs]
    if len(set(names)) != len(names):
        raise ValueError(f"Each SAE trained together needs its own hook_name; got {names}.")


def _wandb_run(cfg: SAEConfig, cfgs):
    if not cfg.wandb_project:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            f"SAEConfig.wandb_project = {cfg.wandb_project!r} needs the `wandb` package: `pip install wandb` "
            f"(and `wandb login`), or leave wandb_project empty to train without it."
        ) from e
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                      config={c.hook_name: c.to_dict() for c in cfgs})


class TrainResult(dict):
    """hook name -> trained SAE (raw-activation units), plus ``history``: list of (step, hook, metrics)."""

    history: list


def train_saes(
    cfgs: SAEConfig | list[SAEConfig],
    source,
    *,
    checkpoint_path: str | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    kernels: str | None = None,
    world: D.World | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train one SAE per config from one activation source and return {hook_name: SAE}.

    ``source`` yields training batches: ``source.next_batch()`` -> {hook_name: [B, d_in]} with B =
    ``train_batch_size_tokens`` (``ActivationStore``, ``ShardSource``, ``ArraySource``). It also provides
    ``d_in(hook)`` and ``describe()``, and ``state_dict()`` / ``load_state_dict()`` for exact resume.

    ``checkpoint_path``: a folder; a checkpoint is written there every ``checkpoint_every_steps`` steps and
    at the end. ``resume=True`` continues from it (if present) and ends with the same parameters as an
    uninterrupted run. A checkpoint already there is refused unless ``resume`` or ``overwrite``. Only
    finite states are checkpointed: a non-finite step raises ``NonFiniteLossError`` naming the last good
    checkpoint (left untouched) to resume from. ``callback(step, {hook: metrics})`` runs after every metrics read (on every rank).

    ``world``: the process group (default: ``distributed.world()``, of size 1 unless launched with
    ``mlx.launch``). With several ranks the source is sharded (each rank takes its slice of every global
    batch of ``train_batch_size_tokens``), the steps are data-parallel, and rank 0 prints and writes the
    checkpoints; see ``hooked_mlx.sae.distributed``.
    """
    cfgs = [cfgs] if isinstance(cfgs, SAEConfig) else list(cfgs)
    if not cfgs:
        raise ValueError("train_saes needs at least one SAEConfig.")
    ckpt_file = check_checkpoint_path(checkpoint_path, resume, overwrite)
    resolved = []
    for c in cfgs:
        hook = c.hook_name
        if not hook:
            hooks = source.hook_names
            if len(cfgs) == 1 and len(hooks) == 1:
                hook = hooks[0]
            else:
                raise ValueError("SAEConfig.hook_name is empty; set it to one of the source's hooks "
                                 f"{source.hook_names}.")
        if hook not in source.hook_names:
            raise ValueError(f"SAEConfig.hook_name {hook!r} is not produced by the source; it yields "
                             f"{source.hook_names}.")
        d_in = source.d_in(hook)
        if c.d_in and c.d_in != d_in:
            raise ValueError(f"SAEConfig.d_in = {c.d_in} but the activations at {hook} have width {d_in}.")
        resolved.append(c.replace(hook_name=hook, d_in=d_in))
    cfgs = resolved
    _check_configs(cfgs)
    c0 = cfgs[0]
    B = c0.train_batch_size_tokens
    total = c0.total_steps
    w = world if world is not None else D.world()
    out = sys.stderr if w.is_main else open(os.devnull, "w")  # closed below
    if w.distributed:
        w.local_rows(B)
        D.shard_source(source, w)
        progress = progress and w.is_main
    trainers = [SAETrainer(c, kernels=kernels, world=w) for c in cfgs]
    start = 0
    if resume and ckpt_file and os.path.exists(ckpt_file):
        tensors, meta = load_checkpoint(ckpt_file)
        saved = [SAEConfig.from_dict(d) for d in meta["configs"]]
        # the kernels and the all_sum dtype say how a step runs: a run may resume on another back end or world
        saved = [s.replace(kernels=c.kernels, grad_reduce_dtype=c.grad_reduce_dtype) for s, c in zip(saved, cfgs)]
        if [s.to_dict() for s in saved] != [c.to_dict() for c in cfgs]:
            diffs = [(k, a.to_dict()[k], b.to_dict()[k]) for a, b in zip(saved, cfgs) for k in a.to_dict()
                     if a.to_dict()[k] != b.to_dict()[k]]
            raise ValueError(f"Cannot resume from {ckpt_file}: the configs differ (field, saved, now): {diffs[:8]}")
        D.check_resume_world(meta, source, w, ckpt_file, out)
        for i, t in enumerate(trainers):
            t.load_tensors(tensors, f"t{i}.", meta["input_scales"][i])
        if hasattr(source, "load_state_dict"):
            D.load_source_state(source, tensors, meta, w)
        start = int(meta["step"])
        print(f"Resuming from {ckpt_file} at step {start} of {total}.", file=out)
    elif resume and ckpt_file:
        print(f"No checkpoint in {checkpoint_path} yet: starting a new run.", file=out)
    elif ckpt_file and os.path.exists(ckpt_file):
        print(f"Note: starting a new run (overwrite=True); the checkpoint in {checkpoint_path} will be replaced.",
              file=out)
    desc = ", ".join(f"{c.hook_name}: {c.architecture} d_in={c.d_in} d_sae={c.resolved_d_sae}" for c in cfgs)
    print(
        f"Training {len(cfgs)} SAE(s) [{desc}] on {c0.training_tokens:,} tokens ({total} steps of {B}); "
        f"data: {source.describe()}",
        file=out,
    )
    if not trainers[0].initialized:
        scales = [1.0] * len(cfgs)
        need = [i for i, c in enumerate(cfgs) if c.normalize_activations == "expected_average_only_in"]
        if need:
            n_batches = max(1, math.ceil(c0.norm_estimation_tokens / B))
            est = [source.next_batch() for _ in range(n_batches)]
            for i in need:
                scales[i] = estimate_input_scale([w.gather_rows(b[cfgs[i].hook_name]) for b in est], cfgs[i].d_in)
            del est
    run = _wandb_run(c0, cfgs) if w.is_main else None

    last_good = [start if start > 0 else None]  # the step of the checkpoint on disk written or resumed by this run

    def checkpoint(done):
        mx.eval([t.state_arrays() for t in trainers])
        for t in trainers:  # only a finite state is written: a bad step raises here and keeps the last good file
            if t.has_non_finite_step():
                t.read_metrics()
        if not w.distributed:
            save_checkpoint(checkpoint_path, trainers, source, done)
            last_good[0] = done
            return
        src = D.gathered_source_state(source, w)  # collective: every rank takes part
        if w.is_main:
            save_checkpoint(checkpoint_path, trainers, src, done, extra={"world_size": w.size})
        last_good[0] = done

    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total * B, initial=start * B, unit="tok", unit_scale=True, file=out, dynamic_ncols=True,
                   desc="train-sae")
    t0, tok0 = time.perf_counter(), start * B
    completed, in_step = start, False
    try:
        for step in range(start, total):
            in_step = True
            batch = source.next_batch()
            for t in trainers:
                x = batch[t.cfg.hook_name]
                if not t.initialized:
                    t.initialize(x, scales[trainers.index(t)])
                t.step(x)
            mx.async_eval([t.state_arrays() for t in trainers])
            done = step + 1
            completed, in_step = done, False
            if done % c0.log_every_steps == 0 or done == total:
                mets = {t.cfg.hook_name: t.read_metrics() for t in trainers}
                for h, m in mets.items():
                    history.append((done, h, m))
                if bar is not None:
                    m = mets[cfgs[0].hook_name]
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix({
                        "tok/s": f"{(done * B - tok0) / max(elapsed, 1e-9):,.0f}",
                        "loss": f"{m[M.LOSS]:.4g}", "L0": f"{m[M.L0]:.1f}", "FVU": f"{m[M.FVU]:.3f}",
                        "dead%": f"{100 * m[M.DEAD_FRACTION]:.1f}",
                    }, refresh=False)
                    bar.update(done * B - bar.n)
                if run is not None:
                    run.log({f"{h}/{k}": v for h, m in mets.items() for k, v in m.items()}, step=done)
                if callback is not None:
                    callback(done, mets)
            if ckpt_file and c0.checkpoint_every_steps and done % c0.checkpoint_every_steps == 0 and done < total:
                checkpoint(done)
        mx.eval([t.state_arrays() for t in trainers])
        if ckpt_file and total > start:
            checkpoint(total)
    except NonFiniteLossError as e:
        if not ckpt_file:
            where = "No checkpoint_path was set, so there is no checkpoint to resume from."
        elif last_good[0] is None:
            where = f"No checkpoint had been written to {ckpt_file} yet; start again with the fix."
        else:
            where = (f"The last good checkpoint, {ckpt_file} (step {last_good[0]}), is untouched: resume from it "
                     f"with resume=True (--resume) once the cause is fixed.")
        raise NonFiniteLossError(f"{e} {where}") from None
    except KeyboardInterrupt:
        # Ctrl-C between two steps leaves a consistent state: keep it, so that resume=True goes on from here.
        # (not with several ranks: writing it needs every rank, and they may not all have been interrupted)
        if (ckpt_file and not in_step and completed > start and not w.distributed
                and not any(t.has_non_finite_step() for t in trainers)):
            mx.eval([t.state_arrays() for t in trainers])
            save_checkpoint(checkpoint_path, trainers, source, completed)
            print(f"\nInterrupted: checkpoint at step {completed} written to {ckpt_file}; resume=True "
                  f"(--resume) continues from it.", file=out)
        raise
    finally:
        if bar is not None:
            bar.close()
        if run is not None:
            run.finish()
        if out is not sys.stderr:
            out.close()
    result = TrainResult({t.cfg.hook_name: t.finalize() for t in trainers})
    result.history = history
    result.trainers = trainers
    return result


def train_sae(cfg: SAEConfig, source, **kw) -> SAE:
    """Train one SAE (see ``train_saes``) and return it."""
    res = train_saes(cfg, source, **kw)
    sae = next(iter(res.values()))
    sae.history = [m for _, _, m in res.history]
    return sae
