"""Data-parallel SAE training throughput: tokens/s on 1 vs N ranks (mx.distributed), scaling efficiency.

The driver launches this file as workers with ``mlx.launch`` (NCCL on CUDA, ring on the CPU): once with 1
rank -- the anchor, measured in the same run -- and once with N ranks, at the S1 / S2 shapes of
benchmarks/sae_train.py (``--scale`` divides d_in, batch and k; default 1 on a GPU, 16 on the CPU). Each
rank keeps the shape's batch (weak scaling: global batch = N x batch; ``--strong`` keeps the global batch
and splits it). A worker times ``--steps`` compiled TopK steps (``SAETrainer`` with the world: one all_sum
per step) on synthetic activations after warm-up; rank 0 reports global tokens/s.

    python benchmarks/sae_distributed.py -n 2                           # 2 GPUs (NCCL) / 2 CPU processes
    python benchmarks/sae_distributed.py -n 2 --json benchmarks/results/sae_distributed_2gpu.json
    python benchmarks/sae_distributed.py -n 4 --modes weak strong --reduce-dtypes float32 bfloat16 --profile \
        --json benchmarks/results/sae_distributed_4gpu.json

Prints per shape, mode (weak / strong) and gradient all_sum dtype (``SAEConfig.grad_reduce_dtype``): tokens/s
at 1 rank (one anchor per shape, the same process configuration for both modes), at N ranks, speed-up and
efficiency = speed-up / N. ``--profile``: the N-rank worker of the first mode also times the collectives of a
step in isolation (the W_enc and W_dec gradient all_sums in float32 and bfloat16, a sum_scatter + all_gather of
the same bytes, and an all_gather of the batch), so the step's communication cost can be read against its
time. On a 2-core CPU machine the numbers only show that the path runs (2 processes share the 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import hooked_mlx  # noqa: E402,F401  (BLAS before mlx.core)

# isort: split
from hooked_mlx.sae import SAEConfig, SAETrainer  # noqa: E402
from hooked_mlx.sae.distributed import world  # noqa: E402
import mlx.core as mx  # noqa: E402

SHAPES = {"S1": {"d_in": 2048, "expansion": 16, "batch": 4096, "k": 64},
          "S2": {"d_in": 4096, "expansion": 32, "batch": 4096, "k": 128}}


def worker(a) -> None:
    w = world()
    s = SHAPES[a.shape]
    d, k = s["d_in"] // a.scale, max(1, s["k"] // a.scale)
    local = s["batch"] // a.scale // (w.size if a.strong else 1)
    cfg = SAEConfig(architecture="topk", d_in=d, expansion_factor=s["expansion"], k=k,
                    train_batch_size_tokens=local * w.size, training_tokens=10**12, lr=2e-4,
                    grad_reduce_dtype=a.reduce_dtype)
    t = SAETrainer(cfg, world=w)
    key = mx.random.key(100 + w.rank)
    xs = [mx.random.normal((local, d), key=mx.random.split(key, 4)[i]) for i in range(4)]
    mx.eval(xs)
    t.initialize(xs[0])
    for i in range(a.warmup):
        t.step(xs[i % 4])
    mx.eval(t.state_arrays())
    t0 = time.perf_counter()
    for i in range(a.steps):
        t.step(xs[i % 4])
        mx.async_eval(t.state_arrays())
    mx.eval(t.state_arrays())
    dt = time.perf_counter() - t0
    comm = _profile_collectives(w, local, d, cfg.resolved_d_sae) if a.profile and w.distributed else None
    if w.is_main:
        print("RESULT " + json.dumps({"shape": a.shape, "ranks": w.size, "global_batch": local * w.size, "d_in": d,
                                      "d_sae": cfg.resolved_d_sae, "k": k, "grad_reduce_dtype": a.reduce_dtype,
                                      "step_ms": 1e3 * dt / a.steps,
                                      "tokens_per_s": a.steps * local * w.size / dt, "collectives_ms": comm}),
              flush=True)


def _profile_collectives(w, rows: int, d: int, F: int, reps: int = 5) -> dict:
    """Milliseconds of each collective a step could use, alone (mean of ``reps`` after one warm-up)."""
    g = w.group

    def timed(fn, *arrays):
        try:
            mx.eval(fn(*arrays))
        except RuntimeError:  # e.g. the ring back end has no sum_scatter
            return None
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn(*arrays))
        return 1e3 * (time.perf_counter() - t0) / reps

    key = mx.random.key(7)
    grads = [mx.random.normal((d, F), key=key), mx.random.normal((F, d), key=key)]
    x = mx.random.normal((rows, d), key=key)
    mx.eval(grads, x)
    bf = [v.astype(mx.bfloat16) for v in grads]
    mx.eval(bf)
    out = {
        "grad_bytes_fp32": sum(v.nbytes for v in grads),
        "all_sum_grads_fp32": timed(lambda *v: [mx.distributed.all_sum(u, group=g) for u in v], *grads),
        "all_sum_grads_bf16": timed(lambda *v: [mx.distributed.all_sum(u, group=g) for u in v], *bf),
        "sum_scatter_plus_all_gather_fp32": timed(
            lambda *v: [mx.distributed.all_gather(mx.distributed.sum_scatter(u, group=g), group=g) for u in v], *grads),
        "all_gather_batch_fp32": timed(lambda u: mx.distributed.all_gather(u, group=g), x),
        "all_gather_batch_bf16": timed(lambda u: mx.distributed.all_gather(u, group=g), x.astype(mx.bfloat16)),
    }
    return out


def _launch(n: int, a, shape: str, strong: bool = False, reduce_dtype: str = "auto", profile: bool = False
            ) -> dict:
    launcher = shutil.which("mlx.launch") or os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    # MLX installed without its console scripts (pip --target): the launcher's module does the same
    launch = [launcher] if os.path.exists(launcher) else [
        sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    backend = a.backend or ("nccl" if a.gpu else "ring")
    cmd = [*launch, "--backend", backend, "-n", str(n), "--starting-port", str(port), "--nccl-port", str(port),
           "--", sys.executable, os.path.abspath(__file__), "--worker", "--shape", shape, "--scale", str(a.scale),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--reduce-dtype", reduce_dtype] + (
               ["--strong"] if strong else []) + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2, help="ranks of the parallel run (the anchor is 1 rank)")
    p.add_argument("--shapes", nargs="*", default=["S1", "S2"], choices=list(SHAPES))
    p.add_argument("--scale", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", nargs="*", default=["weak"], choices=["weak", "strong"],
                   help="weak: every rank keeps the shape's batch; strong: the global batch is split over the ranks")
    p.add_argument("--reduce-dtypes", nargs="*", default=["auto"], choices=["auto", "float32", "bfloat16"],
                   help="SAEConfig.grad_reduce_dtype values to run at N ranks (default: the default, auto)")
    p.add_argument("--profile", action="store_true", help="time the step's collectives alone, too")
    p.add_argument("--backend", default=None, help="mlx.launch backend (default: nccl on CUDA, else ring)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="S1", help=argparse.SUPPRESS)
    p.add_argument("--strong", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reduce-dtype", default="auto", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    a.gpu = mx.cuda.is_available()
    a.scale = a.scale or (1 if a.gpu else 16)
    a.steps = a.steps or (50 if a.gpu else 10)
    rows = []
    for shape in a.shapes:
        one = _launch(1, a, shape)
        first = True
        for mode in a.modes:
            for dt in a.reduce_dtypes:
                many = _launch(a.n, a, shape, mode == "strong", dt, a.profile and first)
                first = False
                # weak: N x the tokens per step; strong: the same tokens per step, in less time
                speedup = many["tokens_per_s"] / one["tokens_per_s"]
                rows.append({"shape": shape, "scale": a.scale, "mode": mode, "strong": mode == "strong",
                             "grad_reduce_dtype": dt, "ranks": a.n, "one": one, "many": many,
                             "speedup": speedup, "efficiency": speedup / a.n})
                print(f"{shape} {mode} all_sum {dt} (scale {a.scale}, d_in {one['d_in']}, F {one['d_sae']}, "
                      f"k {one['k']}): 1 rank {one['tokens_per_s']:,.0f} tok/s ({one['step_ms']:.2f} ms/step), "
                      f"{a.n} ranks {many['tokens_per_s']:,.0f} tok/s ({many['step_ms']:.2f} ms/step, global batch "
                      f"{many['global_batch']}): speed-up {speedup:.2f}x, efficiency {speedup / a.n:.0%}", flush=True)
                if many.get("collectives_ms"):
                    print("  collectives alone (ms): " + json.dumps(many["collectives_ms"]), flush=True)
                if a.json:  # after every row: a run cut short keeps what it measured
                    with open(a.json, "w") as fh:
                        json.dump({"backend": "cuda" if a.gpu else "cpu", "n": a.n, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
