"""Does an MLX ``all_sum`` (NCCL) overlap compute on the GPU? The question behind the 4-GPU weak-scaling gap.

The data-parallel SAE step (``hooked_mlx.sae.distributed``) is compute, then the gradient all_sums, then
Adam: on 4 H200s at S1 it takes the 1-rank step plus the bf16 all_sum time. Hiding the all_sum needs it to
overlap compute. This probe times, on N ranks (NCCL), with bf16 matmuls as the compute and 8 all_sums of
[2048, 4096] bf16 blocks (the S1 W_enc gradient) as the communication:

* compute alone; the all_sums alone (default stream, and a second stream);
* both, independent (default stream; all_sums on a second stream);
* a chain where all_sum i depends on compute block i (default stream; second stream; compiled).

    python benchmarks/nccl_overlap_probe.py -n 4 --json benchmarks/results/nccl_overlap_probe_4gpu.json

Rank 0 prints milliseconds per iteration (mean of 20 after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import mlx.core as mx


def worker(out: str | None) -> None:
    g = mx.distributed.init(backend="nccl")
    s2 = mx.new_stream(mx.gpu)
    D, F, n = 2048, 32768, 8
    A = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    blocks = [mx.random.normal((D, F // n)).astype(mx.bfloat16) for _ in range(n)]
    x0 = mx.random.normal((4096, 4096)).astype(mx.bfloat16)
    mx.eval(A, blocks, x0)

    def compute(x, reps=12):
        for _ in range(reps):
            x = (x @ A) * 1e-3
        return x

    def chain(stream, x, bs):
        outs = []
        for b in bs:
            x = compute(x, 1)
            outs.append(mx.distributed.all_sum(b + x[:1, :1], stream=stream))
        return [x] + outs

    compiled_chain = mx.compile(lambda x, *bs: chain(s2, x, bs))
    cases = {
        "compute": lambda: compute(x0),
        "all_sums_default_stream": lambda: [mx.distributed.all_sum(b) for b in blocks],
        "all_sums_second_stream": lambda: [mx.distributed.all_sum(b, stream=s2) for b in blocks],
        "independent_default_stream": lambda: [compute(x0)] + [mx.distributed.all_sum(b) for b in blocks],
        "independent_all_sums_second_stream": lambda: [compute(x0)] + [
            mx.distributed.all_sum(b, stream=s2) for b in blocks],
        "chain_default_stream": lambda: chain(None, x0, blocks),
        "chain_second_stream": lambda: chain(s2, x0, blocks),
        "chain_second_stream_compiled": lambda: compiled_chain(x0, *blocks),
    }
    res = {}
    for name, fn in cases.items():
        mx.eval(fn())
        t0 = time.perf_counter()
        for _ in range(20):
            mx.eval(fn())
        res[name] = 1e3 * (time.perf_counter() - t0) / 20
        if g.rank() == 0:
            print(f"{name}: {res[name]:.2f} ms", flush=True)
    if g.rank() == 0 and out:
        with open(out, "w") as fh:
            json.dump({"ranks": g.size(), "mlx": mx.__version__, "ms": res}, fh, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.json)
        return
    cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "--backend", "nccl",
           "-n", str(a.n), "--", sys.executable, __file__, "--worker"] + (["--json", a.json] if a.json else [])
    sys.exit(subprocess.run(cmd, check=False).returncode)


if __name__ == "__main__":
    main()
