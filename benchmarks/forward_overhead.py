"""Forward overhead of hooks: mlx-lm's own forward vs HookedTransformer (no hooks) vs run_with_cache (all hooks).

Same checkpoint, same process, same inputs. The anchor is mlx-lm's forward measured in this run; the script
prints each ratio against it (goals: no hooks <= 1.03x, caching every hook <= 1.5x).

    python benchmarks/forward_overhead.py [--json OUT.json] [--repeats 20]

``--llama1b`` (a GPU): instead, a Llama-3.2-1B-shaped model with random weights (16 layers, d 2048, 32 / 8
heads, d_mlp 8192, vocab 128256; bfloat16), batch 8 x 512, and where the cache's time goes: every hook; every
hook but ``attn.hook_result`` (TransformerLens computes it only after ``set_use_attn_result(True)``); also
without ``hook_attn_scores`` / ``hook_pattern`` (which need the attention materialised); and identity hooks
on every point (the hooked, uncompiled path without storing anything)::

    python benchmarks/forward_overhead.py --llama1b --json benchmarks/results/forward_overhead_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hooked_mlx  # first: loads the optimised BLAS before mlx.core
from hooked_mlx import HookedTransformer
import mlx.core as mx
from mlx_lm.utils import load_model

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT.parent / "shared" / "models" / "stories260K"

LARGE = {
    "model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1376,
    "num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 8192,
    "max_position_embeddings": 1024, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


LLAMA_1B = {
    "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def timeit_interleaved(fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn() (which must evaluate its result), after 3 warm-up calls each. The
    functions run in turn, round after round, so that load from other processes hits them alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


def build_large(path: Path, config: dict = LARGE, dtype=None) -> Path:
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


def breakdown(path: Path, batch: int, seq: int, repeats: int) -> dict:
    """Where run_with_cache's time goes on one model (see the module docstring); ms and ratios to mlx-lm."""
    ref, _ = load_model(path)
    model = HookedTransformer.from_pretrained(path, dtype="bfloat16")
    toks = mx.random.randint(3, model.cfg.d_vocab, (batch, seq)).astype(mx.int32)
    every = list(model.hook_dict)
    no_result = [n for n in every if not n.endswith("attn.hook_result")]
    no_attn = [n for n in no_result if not n.endswith(("hook_attn_scores", "hook_pattern"))]

    def cached(names):
        def fn():
            out, cache = model.run_with_cache(toks, names_filter=names)
            mx.eval(out)
        return fn

    def identity_hooks():
        mx.eval(model.run_with_hooks(toks, fwd_hooks=[(n, lambda a, hook: a) for n in no_result]))

    fns = {"mlx_lm": lambda: mx.eval(ref(toks)), "no_hooks": lambda: mx.eval(model(toks)),
           "cache_every_hook": cached(None), "cache_all_but_hook_result": cached(no_result),
           "cache_all_but_result_scores_pattern": cached(no_attn), "identity_hooks_all_but_result": identity_hooks}
    times = timeit_interleaved(list(fns.values()), repeats)
    row = {"model": "llama-1B shape (random, bf16)", "batch": batch, "seq": seq, "hooks": len(every)}
    for (name, _), t in zip(fns.items(), times):
        row[f"{name}_ms"] = t * 1e3
        row[f"{name}_ratio"] = t / times[0]
        print(f"{name:<40} {t * 1e3:9.2f} ms  {t / times[0]:.3f}x mlx-lm", flush=True)
    return row


def bench(name: str, path: Path, batch: int, seq: int, repeats: int) -> dict:
    ref, _ = load_model(path)
    model = HookedTransformer.from_pretrained(path)
    toks = mx.random.randint(3, model.cfg.d_vocab, (batch, seq)).astype(mx.int32)

    def run_ref():
        mx.eval(ref(toks))

    def run_fast():
        mx.eval(model(toks))

    def run_cache():
        out, cache = model.run_with_cache(toks)
        mx.eval(out)

    t_ref, t_fast, t_cache = timeit_interleaved([run_ref, run_fast, run_cache], repeats)
    n_hooks = len(model.hook_dict)
    row = {"model": name, "batch": batch, "seq": seq, "hooks": n_hooks, "mlx_lm_ms": t_ref * 1e3,
           "hooked_no_hooks_ms": t_fast * 1e3, "run_with_cache_all_ms": t_cache * 1e3,
           "ratio_no_hooks": t_fast / t_ref, "ratio_cache_all": t_cache / t_ref}
    print(f"{name:<28} B={batch:<3} P={seq:<4} mlx-lm {t_ref*1e3:8.2f} ms | no hooks {t_fast*1e3:8.2f} ms "
          f"({t_fast/t_ref:.3f}x) | run_with_cache({n_hooks} hooks) {t_cache*1e3:8.2f} ms ({t_cache/t_ref:.3f}x)")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--llama1b", action="store_true", help="the 1B-shaped breakdown (a GPU; see the docstring)")
    args = ap.parse_args(argv)
    print(f"device: {mx.default_device()}  BLAS: {hooked_mlx._blas.LOADED}")
    if args.llama1b:
        with tempfile.TemporaryDirectory() as d:
            row = breakdown(build_large(Path(d) / "llama1b", LLAMA_1B, mx.bfloat16), 8, 512, args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps({"benchmark": "forward_overhead_breakdown",
                                                   "device": str(mx.default_device()), "rows": [row]}, indent=2))
        return 0
    rows = []
    if STORIES.exists():
        rows.append(bench("stories260K", STORIES, 1, 64, args.repeats))
        rows.append(bench("stories260K", STORIES, 8, 128, args.repeats))
    with tempfile.TemporaryDirectory() as d:
        large = build_large(Path(d) / "large")
        rows.append(bench("random llama 8L d512", large, 8, 128, max(5, args.repeats // 2)))
    summary = []
    for r in rows:
        shape = f"{r['model']}, batch {r['batch']}x{r['seq']}"
        summary.append({"row": f"forward, no hooks ({shape})", "value": f"{r['hooked_no_hooks_ms']:.2f} ms",
                        "anchor": f"mlx-lm {r['mlx_lm_ms']:.2f} ms", "ratio": round(r["ratio_no_hooks"], 3),
                        "goal": "<= 1.03x"})
        summary.append({"row": f"run_with_cache, all {r['hooks']} hooks ({shape})",
                        "value": f"{r['run_with_cache_all_ms']:.2f} ms", "anchor": f"mlx-lm {r['mlx_lm_ms']:.2f} ms",
                        "ratio": round(r["ratio_cache_all"], 3), "goal": "<= 1.5x"})
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "forward_overhead", "device": str(mx.default_device()),
                                               "rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
