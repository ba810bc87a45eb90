"""Where the default trainer's GPU step spends time and memory beyond the bare fused step (S1 / S2 shapes).

Times, in one process on one GPU, with the state evaluated every step (as benchmarks/sae_trainer.py does):
``FusedTopKStep`` (the ceiling), ``SAETrainer`` with its defaults, and the trainer with one feature changed at
a time: gradient clipping off (``grad_clip_norm=0``), the Adam passes in the step's graph or deferred
(``low_memory`` False / True). Then the pieces the trainer adds: the gradient-norm pass alone, as MLX ops and
as the back end's ``sq_norm`` kernel (time and peak memory).

    python benchmarks/profile_trainer_step.py --shapes S1 S2 --json benchmarks/results/profile_trainer_step.json
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
from hooked_mlx.sae.kernels.step import FusedTopKStep
import mlx.core as mx
from sae_kernels import SHAPES, init_params, lr_for, make_data
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["S1", "S2"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
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
