"""Data-parallel SAE training throughput: tokens/s on 1 vs N ranks (mx.distributed), scaling efficiency.

The driver launches this file as workers with ``mlx.launch`` (NCCL on CUDA, ring on the CPU): once with 1
rank -- the anchor, measured in the same run -- and once with N ranks, at the S1 / S2 shapes of
benchmarks/sae_train.py (``--scale`` divides d_in, batch and k; default 1 on a GPU, 16 on the CPU). Each
rank keeps the shape's batch (weak scaling: global batch = N x batch; ``--strong`` keeps the global batch
and splits it). A worker times ``--steps`` compiled TopK steps (``SAETrainer`` with the world: one all_sum
per step) on synthetic activations after warm-up; rank 0 reports global tokens/s.

    python benchmarks/sae_distributed.py -n 2                           # 2 GPUs (NCCL) / 2 CPU processes
    python benchmarks/sae_distributed.py -n 2 --json benchmarks/results/sae_distributed_2gpu.json

Prints per shape: tokens/s at 1 rank, at N ranks, speed-up and efficiency = speed-up / N.
On a 2-core CPU machine the numbers only show that the path runs (2 processes share the 2 cores).
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
                    train_batch_size_tokens=local * w.size, training_tokens=10**12, lr=2e-4)
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
    if w.is_main:
        print("RESULT " + json.dumps({"shape": a.shape, "ranks": w.size, "global_batch": local * w.size, "d_in": d,
                                      "d_sae": cfg.resolved_d_sae, "k": k, "tokens_per_s": a.steps * local * w.size / dt}),
              flush=True)


def _launch(n: int, a, shape: str) -> dict:
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
           "--steps", str(a.steps), "--warmup", str(a.warmup)] + (["--strong"] if a.strong else [])
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
    p.add_argument("--strong", action="store_true", help="fixed global batch split over the ranks")
    p.add_argument("--backend", default=None, help="mlx.launch backend (default: nccl on CUDA, else ring)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="S1", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    a.gpu = mx.cuda.is_available()
    a.scale = a.scale or (1 if a.gpu else 16)
    a.steps = a.steps or (50 if a.gpu else 10)
    rows = []
    for shape in a.shapes:
        one, many = _launch(1, a, shape), _launch(a.n, a, shape)
        speedup = many["tokens_per_s"] / one["tokens_per_s"]
        rows.append({"shape": shape, "scale": a.scale, "strong": a.strong, "ranks": a.n, "one": one, "many": many,
                     "speedup": speedup, "efficiency": speedup / a.n})
        print(f"{shape} (scale {a.scale}, d_in {one['d_in']}, F {one['d_sae']}, k {one['k']}): "
              f"1 rank {one['tokens_per_s']:,.0f} tok/s, {a.n} ranks {many['tokens_per_s']:,.0f} tok/s "
              f"(global batch {many['global_batch']}): speed-up {speedup:.2f}x, efficiency {speedup / a.n:.0%}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"backend": "cuda" if a.gpu else "cpu", "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
