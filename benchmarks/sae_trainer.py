"""The SAE trainer a user runs (``SAETrainer`` with default settings) against the anchor trainer of its device.

CPU (this file's default there): hooked_mlx's default trainer against SAELens 6.54.12's TopK trainer step body
(``TopKTrainingSAE.training_forward_pass``, the firing bookkeeping of ``SAETrainer._train_step``, backward,
``clip_grad_norm_(1.0)``, Adam), both float32 on synthetic activations of the same shape, in interleaved
processes (hooked_mlx, SAELens, hooked_mlx, ...; the median round counts). Shapes:

    C1: d_in 576, d_sae 2304, batch 256, k 16        C2: d_in 576, d_sae 9216, batch 1024, k 32

SAELens is a benchmark-only dependency in its own venv, created by this script on first use (torch 2.13.0
CPU is on disk in the wheel cache; ``sae-lens==6.54.12`` installs beside it)::

    python benchmarks/sae_trainer.py                       # creates /work/slvenv if missing
    python benchmarks/sae_trainer.py --sl-python /path/to/venv/bin/python --rounds 5

Writes ``benchmarks/results/sae_trainer_cpu.json``: ``rows`` of {shape, impl, tokens_per_s, peak_gb, anchor,
ratio_vs_anchor} with ``impl`` = ``trainer`` for the default trainer and ``saelens`` for the anchor.

GPU (``--device gpu``, the default where MLX has CUDA or Metal): in one process, at S1 (d_in 2048, d_sae
32768, batch 4096, k 64) and S2 (d_in 4096, d_sae 131072, batch 4096, k 128): ``SAETrainer`` with default
settings (``trainer``; TopK, and BatchTopK at S1 as ``trainer_batchtopk``), the library's bare fused step
(``fused_step``: ``hooked_mlx.sae.kernels.step.FusedTopKStep``, no clipping, metrics or guard) and
sparsify 1.3.3's TopK step (the anchor; benchmarks/sae_kernels.py's ``bench_sparsify``). Writes
``benchmarks/results/sae_trainer_<gpu>.json`` (e.g. ``sae_trainer_h200.json``)::

    python benchmarks/sae_trainer.py --device gpu --json benchmarks/results/sae_trainer_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # the checkout's hooked_mlx, installed or not
SHAPES = {"C1": dict(D=576, F=2304, B=256, K=16), "C2": dict(D=576, F=9216, B=1024, K=32)}
SL_VERSION = "6.54.12"
TORCH_VERSION = "2.13.0"
DEFAULT_SL_VENV = "/work/slvenv"
BACK_ENDS = ("cpu-mlx",)  # --also values run as the default trainer with HOOKED_MLX_SAE_KERNELS set

# ---------------------------------------------------------------------------------------------------
# SAELens worker (runs under the SAELens venv's python; must not import hooked_mlx)
# ---------------------------------------------------------------------------------------------------
SL_WORKER = r"""
import json, resource, sys, time
import torch
from sae_lens.saes.sae import TrainStepInput
import sae_lens

D, F, B, K, steps, warmup, threads = (int(a) for a in sys.argv[1:8])
if sys.argv[8] == "batchtopk":
    from sae_lens import BatchTopKTrainingSAE as TopKTrainingSAE, BatchTopKTrainingSAEConfig as TopKTrainingSAEConfig
else:
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, dtype="float32", device="cpu")
sae = TopKTrainingSAE(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999))
coefficients = {n: (c.value if hasattr(c, "value") else float(c)) for n, c in sae.get_coefficients().items()}
since_fired = torch.zeros(F)
act_freq = torch.zeros(F)
xs = [torch.randn(B, D) for _ in range(4)]

def step(i):
    # SAELens 6 SAETrainer._train_step, without the lr / coefficient schedulers and logging
    out = sae.training_forward_pass(step_input=TrainStepInput(
        sae_in=xs[i % 4], coefficients=coefficients, dead_neuron_mask=since_fired > 1000,
        n_training_steps=i, is_logging_step=False))
    with torch.no_grad():
        firing = out.feature_acts.bool().float()
        did_fire = firing.sum(-2).bool()
        if did_fire.is_sparse:
            did_fire = did_fire.to_dense()
        since_fired.add_(1)
        since_fired[did_fire] = 0
        act_freq.add_(firing.sum(0) if not firing.is_sparse else firing.sum(0).to_dense())
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return out.loss

for i in range(warmup):
    step(i)
t0 = time.perf_counter()
for i in range(steps):
    loss = step(warmup + i)
float(loss)
dt = (time.perf_counter() - t0) / steps
print(json.dumps(dict(ms=dt * 1e3, tokens_per_s=B / dt, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      loss=float(loss), torch=torch.__version__, threads=torch.get_num_threads(),
                      sae_lens=sae_lens.__version__)))
"""

def ensure_sl_venv(python: str) -> str:
    if os.path.exists(python):
        return python
    venv = os.path.dirname(os.path.dirname(python))
    print(f"creating the SAELens venv at {venv} (torch=={TORCH_VERSION} CPU, sae-lens=={SL_VERSION}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}", f"sae-lens=={SL_VERSION}"],
                   check=True)
    return python


def run_worker(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_trainer(arch, D, F, B, K, lr, steps, warmup, kernels=None, low_memory=None, **cfg_kw) -> dict:
    """``SAETrainer`` as a user builds it (``kernels`` None: the default) on synthetic activations: ms per
    step with the state evaluated every step, tokens/s, peak memory (MLX's; the process's RSS on the CPU).
    ``low_memory`` / ``cfg_kw``: one trainer setting or config field changed (benchmarks/profile_trainer_step.py)."""
    import gc
    import resource

    import hooked_mlx  # noqa: F401
    from hooked_mlx.sae import SAEConfig, SAETrainer
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=F, k=K, lr=lr, train_batch_size_tokens=B,
                    normalize_activations="none", hook_name="h", b_dec_init="mean", **cfg_kw)
    t = SAETrainer(cfg) if kernels is None else SAETrainer(cfg, kernels=kernels)
    if low_memory is not None:
        t.low_memory = low_memory
    xs = [mx.random.normal((B, D), key=mx.random.key(i)) for i in range(2)]
    mx.eval(xs)
    t.initialize(xs[0])
    for i in range(warmup):
        t.step(xs[i % 2])
        mx.eval(t.state_arrays())
    t0 = time.perf_counter()
    for i in range(steps):
        t.step(xs[i % 2])
        mx.eval(t.state_arrays())
    dt = (time.perf_counter() - t0) / steps
    m = t.read_metrics()
    peak = mx.get_peak_memory() / 1e9
    if mx.default_device() == mx.cpu:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out = dict(ms=dt * 1e3, tokens_per_s=B / dt, peak_gb=peak, loss=m["loss"], kernels=t.kernels_name,
               mlx=mx.__version__, low_memory=t.low_memory)
    del t, xs
    gc.collect()
    mx.clear_cache()
    return out


def _gpu_time_fused_step(D, F, B, K, lr, steps, warmup):
    import gc

    import hooked_mlx  # noqa: F401
    from hooked_mlx.sae.kernels.step import FusedTopKStep
    import mlx.core as mx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sae_kernels import init_params, make_data

    mx.clear_cache()
    mx.reset_peak_memory()
    step = FusedTopKStep(init_params(D, F), K, lr)
    xs = make_data(B, D)
    for i in range(warmup):
        step(xs[i % 2])
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(xs[i % 2])
    dt = (time.perf_counter() - t0) / steps
    out = dict(ms=dt * 1e3, tokens_per_s=B / dt, peak_gb=mx.get_peak_memory() / 1e9, loss=float(loss))
    del step, xs
    gc.collect()
    mx.clear_cache()
    return out


def gpu_main(a) -> int:
    import hooked_mlx  # noqa: F401
    import mlx.core as mx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sae_kernels import SHAPES as KSHAPES
    from sae_kernels import bench_sparsify, lr_for

    rows, detail = [], {}
    for name in a.gpu_shapes:
        s = KSHAPES[name]
        D, F, B, K = s["D"], s["F"], s["B"], s["K"]
        res = {}
        for impl in a.gpu_impls:
            if impl == "trainer_batchtopk" and name != "S1":
                continue
            try:
                if impl == "sparsify":
                    res[impl] = bench_sparsify(s, a.steps, a.warmup)
                elif impl == "fused_step":
                    res[impl] = _gpu_time_fused_step(D, F, B, K, lr_for(F), a.steps, a.warmup)
                else:
                    arch = "batchtopk" if impl == "trainer_batchtopk" else "topk"
                    res[impl] = time_trainer(arch, D, F, B, K, lr_for(F), a.steps, a.warmup)
            except Exception as e:  # record it and go on to the next implementation
                res[impl] = {"error": f"{type(e).__name__}: {e}"}
            r = res[impl]
            print(f"{name} {impl:18s} " + (f"{r['ms']:8.2f} ms/step {r['tokens_per_s']:>10,.0f} tok/s "
                                           f"peak {r['peak_gb']:.2f} GB" if "ms" in r else r["error"]), flush=True)
        anchor = res.get("sparsify", {}).get("tokens_per_s")
        shape = f"{name} (d_in {D}, d_sae {F}, batch {B}, k {K})"
        for impl, r in res.items():
            if "tokens_per_s" not in r:
                continue
            rows.append(dict(shape=shape, impl=impl, tokens_per_s=round(r["tokens_per_s"], 1),
                             peak_gb=round(r["peak_gb"], 3), anchor="sparsify 1.3.3 TopK step",
                             ratio_vs_anchor=round(r["tokens_per_s"] / anchor, 3) if anchor else None))
        detail[name] = res
    meta = dict(device=a.device_name or "gpu", mlx=mx.__version__, python=platform.python_version(),
                command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), date=time.strftime("%Y-%m-%d"),
                steps=a.steps, warmup=a.warmup, tf32=os.environ.get("MLX_ENABLE_TF32", "1 (default)"))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json + ".tmp", "w") as fh:
        json.dump(dict(meta=meta, rows=rows, runs=detail), fh, indent=2)
    os.replace(a.json + ".tmp", a.json)
    print(f"wrote {a.json}")
    return 0


def mlx_worker(args: list[str]) -> int:
    """One interleaved CPU round of the default (or a named) trainer: D F B K steps warmup kernels arch."""
    D, F, B, K, steps, warmup = (int(a) for a in args[:6])
    kernels = None if args[6] == "default" else args[6]
    print(json.dumps(time_trainer(args[7], D, F, B, K, 2e-4, steps, warmup, kernels)))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--mlx-worker"]:
        return mlx_worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: gpu where MLX has one")
    ap.add_argument("--gpu-shapes", nargs="*", default=["S1", "S2"])
    ap.add_argument("--gpu-impls", nargs="*", default=["sparsify", "trainer", "fused_step", "trainer_batchtopk"],
                    help="GPU: what to time (trainer_batchtopk at S1 only); without sparsify there is no ratio")
    ap.add_argument("--device-name", default=os.environ.get("GPU_NAME", ""), help="recorded in the JSON")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median counts)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for SAELens")
    ap.add_argument("--arch", choices=["topk", "batchtopk"], default="topk",
                    help="CPU: the architecture on both sides (SAELens's TopKTrainingSAE or BatchTopKTrainingSAE)")
    ap.add_argument("--sl-python", default=os.environ.get("SL_PYTHON", f"{DEFAULT_SL_VENV}/bin/python"))
    ap.add_argument("--also", nargs="*", default=[],
                    help="extra hooked_mlx trainers to time: a kernels value (e.g. reference) or a CPU back end of "
                         "the default kernels (cpu-mlx: the pure-MLX CPU ops instead of the native ones)")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "sae_trainer_cpu.json"))
    a = ap.parse_args(argv)
    if a.device is None:
        import hooked_mlx  # noqa: F401
        import mlx.core as mx

        a.device = "gpu" if (mx.cuda.is_available() or mx.metal.is_available()) else "cpu"
    if a.device == "gpu":
        if a.json.endswith("sae_trainer_cpu.json"):
            a.json = a.json.replace("sae_trainer_cpu.json", "sae_trainer_gpu.json")
        return gpu_main(a)
    sl = ensure_sl_venv(a.sl_python)
    rows, detail = [], {}
    for name in a.shapes:
        s = SHAPES[name]
        dims = [str(s["D"]), str(s["F"]), str(s["B"]), str(s["K"]), str(a.steps), str(a.warmup)]
        me = [sys.executable, os.path.abspath(__file__), "--mlx-worker"]
        impls = {"trainer": [*me, *dims, "default", a.arch],
                 "saelens": [sl, "-c", SL_WORKER, *dims, str(a.threads), a.arch]}
        envs: dict[str, dict] = {}
        for k in a.also:
            if k in BACK_ENDS:  # the default trainer on another back end of the "auto" kernels
                impls[f"trainer[{k}]"] = [*me, *dims, "default", a.arch]
                envs[f"trainer[{k}]"] = {**os.environ, "HOOKED_MLX_SAE_KERNELS": k}
            else:
                impls[f"trainer[{k}]"] = [*me, *dims, k, a.arch]
        runs: dict[str, list[dict]] = {k: [] for k in impls}
        for r in range(a.rounds):
            for impl, cmd in impls.items():
                res = run_worker(cmd, envs.get(impl))
                runs[impl].append(res)
                print(f"{name} round {r} {impl:18s} {res['ms']:8.2f} ms/step {res['tokens_per_s']:>10,.0f} tok/s",
                      flush=True)
        med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in runs.items()}
        arch = "" if a.arch == "topk" else " BatchTopK"
        shape = f"{name}{arch} (d_in {s['D']}, d_sae {s['F']}, batch {s['B']}, k {s['K']})"
        for impl in impls:
            rows.append(dict(shape=shape, impl=impl, tokens_per_s=round(med[impl], 1),
                             peak_gb=round(max(x["peak_gb"] for x in runs[impl]), 3), anchor="saelens",
                             ratio_vs_anchor=round(med[impl] / med["saelens"], 3)))
            print(f"{shape} {impl:18s} {med[impl]:>10,.0f} tok/s  {med[impl] / med['saelens']:.2f}x SAELens")
        detail[name] = runs
    meta = dict(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                python=platform.python_version(), command=" ".join([os.path.basename(sys.argv[0]), *argv]),
                date=time.strftime("%Y-%m-%d"), rounds=a.rounds, steps=a.steps, warmup=a.warmup,
                sae_lens=SL_VERSION, torch=TORCH_VERSION, torch_threads=a.threads, arch=a.arch)
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    tmp = a.json + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(meta=meta, rows=rows, runs=detail), fh, indent=2)
    os.replace(tmp, a.json)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
