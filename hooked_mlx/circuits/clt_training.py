"""Training cross-layer transcoders with the SAE engine's kernels and streaming.

``train_clt(cfg, source, n_layers=L)`` trains one ``CrossLayerTranscoder``: layer l's encoder reads
``blocks.l.{hook_in}`` and its features write to the MLP outputs ``blocks.t.hook_mlp_out`` of every layer t >= l.
All 2L hooks come from one streamed forward per batch (``sae.ActivationStore``). The loss is the mean over layers
of each layer's fraction of variance unexplained.

* TopK (``cfg.k`` per token and layer) runs on the SAE engine's ops (``sae.kernels``: the device's top-k selection
  and the sparse decode, whose backward touches only the kept latents), with AuxK (``aux_k``,
  ``aux_k_coefficient``, ``dead_tokens_window``): per source layer the ``aux_k`` largest dead features decode into
  every later layer, fitting each layer's residual.
* JumpReLU uses the engine's straight-through threshold gradients and adds ``l0_coefficient`` times the mean
  fraction of features active per token and layer (ramped over ``sparsity_warmup_steps``).

The step is compiled, with Adam, a linear warm-up and global gradient-norm clipping. Checkpoints are atomic, hold
only finite states, and resume exactly (parameters, Adam state, step, dead-feature counters and the source's
position). ``save_clt`` writes circuit-tracer's CLT layout, which ``load_transcoders`` (and circuit-tracer) read.

``cfg`` is an ``SAEConfig`` for the shared settings: ``architecture`` (topk / jumprelu), ``k``, ``l0_coefficient``,
``jumprelu_bandwidth``, ``jumprelu_init_threshold``, ``d_sae`` (features per layer; or ``expansion_factor``
x d_model), ``lr``, ``lr_warmup_steps``, ``adam_beta1/2``, ``adam_eps``, ``grad_clip_norm``,
``train_batch_size_tokens``, ``training_tokens``, ``log_every_steps``, ``checkpoint_every_steps``, ``seed``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_unflatten

from ..host import flat_items, to_float, to_int
from ..outputs import check_output_dir, write_file_atomic, write_text_atomic
from ..sae import distributed as D
from ..sae.checkpoint import load_checkpoint, write_checkpoint
from ..sae.config import SAEConfig
from ..sae.forward import lr_schedule
from ..sae.kernels import fused as FU
from .transcoders import HOOK_INS, HOOK_OUT, CrossLayerTranscoder

CHECKPOINT = "clt_checkpoint.safetensors"


class CLTModule(nn.Module):
    """The trainable CLT: ``W_enc`` [L, d, F], ``b_enc`` [L, F], ``W_dec_l`` [F, (L-l) * d] (layer l's decoder rows
    to layers l..L-1, flattened: one decode per source layer), ``b_dec`` [L, d], and for a JumpReLU CLT
    ``threshold`` [L, F]."""

    def __init__(self, n_layers: int, d_model: int, d_transcoder: int, seed: int = 0,
                 init_threshold: float | None = None):
        super().__init__()
        L, d, F = n_layers, d_model, d_transcoder
        k1, k2 = mx.random.split(mx.random.key(seed))
        self.W_enc = mx.random.normal((L, d, F), key=k1) / d**0.5
        self.b_enc = mx.zeros((L, F))
        keys = mx.random.split(k2, L)
        # decoder rows start small, scaled by the number of source layers writing to each output
        self.W_dec = [mx.random.normal((F, (L - layer) * d), key=keys[layer]) / (F**0.5 * (layer + 1)) for layer in
                      range(L)]
        self.b_dec = mx.zeros((L, d))
        if init_threshold is not None:
            self.threshold = mx.full((L, F), float(init_threshold))
        self.n_layers, self.d_model, self.d_transcoder = L, d, F

    def __call__(self, xs: list[mx.array], k: int, bandwidth: float = 0.05, dead: mx.array | None = None,
                 k_aux: int = 0):
        """(outs, counts, l0_ste, fired, aux_outs): per layer the prediction [B, d] of the MLP output from the
        features of layers <= it; each layer's active-feature count per token [B]; (JumpReLU) the straight-through
        L0 summed over layers, mean over tokens (0 for TopK); per layer the features that fired [F] (bool); and
        with ``dead`` [L, F] (TopK's AuxK) per layer what the ``k_aux`` largest dead features of every layer <= it
        decode to (else None). TopK: the device's top-k and the sparse decode; JumpReLU: dense features."""
        L, d, F = self.n_layers, self.d_model, self.d_transcoder
        outs = [mx.broadcast_to(self.b_dec[t], xs[0].shape) for t in range(L)]
        aux_outs = [mx.zeros(xs[0].shape) for _ in range(L)] if dead is not None else None
        counts, fired = [], []
        l0_ste = mx.array(0.0)
        for layer in range(L):
            pre = xs[layer] @ self.W_enc[layer] + self.b_enc[layer]
            if "threshold" in self:
                f = FU.jumprelu(pre, self.threshold[layer], bandwidth)
                y = f @ self.W_dec[layer]
                active = mx.stop_gradient(f) > 0
                counts.append(mx.sum(active, axis=-1))
                fired.append(mx.any(active, axis=0))
                l0_ste = l0_ste + mx.mean(mx.sum(FU.heaviside(pre, self.threshold[layer], bandwidth), axis=-1))
            else:
                vals, idx = FU.topk_select(pre, k)
                y = FU.sparse_decode(vals, idx, self.W_dec[layer])  # [B, (L - layer) * d]
                active = mx.stop_gradient(vals) > 0
                counts.append(mx.sum(active, axis=-1))
                fired.append(mx.zeros((F,)).at[idx.reshape(-1)].add(active.reshape(-1).astype(mx.float32)) > 0)
                if aux_outs is not None and dead is not None:
                    va, ia = FU.topk_select(mx.where(dead[layer], pre, -mx.inf), k_aux)  # (live picks are 0)
                    ya = FU.sparse_decode(va, ia, self.W_dec[layer])
                    for j, t in enumerate(range(layer, L)):
                        aux_outs[t] = aux_outs[t] + ya[:, j * d:(j + 1) * d]
            for j, t in enumerate(range(layer, L)):
                outs[t] = outs[t] + y[:, j * d:(j + 1) * d]
        return outs, counts, l0_ste, fired, aux_outs

    def to_clt(self, hook_in: str, k: int) -> CrossLayerTranscoder:
        L, d, F = self.n_layers, self.d_model, self.d_transcoder
        return CrossLayerTranscoder(W_enc=[self.W_enc[layer] for layer in range(L)], b_enc=self.b_enc,
                                    W_dec=[w.reshape(F, L - layer, d) for layer, w in enumerate(self.W_dec)],
                                    b_dec_=self.b_dec, threshold=self.threshold if "threshold" in self else None,
                                    hook_in=hook_in, k=None if "threshold" in self else k)


class CLTTrainer:
    """The CLT, its Adam state and its compiled step."""

    def __init__(self, cfg: SAEConfig, n_layers: int, d_model: int, hook_in: str = HOOK_INS[0],
                 world: D.World | None = None):
        # a CLT keeps the k largest per token (TopK) or learns per-feature thresholds (JumpReLU)
        if not (cfg.arch.selection == "row" or cfg.arch.threshold == "learned"):
            raise ValueError(f"Cross-layer transcoders train with architecture 'topk' or 'jumprelu'; got "
                             f"{cfg.architecture!r}.")
        if hook_in not in HOOK_INS:
            raise ValueError(f"hook_in {hook_in!r}; a CLT reads one of {HOOK_INS}.")
        self.cfg, self.hook_in = cfg, hook_in
        #: data-parallel ranks: each steps on its slice of the global batch; gradients and statistics are summed
        self.world = world if world is not None and world.distributed else None
        F = cfg.d_sae or int(cfg.expansion_factor * d_model)
        self.module = CLTModule(n_layers, d_model, F, seed=cfg.seed, init_threshold=cfg.jumprelu_init_threshold
                                if cfg.arch.threshold == "learned" else None)
        self.optimizer = optim.Adam(learning_rate=lr_schedule(cfg), betas=[cfg.adam_beta1, cfg.adam_beta2],
                                    eps=cfg.adam_eps, bias_correction=True)
        self.optimizer.init(self.module.trainable_parameters())
        self.step_count = 0
        self.sums = {"loss": mx.array(0.0), "fvu": mx.array(0.0), "fvu_last": mx.array(0.0), "l0": mx.array(0.0),
                     "aux": mx.array(0.0), "count": mx.array(0), "step": mx.array(0),
                     # tokens since each feature last fired (AuxK's dead features: >= dead_tokens_window)
                     "tsf": mx.zeros((n_layers, F), dtype=mx.int64)}
        self._steps: dict[bool, Any] = {}

    def state(self):
        return [self.module.state, self.optimizer.state, self.sums]

    def _build(self, use_dead: bool):
        cfg, module, opt = self.cfg, self.module, self.optimizer
        L, k = module.n_layers, cfg.k
        warm = cfg.sparsity_warmup_steps
        jump = cfg.arch.threshold == "learned"
        aux_on = use_dead and not jump and cfg.aux_k_coefficient > 0
        k_aux = min(cfg.aux_k or max(1, module.d_model // 2), module.d_transcoder)
        w = self.world
        n_ranks = w.size if w is not None else 1

        group = w if w is not None else D.World()  # (one rank: the global statistics are the local ones)
        all_sum = group.all_sum

        def loss_fn(xs, ys, sp, variances, dead):
            # the global batch's loss, this rank's part: its squared errors over the global variances (and its
            # share of the mean L0), so that the ranks' gradients sum to the global batch's gradient
            outs, counts, l0_ste, fired, aux_outs = module(xs, k, cfg.jumprelu_bandwidth, dead if aux_on else None,
                                                           k_aux)
            fvus = [mx.sum(mx.square(y - o)) / v for y, o, v in zip(ys, outs, variances)]
            fvu = sum(fvus) / L
            sparsity = cfg.l0_coefficient * sp * l0_ste / (L * module.d_transcoder * n_ranks) if jump else 0.0
            aux = mx.array(0.0)
            if aux_outs is not None:
                # AuxK (Gao et al. 2024), per output layer: the dead features model the residual, normalised by
                # the residual's global variance
                es = [mx.stop_gradient(y - o) for y, o in zip(ys, outs)]
                ves = [mx.maximum(v, 1e-12) for v in group.total_variances(es)]
                aux = sum(mx.sum(mx.square(e - a)) / v for e, a, v in zip(es, aux_outs, ves)) / L
                aux = cfg.aux_k_coefficient * mx.where(mx.any(dead), aux, 0.0)
            return fvu + sparsity + aux, (fvu, fvus, counts, fired, aux)

        grad_fn = nn.value_and_grad(module, loss_fn)
        B_global = cfg.train_batch_size_tokens

        def step(xs, ys):
            s = self.sums
            sp = mx.minimum((s["step"] + 1).astype(mx.float32) / warm, 1.0) if warm > 0 else mx.array(1.0)
            variances = [mx.maximum(v, 1e-12) for v in group.total_variances(ys)]
            dead = s["tsf"] >= cfg.dead_tokens_window
            (loss, (fvu, fvus, counts, fired, aux)), grads = grad_fn(xs, ys, sp, variances, dead)
            fired_all = mx.stack(fired)  # [L, F]
            if w is not None:
                grads = tree_map(w.all_sum, grads)
                loss, fvu, last, aux = (all_sum(v) for v in (loss, fvu, fvus[-1], aux))
                fired_all = all_sum(fired_all.astype(mx.float32)) > 0
            else:
                last = fvus[-1]
            if cfg.grad_clip_norm > 0:
                grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip_norm)
            opt.update(module, grads)
            if jump:
                module.threshold = mx.maximum(module.threshold, 0.0)
            s["tsf"] = mx.where(fired_all, 0, s["tsf"] + B_global)
            s["loss"] = s["loss"] + loss
            s["fvu"] = s["fvu"] + fvu
            s["fvu_last"] = s["fvu_last"] + last
            s["aux"] = s["aux"] + aux
            s["l0"] = s["l0"] + all_sum(sum(mx.mean(c.astype(mx.float32)) for c in counts) / L) / n_ranks
            s["count"] = s["count"] + 1
            s["step"] = s["step"] + 1
            return loss

        return mx.compile(step, inputs=self.state(), outputs=self.state())

    def step(self, xs: list[mx.array], ys: list[mx.array]) -> mx.array:
        """One update on per-layer inputs xs[l] [B, d] and targets ys[l] [B, d] (lazy; ``mx.eval(trainer.state())``)."""
        if self.step_count == 0:  # a new CLT: each layer's b_dec starts at its first (global) batch's mean output
            gather = self.world.gather_rows if self.world is not None else (lambda a: a)
            self.module.b_dec = mx.stack([mx.mean(gather(y.astype(mx.float32)), axis=0) for y in ys])
            mx.eval(self.module.parameters())
        # no feature can be dead before dead_tokens_window tokens were seen: the AuxK pass is skipped until then
        use_dead = self.step_count * self.cfg.train_batch_size_tokens >= self.cfg.dead_tokens_window
        if use_dead not in self._steps:
            self._steps[use_dead] = self._build(use_dead)
        loss = self._steps[use_dead]([x.astype(mx.float32) for x in xs], [y.astype(mx.float32) for y in ys])
        self.step_count += 1
        return loss

    def read_metrics(self) -> dict[str, float]:
        """Means since the last read: loss, mean per-layer FVU, the last layer's FVU, L0 per layer, the AuxK loss;
        and the fraction of features now dead."""
        s = self.sums
        n = max(1, to_int(s["count"]))
        out = {"loss": to_float(s["loss"]) / n, "fvu": to_float(s["fvu"]) / n,
               "fvu_last_layer": to_float(s["fvu_last"]) / n, "l0": to_float(s["l0"]) / n,
               "aux_loss": to_float(s["aux"]) / n,
               "dead_fraction": to_float(mx.mean((s["tsf"] >= self.cfg.dead_tokens_window).astype(mx.float32)))}
        if not all(v == v and abs(v) != float("inf") for v in out.values()):
            raise FloatingPointError(f"CLT training became non-finite at step {self.step_count}: {out}.")
        for key in ("loss", "fvu", "fvu_last", "l0", "aux"):
            s[key] = mx.array(0.0)
        s["count"] = mx.array(0)
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, mx.array]:
        out = {f"param.{k}": v for k, v in flat_items(self.module.parameters())}
        out.update({f"opt.{k}": v for k, v in flat_items(self.optimizer.state)})
        out["aux.tsf"] = self.sums["tsf"]
        return out

    def load_tensors(self, tensors: dict[str, mx.array], step: int) -> None:
        self.module.update(tree_unflatten([(k[len("param."):], v) for k, v in tensors.items()
                                           if k.startswith("param.")]))
        self.optimizer.state = tree_unflatten([(k[len("opt."):], v) for k, v in tensors.items()
                                               if k.startswith("opt.")])
        self.step_count = step
        self.sums["step"] = mx.array(step)  # (the sparsity warm-up reads it)
        self.sums["tsf"] = tensors["aux.tsf"]
        self._steps = {}
        mx.eval(self.state())


def _save_checkpoint(path: str, trainer: CLTTrainer, source, step: int) -> None:
    """Collective with several ranks (the per-rank source states are gathered); rank 0 writes, atomically."""
    loss = to_float(trainer.sums["loss"])
    if not loss == loss or abs(loss) == float("inf"):  # (every rank: the sums are global)
        raise FloatingPointError(f"CLT training became non-finite before step {step}; the checkpoint in {path} "
                                 f"(if any) is the last good one and is left untouched.")
    w = trainer.world
    if w is not None:
        source = D.gathered_source_state(source, w)
        if not w.is_main:
            return
    meta = {"step": step, "config": trainer.cfg.to_dict(), "hook_in": trainer.hook_in,
            "n_layers": trainer.module.n_layers, "extra": {"world_size": w.size if w is not None else 1}}
    write_checkpoint(path, trainer.tensors(), meta, source, CHECKPOINT)


def train_clt(cfg: SAEConfig, source, *, n_layers: int, hook_in: str = HOOK_INS[0], checkpoint_path: str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True,
              callback: Callable[[int, dict], None] | None = None, world: D.World | None = None
              ) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder (see the module doc) on ``source`` (``ActivationStore`` or any source
    yielding {hook: [B, d]} for ``blocks.l.{hook_in}`` and ``blocks.l.hook_mlp_out``, l < ``n_layers``).
    ``checkpoint_path``: a folder; a checkpoint is written there every ``checkpoint_every_steps`` steps and at the
    end; ``resume=True`` continues from it with the same result as an uninterrupted run. An existing checkpoint
    is refused unless ``resume`` or ``overwrite``.

    ``world`` (default ``sae.distributed.world()``: several ranks under ``mlx.launch``): each rank takes its slice
    of every global batch of ``train_batch_size_tokens``; the loss uses the global batch's variances, the
    gradients are summed over the ranks, and rank 0 writes the checkpoints, as in ``train_saes``."""
    ins = [f"blocks.{layer}.{hook_in}" for layer in range(n_layers)]
    outs = [f"blocks.{layer}.{HOOK_OUT}" for layer in range(n_layers)]
    missing = [h for h in ins + outs if h not in source.hook_names]
    if missing:
        raise ValueError(f"The source does not produce {missing[:4]}{' ...' if len(missing) > 4 else ''}; a CLT over "
                         f"{n_layers} layers needs every layer's {hook_in} and {HOOK_OUT}.")
    w = world if world is not None else D.world()
    if w.distributed:
        w.local_rows(cfg.train_batch_size_tokens)
        D.shard_source(source, w)
        progress = progress and w.is_main
    d = source.d_in(ins[0])
    trainer = CLTTrainer(cfg, n_layers, d, hook_in, world=w)
    ckpt = os.path.join(checkpoint_path, CHECKPOINT) if checkpoint_path else None
    start = 0
    if ckpt and os.path.exists(ckpt):
        if resume:
            tensors, meta = load_checkpoint(ckpt)
            if meta["config"] != cfg.to_dict() or meta["hook_in"] != hook_in or meta["n_layers"] != n_layers:
                raise ValueError(f"Cannot resume from {ckpt}: it was written for another configuration.")
            D.check_resume_world(meta, source, w, ckpt, sys.stderr)
            start = int(meta["step"])
            trainer.load_tensors(tensors, start)
            if hasattr(source, "load_state_dict"):
                D.load_source_state(source, tensors, meta, w)
        elif not overwrite:
            raise FileExistsError(f"{ckpt} exists: pass resume=True to continue it or overwrite=True to replace it.")
    total = cfg.total_steps
    t0 = time.perf_counter()
    for step in range(start, total):
        batch = source.next_batch()
        trainer.step([batch[h] for h in ins], [batch[h] for h in outs])
        mx.async_eval(trainer.state())
        done = step + 1
        if done % cfg.log_every_steps == 0 or done == total:
            m = trainer.read_metrics()
            if progress:
                rate = (done - start) * cfg.train_batch_size_tokens / max(time.perf_counter() - t0, 1e-9)
                print(f"clt step {done}/{total}: FVU {m['fvu']:.4f} (last layer {m['fvu_last_layer']:.4f}), "
                      f"L0 {m['l0']:.1f}, {rate:,.0f} tok/s", flush=True)
            if callback is not None:
                callback(done, m)
        if ckpt and cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0 and done < total:
            mx.eval(trainer.state())
            _save_checkpoint(checkpoint_path, trainer, source, done)  # type: ignore[arg-type]
    mx.eval(trainer.state())
    if ckpt and total > start:
        _save_checkpoint(checkpoint_path, trainer, source, total)  # type: ignore[arg-type]
    return trainer.module.to_clt(hook_in, cfg.k)


def save_clt(clt: CrossLayerTranscoder, path: str, *, overwrite: bool = False) -> str:
    """Write ``clt`` in circuit-tracer's CLT layout: ``W_enc_{l}.safetensors`` (W_enc_l [F, d], b_enc_l, b_dec_l,
    threshold_l for a JumpReLU) and ``W_dec_{l}.safetensors`` (W_dec_l [F, L-l, d]), and a ``config.yaml``. The
    folder must be new or empty unless ``overwrite`` (which replaces only these files)."""
    check_output_dir(path, overwrite=overwrite, what="save_clt")
    for layer in range(clt.n_layers):
        enc = {f"W_enc_{layer}": clt.W_enc[layer].T, f"b_enc_{layer}": clt.b_enc[layer],
               f"b_dec_{layer}": clt.b_dec_[layer]}
        if clt.threshold is not None:
            enc[f"threshold_{layer}"] = clt.threshold[layer]
        for name, tensors in ((f"W_enc_{layer}", enc), (f"W_dec_{layer}", {f"W_dec_{layer}": clt.W_dec[layer]})):
            arrays = {k: mx.contiguous(v.astype(mx.float32)) for k, v in tensors.items()}
            write_file_atomic(os.path.join(path, f"{name}.safetensors"), partial(mx.save_safetensors, arrays=arrays),
                              overwrite=True, what="save_clt", suffix=".safetensors")
    # (a TopK CLT: ``k`` is recorded for load_transcoders; circuit-tracer, which has no TopK CLT, ignores the key)
    write_text_atomic(os.path.join(path, "config.yaml"),
                      f"model_kind: cross_layer_transcoder\nfeature_input_hook: {clt.hook_in}\n"
                      f"feature_output_hook: {HOOK_OUT}\nscan: hooked-mlx\n"
                      + (f"activation: topk\nk: {clt.k}\n" if clt.k is not None else ""), overwrite=True)
    return path
