"""``SAETrainer``: one SAE, its Adam state and its on-device bookkeeping (tokens since each latent fired, the
BatchTopK threshold, metric accumulators), and the compiled step that updates them."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_unflatten

from ..host import flat_items, to_float, to_floats, to_int
from . import distributed as D
from . import metrics as M
from .architectures import TRAINABLE_ARCHITECTURES
from .config import RUN_TIME_NORMS, SAEConfig
from .forward import fused_path, geometric_median, lr_schedule, train_forward
from .fused_update import adam_pass, adam_passes, update_hparams
from .sae import SAE
from .step_kernels import StepKernels


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or inf; the update was skipped, the state is the last good one."""


def _where_into(tree: dict, old: dict, ok: mx.array) -> None:
    """tree[k] = where(ok, tree[k], old[k]) recursively, in place (the compiled step's captured containers)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _where_into(v, old[k], ok)
        elif isinstance(v, mx.array):
            tree[k] = mx.where(ok, v, old[k])


class SAETrainer:
    """One SAE, its optimizer and its on-device bookkeeping; ``step(x)`` runs one compiled update.

    Inputs to ``step`` are raw activations [B, d_in] (a transcoder's: and their targets [B, d_out]); the trainer
    applies the input scale itself.
    ``world`` (``distributed.World`` of size > 1): ``step`` takes this rank's slice of the global batch and
    the step reduces gradients, metrics and dead-latent counters over the ranks (see ``distributed``).
    """

    def __init__(self, cfg: SAEConfig, sae: SAE | None = None, kernels: str | None = None,
                 world: D.World | None = None):
        if cfg.d_in <= 0:
            raise ValueError("SAETrainer needs cfg.d_in > 0 (train_saes fills it in from the activation source).")
        if not cfg.arch.trainable:
            raise ValueError(f"SAETrainer trains {', '.join(TRAINABLE_ARCHITECTURES)} SAEs; {cfg.architecture!r} SAEs "
                             f"are loaded from files (load_saelens), spliced and evaluated, not trained here.")
        if cfg.normalize_activations in RUN_TIME_NORMS:
            raise ValueError(f"normalize_activations = {cfg.normalize_activations!r} is a SAELens run-time "
                             f"normalisation of loaded SAEs; train with 'expected_average_only_in' (folded into the "
                             f"weights at the end) or 'none'.")
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
        self.low_memory = 4 * sum(v.size for _, v in flat_items(self.sae.trainable_parameters())) > 2e9
        self._fresh = sae is None  # b_dec is initialised from data only for a new SAE
        self.optimizer = optim.Adam(
            learning_rate=lr_schedule(cfg), betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
            bias_correction=True,
        )
        self.input_scale = 1.0
        F = self.sae.d_sae
        self.aux: dict[str, Any] = {
            "step": mx.array(0, dtype=mx.int32),
            "tokens_since_fired": mx.zeros((F,), dtype=mx.int64),
            "theta": mx.array(-1.0, dtype=mx.float32),  # BatchTopK running threshold; < 0 = unset
            "bad_step": mx.array(-1, dtype=mx.int32),
            "sums": {k: mx.array(0.0, dtype=mx.float32) for k in M.TRAIN_KEYS},
            "count": mx.array(0, dtype=mx.int32),
        }
        #: low-precision copies of parameters that the fused forward reads (the GPU back ends' bf16 W_enc and W_dec),
        #: written by the Adam passes, so no step casts them; derived state, never checkpointed (rebuilt on load)
        self._lowp_dtypes = (self.kernels.lowp_dtypes() if self.fused_update and fused_path(self.sae, self.kernels)
                             else {})
        self.lowp: dict[str, mx.array] = {}
        self.initialized = False
        self._step_fns: dict[bool, Any] = {}
        self._host_step = 0  # mirrors aux["step"] without a device sync

    # -- setup ------------------------------------------------------------------------------------------
    def initialize(self, first_batch: mx.array, input_scale: float = 1.0, first_target: mx.array | None = None
                   ) -> None:
        """Input scale, b_dec init from the first (scaled) batch (a transcoder's: from its first targets),
        optimizer state, compiled step."""
        self.input_scale = float(input_scale)
        if self.cfg.is_transcoder:
            if first_target is None:
                raise ValueError(f"A transcoder ({self.cfg.hook_name} -> {self.cfg.hook_name_out}) needs its first "
                                 f"targets too: initialize(x, scale, first_target=...).")
            first_batch = first_target
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

    def _refresh_lowp(self) -> None:
        """The low-precision copies from the current parameters (in place: the compiled step holds the dict)."""
        self.lowp.clear()
        self.lowp.update({n: getattr(self.sae, n).astype(dt) for n, dt in self._lowp_dtypes.items()})
        mx.eval(self.lowp)

    def _state(self):
        return [self.sae.state, self.optimizer.state, self.aux, self.lowp]

    def _build(self):
        self._refresh_lowp()
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
        lowp = self.lowp
        loss_and_grad = nn.value_and_grad(
            sae, lambda x, dead, sp, t: train_forward(sae, x, dead, sp, kernels, use_dead=use_dead, target=t,
                                                      lowp=lowp))

        def body(x_raw, t_raw):
            x = x_raw.astype(mx.float32) * scale
            # a transcoder's target, in the same units (the scale folds out of W_enc, W_dec, b_dec; W_skip keeps it)
            t = x if t_raw is None else t_raw.astype(mx.float32) * scale
            B = x.shape[0]
            step_i = aux["step"]
            sp = mx.minimum((step_i + 1).astype(mx.float32) / warm, 1.0) if warm > 0 else mx.array(1.0)
            dead = aux["tokens_since_fired"] >= window
            (loss, (mets, fired, extras)), grads = loss_and_grad(x, dead, sp, None if t_raw is None else t)
            deferred = None
            if world is not None:  # all_sums: averaged gradients, global metrics / fired mask / FVU
                loss, mets, fired, grads = world.reduce_step(t, loss, mets, fired, grads, reduce_dtype)
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
                    sae.update(adam_passes(params, grads, opt.state, hp, unit_norm=unit_norm, ops=fused_ops,
                                           lowp=lowp))
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
                    gnorm = mx.sqrt(sum(mx.sum(mx.square(v)) for _, v in flat_items(grads)))
                opt.update(sae, grads)
                lr = opt.learning_rate.astype(mx.float32)  # the rate this update used
                if unit_norm:
                    W = sae.W_dec
                    sae.W_dec = W / (mx.linalg.norm(W, axis=-1, keepdims=True) + 1e-8)
                # A non-finite loss or gradient skips the update (and every later one until the host reads
                # the flag): the state stays exactly as before the bad step.
                ok = mx.isfinite(loss) & mx.isfinite(gnorm) & (aux["bad_step"] < 0)
            if cfg.arch.threshold == "learned" and deferred is None:  # a learned threshold stays >= 0
                sae.threshold = mx.maximum(sae.threshold, 0.0)
            tsf = mx.where(fired, 0, aux["tokens_since_fired"] + B)
            aux["tokens_since_fired"] = tsf
            theta = aux["theta"]
            if cfg.arch.threshold == "running":  # an EMA of each batch's smallest kept value
                mn = extras["min_kept"]
                r = cfg.batchtopk_threshold_lr
                new = mx.where(theta < 0, mn, (1 - r) * theta + r * mn)
                theta = mx.where(mx.isfinite(mn), new, theta)
                aux["theta"] = theta
                thr_metric = mx.maximum(theta, 0.0)
            elif cfg.arch.threshold == "learned":
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

        if cfg.is_transcoder:
            return mx.compile(body, inputs=self._state(), outputs=self._state())
        return mx.compile(lambda x_raw: body(x_raw, None), inputs=self._state(), outputs=self._state())

    def _deferred_update(self, grads: dict[str, mx.array], hp: mx.array) -> None:
        """``low_memory``: the fused Adam passes after the compiled step, largest parameter first, each
        evaluated before the next, so that the old and new (p, m, v) of only one parameter coexist (a
        custom kernel cannot update in place). Two more synchronisations per step."""
        mx.eval(grads, hp, self._state())
        params = dict(self.sae.trainable_parameters())
        unit_norm = self.cfg.resolved_decoder_unit_norm
        for name in sorted(grads, key=lambda n: -grads[n].size):
            new = adam_pass(name, params.pop(name), grads.pop(name), self.optimizer.state, hp, unit_norm=unit_norm,
                            ops=self.fused_ops, lowp=self.lowp)
            if name == "threshold" and self.cfg.arch.threshold == "learned":
                new = mx.maximum(new, 0.0)
            self.sae.update({name: new})
            mx.eval(new, self.optimizer.state[name], self.lowp)

    # -- running ----------------------------------------------------------------------------------------
    def step(self, x: mx.array, target: mx.array | None = None) -> None:
        """One update on a raw batch x [B, d_in] (a transcoder: and its targets [B, d_out]); lazy: evaluate with
        ``mx.eval(trainer.state_arrays())``."""
        transcoder = self.cfg.is_transcoder
        if transcoder and target is None:
            raise ValueError(f"A transcoder ({self.cfg.hook_name} -> {self.cfg.hook_name_out}) trains on (input, "
                             f"target) pairs: step(x, target).")
        if not self.initialized:
            self.initialize(x, 1.0, target)
        if x.ndim != 2 or x.shape[1] != self.sae.d_in:
            raise ValueError(f"Training batch has shape {tuple(x.shape)}; expected [B, {self.sae.d_in}].")
        if target is not None and (not transcoder or target.shape != (x.shape[0], self.sae.d_out)):
            raise ValueError(f"Training targets have shape {tuple(target.shape)}; expected [{x.shape[0]}, "
                             f"{self.sae.d_out}] for a transcoder (an SAE takes none).")
        # No latent can be dead before dead_tokens_window tokens were seen: skip the dead-latent losses then.
        n_ranks = self.world.size if self.world is not None else 1
        use_dead = self._host_step * x.shape[0] * n_ranks >= self.cfg.dead_tokens_window
        deferred = self._step_fns[use_dead](x, target) if transcoder else self._step_fns[use_dead](x)
        if deferred:
            self._deferred_update(*deferred)
        self._host_step += 1

    def state_arrays(self):
        return self._state()

    @property
    def step_count(self) -> int:
        return to_int(self.aux["step"])

    def has_non_finite_step(self) -> bool:
        """Whether a step since the last metrics read was non-finite (and skipped); one host read."""
        return to_int(self.aux["bad_step"]) >= 0

    def read_metrics(self) -> dict[str, float]:
        """Averages of the metrics since the last read (one host sync); raises on a non-finite loss."""
        packed = mx.concatenate([mx.stack([self.aux["sums"][k] for k in M.TRAIN_KEYS]),
                                 mx.stack([self.aux["count"], self.aux["bad_step"]]).astype(mx.float32)])
        values = to_floats(packed)  # one device read
        count, bad = int(values[-2]), int(values[-1])
        if bad >= 0:
            # The compiled step skipped every update from step ``bad`` on: the state is the one before it.
            for k in M.TRAIN_KEYS:
                self.aux["sums"][k] = mx.array(0.0, dtype=mx.float32)
            self.aux["count"] = mx.array(0, dtype=mx.int32)
            self.aux["bad_step"] = mx.array(-1, dtype=mx.int32)
            self._host_step = to_int(self.aux["step"])
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
        if self.cfg.arch.threshold == "running":
            sae.set_batchtopk_threshold(max(to_float(self.aux["theta"]), 0.0))
        sae.fold_input_scale(self.input_scale)
        mx.eval(sae.parameters())
        return sae

    # -- checkpoint tensors -------------------------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, mx.array]:
        out = {}
        for k, v in flat_items(self.sae.parameters()):
            out[f"{prefix}sae.{k}"] = v
        for k, v in flat_items(self.optimizer.state):
            out[f"{prefix}opt.{k}"] = v
        for k, v in flat_items(self.aux):
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
        self._host_step = to_int(self.aux["step"])
        self._build()
