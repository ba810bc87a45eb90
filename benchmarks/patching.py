"""Full ``resid_pre`` activation-patching sweep: hooked_mlx vs TransformerLens, same weights, same CPU.

    python benchmarks/patching.py                       # both configurations
    python benchmarks/patching.py --configs small --repeats 5
    TL_PYTHON=/path/to/tl-venv/bin/python python benchmarks/patching.py

TransformerLens is a benchmark-only dependency in its own venv (never a project dependency):
    python3 -m venv /work/tlvenv && /work/tlvenv/bin/pip install torch==2.13.0 transformer-lens==2.16.1 \
        datasets==3.6.0 pyarrow==18.1.0 "numpy<2"

For each configuration, a worker in the TL venv builds a Hugging Face ``LlamaForCausalLM`` with random
weights (seeded), saves it (HF layout), converts it with TL's ``convert_llama_weights`` into a
``HookedTransformer`` built from a ``HookedTransformerConfig`` (no weight processing), and times
``get_act_patch_resid_pre`` (one forward per cell: TL's algorithm) with torch on the same number of threads
as there are cores. This process then loads the same saved weights with ``HookedTransformer.from_pretrained``
and times ``hooked_mlx.patching.get_act_patch_resid_pre`` (batched; float32), checks that both grids agree,
and prints ms per cell and the ratio. Both sides run interleaved (TL sweep, hooked_mlx sweep, ...) after a
warm-up each; a timing is the best of ``--repeats`` runs (robust to other load on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from anchor_worker import AnchorWorker

CONFIGS = {
    # 5 layers x d 64 x 16 tokens (stories260K-like shapes)
    "small": dict(n_layers=5, d_model=64, n_heads=8, n_kv_heads=4, d_mlp=172, vocab=512, n_tokens=16),
    # 8 layers x d 512 x 32 tokens (Llama-style vocabulary)
    "large": dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=4, d_mlp=1376, vocab=32000, n_tokens=32),
}


# --------------------------------------------------------------------------------------------------
# TransformerLens worker (runs under the TL venv's python; must not import hooked_mlx)
# --------------------------------------------------------------------------------------------------
def tl_worker(cfg: dict, out_dir: Path, threads: int) -> None:
    import torch
    from hf_llama import build
    from transformer_lens import patching as tlp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf, model = build(cfg, out_dir)

    g = torch.Generator().manual_seed(1)
    P = cfg["n_tokens"]
    clean = torch.randint(3, cfg["vocab"], (1, P), generator=g)
    corrupted = clean.clone()
    corrupted[0, P // 4] = (clean[0, P // 4] + 7) % cfg["vocab"]  # one differing token, like an IOI name swap
    with torch.no_grad():
        hf_logits = hf(clean).logits
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    a, b = int(clean_logits[0, -1].argmax()), int(corrupted_logits[0, -1].argmax())
    if a == b:
        b = int(clean_logits[0, -1].argsort()[-2])

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    (out_dir / "tl.json").write_text(json.dumps({
        "clean": clean.tolist(), "corrupted": corrupted.tolist(), "tokens": [a, b],
        "tl_vs_hf_max_abs_logit_diff": float((clean_logits - hf_logits).abs().max()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }))
    print("ready", flush=True)
    # serve timed sweeps on request, so that the parent can interleave them with its own
    for line in sys.stdin:
        if line.strip() != "run":
            break
        with torch.no_grad():
            t = time.perf_counter()
            result = tlp.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
            dt = time.perf_counter() - t
        print(json.dumps({"time": dt, "result": result.tolist()}), flush=True)


# --------------------------------------------------------------------------------------------------
# hooked_mlx side
# --------------------------------------------------------------------------------------------------
def run_config(name: str, cfg: dict, tl_python: str, repeats: int, threads: int) -> dict:
    import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
    from hooked_mlx import HookedTransformer
    from hooked_mlx import patching as pt
    import mlx.core as mx
    import numpy as np

    with tempfile.TemporaryDirectory(prefix=f"patchbench_{name}_") as d:
        d = Path(d)
        argv = [__file__, "--worker", json.dumps(cfg), "--dir", str(d), "--threads", str(threads)]
        with AnchorWorker(tl_python, argv, d, "TransformerLens") as worker:
            tl = json.loads((d / "tl.json").read_text())
            tl_sweep = worker.run

            model = HookedTransformer.from_pretrained(d, dtype="float32")
            clean, corrupted = mx.array(tl["clean"]), mx.array(tl["corrupted"])
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
            metric = pt.LogitDiff(*tl["tokens"])
            variants = {"hm": {}, "hm_all_cells": {"skip_identical": False}}

            def hm_sweep(kw):
                t = time.perf_counter()
                res = pt.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, **kw)
                mx.eval(res)
                return time.perf_counter() - t, res

            tl_sweep()  # warm-up
            for kw in variants.values():
                hm_sweep(kw)
            times = {"tl": [], **{k: [] for k in variants}}
            results = {}
            for _ in range(repeats):  # interleaved, so that both see the same machine load
                r = tl_sweep()
                times["tl"].append(r["time"])
                results["tl"] = np.array(r["result"], dtype=np.float32)
                for k, kw in variants.items():
                    dt, res = hm_sweep(kw)
                    times[k].append(dt)
                    results[k] = np.array(res)
    cells = cfg["n_layers"] * cfg["n_tokens"]
    best = {k: min(v) for k, v in times.items()}
    return dict(name=name, cells=cells, best=best, ratio=best["tl"] / best["hm"],
                ratio_all=best["tl"] / best["hm_all_cells"],
                max_abs_diff=max(float(np.abs(results[k] - results["tl"]).max()) for k in variants),
                max_abs_value=float(np.abs(results["tl"]).max()), torch=tl["torch"], threads=tl["threads"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="small,large")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for TL")
    ap.add_argument("--tl-python", default=os.environ.get("TL_PYTHON", "/work/tlvenv/bin/python"))
    ap.add_argument("--json", default=None, help="also write the results (and run_all.py's summary rows) here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        tl_worker(json.loads(args.worker), Path(args.dir), args.threads)
        return
    if not Path(args.tl_python).exists():
        raise SystemExit(f"No TransformerLens python at {args.tl_python}; create the TL venv (see this file's "
                         f"docstring) or pass --tl-python / set TL_PYTHON.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"resid_pre patching sweep, random Llama weights, float32, CPU ({os.cpu_count()} cores, load average "
          f"{load:.1f} at start); best of {args.repeats} interleaved runs after a warm-up")
    print(f"{'config':<40} {'cells':>5} {'TL s':>7} {'TL ms/cell':>10} {'hm s':>7} {'hm ms/cell':>10} "
          f"{'ratio':>7} {'ratio*':>7} {'max|diff|':>9}")
    rows, summary = [], []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        r = run_config(name, cfg, args.tl_python, args.repeats, args.threads)
        rows.append({**r, "config": cfg})
        shape = f"{cfg['n_layers']} layers x d {cfg['d_model']} x {cfg['n_tokens']} tokens"
        summary.append({"row": f"resid_pre sweep, {shape} ({r['cells']} cells)",
                        "value": f"{1e3 * r['best']['hm'] / r['cells']:.2f} ms/cell",
                        "anchor": f"TransformerLens {1e3 * r['best']['tl'] / r['cells']:.2f} ms/cell "
                                  f"(torch {r['threads']} threads)",
                        "ratio": round(r["ratio"], 1), "goal": ">= 10x"})
        summary.append({"row": f"same, every cell run (no identity skip), {shape}",
                        "value": f"{1e3 * r['best']['hm_all_cells'] / r['cells']:.2f} ms/cell",
                        "anchor": f"TransformerLens {1e3 * r['best']['tl'] / r['cells']:.2f} ms/cell",
                        "ratio": round(r["ratio_all"], 1), "goal": ">= 10x"})
        label = (f"{name}: {cfg['n_layers']}L d{cfg['d_model']} {cfg['n_tokens']}tok V{cfg['vocab']} "
                 f"H{cfg['n_heads']}/{cfg['n_kv_heads']}")
        b, n = r["best"], r["cells"]
        print(f"{label:<40} {n:>5} {b['tl']:>7.3f} {1e3 * b['tl'] / n:>10.2f} {b['hm']:>7.3f} "
              f"{1e3 * b['hm'] / n:>10.3f} {r['ratio']:>6.1f}x {r['ratio_all']:>6.1f}x {r['max_abs_diff']:>9.2e}",
              flush=True)
    print(f"TL: transformer-lens 2.16.1, torch {r['torch']} ({r['threads']} threads), one forward per cell. "
          f"hm: hooked_mlx.patching (batched; starts at the patched layer; corrupted K/V for earlier positions; "
          f"unembeds the metric's position; skips cells whose clean and corrupted activations are bitwise equal). "
          f"ratio* = the same without that skip (every cell run). max|diff| = largest difference between the "
          f"TL and hooked_mlx grids.")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "patching", "rows": rows, "summary": summary},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
