"""Where the default trainer's GPU step spends time and memory beyond the bare fused step (S1 / S2 shapes).

Times, in one process on one GPU, with the state evaluated every step (as benchmarks/sae_trainer.py does):
``FusedTopKStep`` (the ceiling), ``SAETrainer`` with its defaults, and the trainer with one feature changed at
a time: gradient clipping off (``grad_clip_norm=0``), the Adam passes in the step's graph or deferred
(``low_memory`` False / True). Then the pieces the trainer adds: the gradient-norm pass alone, as MLX ops and
as the back end's ``sq_norm`` kernel (time and peak memory).

    python benchmarks/profile_trainer_step.py --shapes S1 S2 --json benchmarks/results/profile_trainer_step.json

``--batches B1 B2 ...``: instead, for each shape, the default trainer and the bare fused step at each batch
size, and the back end's ops one at a time (encoder GEMM, row top-k, decode, gather_dot, latent_grads, the
Adam pass), to find a batch size whose step is out of proportion (4 GPUs, S1, 1024 rows per GPU: 19 ms)::

    python benchmarks/profile_trainer_step.py --shapes S1 --batches 512 1024 2048 4096 8192 --json ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)

# isort: split
from hooked_mlx.sae.fused_update import grad_norm
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels.gpu import GpuOps, sorted_entries
from hooked_mlx.sae.kernels.step import FusedTopKStep
import mlx.core as mx
from sae_kernels import SHAPES, init_params, lr_for, make_data, timed_ms
from sae_trainer import time_trainer


def _fresh():
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def trainer_row(s, steps, warmup, low_memory=None, **cfg_kw):
    _fresh()
    return time_trainer("topk", s["D"], s["F"], s["B"], s["K"], lr_for(s["F"]), steps, warmup, low_memory=low_memory,
                        **cfg_kw)


def fused_step_row(s, steps, warmup):
    _fresh()
    step = FusedTopKStep(init_params(s["D"], s["F"]), s["K"], lr_for(s["F"]))
    xs = make_data(s["B"], s["D"])
    for i in range(warmup):
        step(xs[i % 2])
    t0 = time.perf_counter()
    for i in range(steps):
        step(xs[i % 2])
    dt = (time.perf_counter() - t0) / steps
    out = dict(ms=1e3 * dt, peak_gb=mx.get_peak_memory() / 1e9)
    del step, xs
    return out


def norm_rows(s, reps=10):
    D, F = s["D"], s["F"]
    k = mx.random.key(3)
    g = {"W_enc": mx.random.normal((D, F), key=k), "W_dec": mx.random.normal((F, D), key=k),
         "b_enc": mx.zeros((F,)), "b_dec": mx.zeros((D,))}
    W = mx.random.normal((F, D), key=mx.random.key(4))
    mx.eval(g, W)

    out = {}
    ops = FU.get_ops()
    for name, fn in (("mlx_ops", lambda g, W: grad_norm(g, W, True, FU.ReferenceOps())),
                     (f"{ops.name}_sq_norm", lambda g, W: grad_norm(g, W, True, ops))):
        f = mx.compile(fn)
        mx.eval(f(g, W))
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        for _ in range(reps):
            v = f(g, W)
            mx.eval(v)
        out[name] = dict(ms=1e3 * (time.perf_counter() - t0) / reps,
                         extra_peak_gb=(mx.get_peak_memory() - base) / 1e9, value=float(v))
    del g, W
    return out


def _timed(fn, reps=10) -> float:
    return timed_ms(fn, reps, warmup=1)


def op_rows(s, B) -> dict:
    """ms of each op of the fused TopK step at batch B (the back end's ops, the step's operand shapes)."""
    _fresh()
    D, F, K = s["D"], s["F"], s["K"]
    ops = FU.get_ops()
    p = init_params(D, F)
    x = make_data(B, D, n=1)[0]
    W_lowp = p["W_enc"].astype(ops.matmul_dtype) if ops.matmul_dtype is not None else None
    pre = ops.pre(x, p["W_enc"], p["b_enc"], W_lowp)
    vals, idx = ops.row_topk(pre, K)
    dY = mx.random.normal((B, D), key=mx.random.key(5))
    mx.eval(pre, vals, idx, dY)
    rows = mx.repeat(mx.arange(B, dtype=mx.uint32), K)
    cols = idx.reshape(-1).astype(mx.uint32)
    coef = vals.reshape(-1)
    Yl, Xl = (dY.astype(mx.bfloat16), x.astype(mx.bfloat16)) if ops.lowp_backward else (dY, x)
    g = mx.random.normal((D, F), key=mx.random.key(6))
    m, v = mx.zeros_like(g), mx.zeros_like(g)
    hp = FU.adam_hparams(1e-4, 0.9, 0.999, 1e-8, 1)
    mx.eval(rows, g, m, v, hp)
    Wd = ops.decoder_weights(p["W_dec"])
    gd = mx.random.normal((F, D), key=mx.random.key(7))
    md, vd = mx.zeros_like(gd), mx.zeros_like(gd)
    mx.eval(Wd, gd, md, vd)
    out = {
        "pre": _timed(lambda: ops.pre(x, p["W_enc"], p["b_enc"], W_lowp)),
        "row_topk": _timed(lambda: ops.row_topk(pre, K)),
        "decoder_weights": _timed(lambda: ops.decoder_weights(p["W_dec"])),
        "decode": _timed(lambda: ops.decode(vals, idx, Wd)),
        "gather_dot": _timed(lambda: ops.gather_dot(dY, idx, Wd)),
        "latent_grads": _timed(lambda: ops.latent_grads(cols, rows, rows, coef, coef, Yl, Xl, F)),
        "sorted_entries_argsort": _timed(lambda: sorted_entries(cols, rows, rows, coef, coef, B, F)),
        "adam_W_enc": _timed(lambda: ops.adam(p["W_enc"], g, m, v, hp)),
        "adam_W_enc_lowp_copy": _timed(lambda: ops.adam(p["W_enc"], g, m, v, hp, mx.bfloat16)),
        "adam_rows_W_dec": _timed(lambda: ops.adam_rows(p["W_dec"], gd, md, vd, hp, True, True, 1e-8)),
    }
    # the same ops with each of the back end's options at its other setting (GPU back ends)
    if isinstance(ops, GpuOps):
        out["sorted_entries"] = _timed(lambda: ops.sorted_entries(cols, rows, rows, coef, coef, F))
        ops.topk_prefilter = not ops.topk_prefilter
        out[f"row_topk_prefilter_{ops.topk_prefilter}"] = _timed(lambda: ops.row_topk(pre, K))
        ops.topk_prefilter = not ops.topk_prefilter
        out["decode_fp32_W"] = _timed(lambda: ops.decode(vals, idx, p["W_dec"]))
        out["gather_dot_fp32_W"] = _timed(lambda: ops.gather_dot(dY, idx, p["W_dec"]))
        rows0 = ops.lg_rows
        for ty in (1, 2, 8):
            ops.lg_rows = ty
            out[f"latent_grads_rows{ty}"] = _timed(lambda: ops.latent_grads(cols, rows, rows, coef, coef, Yl, Xl, F))
        ops.lg_rows = rows0
    return out


def batch_main(a) -> None:
    res = {}
    for name in a.shapes:
        for B in a.batches:
            s = dict(SHAPES[name], B=B)
            row = {"B": B, "fused_step": fused_step_row(s, a.steps, a.warmup),
                   "trainer": trainer_row(s, a.steps, a.warmup), "ops_ms": op_rows(s, B)}
            res[f"{name}_B{B}"] = row
            print(name, B, json.dumps(row), flush=True)
            if a.json:
                with open(a.json, "w") as fh:
                    json.dump({"mlx": mx.__version__, "rows": res}, fh, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["S1", "S2"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--batches", nargs="*", type=int, default=None, help="batch sweep (see the docstring)")
    a = p.parse_args()
    if a.batches:
        batch_main(a)
        return
    res = {}
    for name in a.shapes:
        s = SHAPES[name]
        rows = {"fused_step": fused_step_row(s, a.steps, a.warmup),
                "trainer": trainer_row(s, a.steps, a.warmup),
                "trainer_no_clip": trainer_row(s, a.steps, a.warmup, grad_clip_norm=0.0)}
        default_lm = rows["trainer"]["low_memory"]
        rows[f"trainer_low_memory_{not default_lm}"] = trainer_row(s, a.steps, a.warmup, low_memory=not default_lm)
        rows["grad_norm"] = norm_rows(s)
        res[name] = rows
        for k, v in rows.items():
            print(name, k, json.dumps(v), flush=True)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"mlx": mx.__version__, "rows": res}, fh, indent=2)


if __name__ == "__main__":
    main()
