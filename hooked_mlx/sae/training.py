"""SAE training: the loop that drives one trainer per hook point from one activation source.

``train_saes`` feeds every trainer from one model forward, with a tqdm bar, optional W&B, atomic checkpoints
and exact resume; ``train_sae`` is the one-SAE form. The pieces live beside it: ``forward`` (the
per-architecture math, ``train_forward``), ``trainer`` (``SAETrainer``, the compiled step), ``checkpoint``;
their public names are re-exported here.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import mlx.core as mx

from . import distributed as D
from . import metrics as M
from .checkpoint import CHECKPOINT_FILE, check_checkpoint_path, load_checkpoint, save_checkpoint
from .config import SAEConfig
from .forward import estimate_input_scale, geometric_median, lr_schedule, train_forward
from .sae import SAE
from .trainer import NonFiniteLossError, SAETrainer

__all__ = ["CHECKPOINT_FILE", "NonFiniteLossError", "SAETrainer", "TrainResult", "check_checkpoint_path",
           "estimate_input_scale", "geometric_median", "load_checkpoint", "lr_schedule", "save_checkpoint",
           "train_forward", "train_sae", "train_saes"]


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
    """hook name -> trained SAE (raw-activation units), plus ``history``: list of (step, hook, metrics), and
    ``trainers``: the ``SAETrainer`` of each SAE (its state, optimizer included)."""

    history: list
    trainers: list


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
        out_fields = {}
        if c.hook_name_out and c.hook_name_out != hook:  # a transcoder: its targets come from the same source
            if c.hook_name_out not in source.hook_names:
                raise ValueError(f"The transcoder's hook_name_out {c.hook_name_out!r} is not produced by the "
                                 f"source; it yields {source.hook_names}. Give the source both hooks.")
            d_out = source.d_in(c.hook_name_out)
            if c.d_out and c.d_out != d_out:
                raise ValueError(f"SAEConfig.d_out = {c.d_out} but the activations at {c.hook_name_out} have "
                                 f"width {d_out}.")
            out_fields = {"d_out": d_out}
        resolved.append(c.replace(hook_name=hook, d_in=d_in, **out_fields))
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
                target = batch[t.cfg.hook_name_out] if t.cfg.is_transcoder else None
                if not t.initialized:
                    t.initialize(x, scales[trainers.index(t)], target)
                t.step(x, target)
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
        if (ckpt_file and checkpoint_path and not in_step and completed > start and not w.distributed
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
