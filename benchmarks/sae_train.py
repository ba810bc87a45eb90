"""SAE training throughput: tokens/s and peak memory per architecture, against a straightforward dense step.

Shapes (sae-algorithms.md section 6): S1 = d_in 2048, 16x (F 32768), batch 4096, k 64; S2 = d_in 4096, 32x
(F 131072), batch 4096, k 128. ``--scale N`` divides d_in, batch and k by N (F follows from the expansion
factor); the default is 1 on a GPU and 16 on the CPU, where the full shapes take minutes per step.

For each shape it times, on synthetic activations and in the same process:

* ``dense``: a straightforward MLX TopK step (dense [B,F] latents, ``f @ W_dec``, MSE, Adam, decoder renorm),
  compiled -- the baseline every ratio is against;
* the hooked_mlx trainer step (``SAETrainer``, compiled, metrics kept on device) for topk (before any
  latent can be dead, so without AuxK -- most of a run -- and with AuxK forced on), batchtopk + AuxK, relu +
  ghost grads and jumprelu;

and then the streaming throughput of ``ActivationStore`` from stories260K (tokens/s of activations
delivered, model forward included, stop_at_layer), one hook and two hooks from one forward.

    python benchmarks/sae_train.py                 # CPU: scale 16, well under 2 minutes on 2 cores
    python benchmarks/sae_train.py --scale 1 --steps 20 --json out.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)

# isort: split
from functools import partial

from hooked_mlx.sae import SAEConfig, SAETrainer
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

SHAPES = {"S1": dict(d_in=2048, expansion=16, batch=4096, k=64), "S2": dict(d_in=4096, expansion=32, batch=4096, k=128)}
ARCHS = ("topk", "batchtopk", "relu", "jumprelu")
#: (architecture, dead-latent losses forced on)
VARIANTS = (("topk", False), ("topk", True), ("batchtopk", True), ("relu", True), ("jumprelu", False))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STORIES = os.path.join(ROOT, "..", "shared", "models", "stories260K")
CORPUS = os.path.join(ROOT, "tests", "sae", "data", "stories_samples.txt")


def _backend() -> str:
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


class DenseTopK(nn.Module):
    def __init__(self, d, f, key):
        super().__init__()
        W = mx.random.normal((f, d), key=key)
        self.W_dec = W / mx.linalg.norm(W, axis=-1, keepdims=True)
        self.W_enc = mx.array(self.W_dec.T)
        self.b_enc = mx.zeros((f,))
        self.b_dec = mx.zeros((d,))


def dense_step_fn(d, f, k, lr=2e-4):
    """The straightforward step: dense latents, dense decoder, MSE, Adam, decoder renorm (compiled)."""
    model = DenseTopK(d, f, mx.random.key(0))
    opt = optim.Adam(learning_rate=lr, bias_correction=True)
    opt.init(model.trainable_parameters())

    def loss_fn(m, x):
        pre = (x - m.b_dec) @ m.W_enc + m.b_enc
        kth = mx.stop_gradient(mx.min(mx.topk(pre, k, axis=-1), axis=-1, keepdims=True))
        f_ = mx.where(pre >= kth, mx.maximum(pre, 0), 0)
        x_hat = f_ @ m.W_dec + m.b_dec
        return mx.mean(mx.sum(mx.square(x_hat - x), axis=-1))

    lg = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        loss, g = lg(model, x)
        opt.update(model, g)
        model.W_dec = model.W_dec / mx.linalg.norm(model.W_dec, axis=-1, keepdims=True)
        return loss

    return step, state


def time_steps(run, sync, x, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, peak memory GB) over ``steps`` timed steps after ``warmup``."""
    for _ in range(warmup):
        run(x)
        sync()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(steps):
        run(x)
        sync()
    dt = (time.perf_counter() - t0) / steps
    return dt, mx.get_peak_memory() / 1e9


def bench_shape(name, shape, scale, warmup, steps, archs):
    d = max(16, shape["d_in"] // scale)
    B = max(64, shape["batch"] // scale)
    k = max(4, shape["k"] // scale)
    F = d * shape["expansion"]
    x = mx.random.normal((B, d), key=mx.random.key(1)) + 0.1
    mx.eval(x)
    rows = []
    step, state = dense_step_fn(d, F, k)
    mx.clear_cache()
    dt, mem = time_steps(step, lambda: mx.eval(state), x, warmup, steps)
    base = B / dt
    rows.append(dict(shape=name, impl="dense (straightforward MLX)", d_in=d, d_sae=F, batch=B, k=k, ms=1e3 * dt,
                     tokens_per_s=base, peak_gb=mem, ratio=1.0))
    for arch, dead in VARIANTS:
        if arch not in archs:
            continue
        cfg = SAEConfig(architecture=arch, d_in=d, d_sae=F, k=k, train_batch_size_tokens=B, shuffle_buffer_tokens=B,
                        dead_tokens_window=B if dead else SAEConfig.defaults()["dead_tokens_window"],
                        ghost_grads=(arch == "relu"), normalize_activations="none", lr_warmup_steps=0)
        t = SAETrainer(cfg)
        t.initialize(x, 1.0)
        mx.clear_cache()
        dt, mem = time_steps(t.step, lambda t=t: mx.eval(t.state_arrays()), x, warmup, steps)
        extra = {"topk": " +AuxK" if dead else " (no dead latents)", "batchtopk": " +AuxK", "relu": " +ghost grads",
                 "jumprelu": ""}[arch]
        rows.append(dict(shape=name, impl=f"hooked_mlx {arch}{extra}", d_in=d, d_sae=F, batch=B, k=k, ms=1e3 * dt,
                         tokens_per_s=B / dt, peak_gb=mem, ratio=(B / dt) / base))
        del t
    return rows


def bench_streaming(batch: int, n_batches: int):
    from hooked_mlx import HookedTransformer
    from hooked_mlx.sae import ActivationStore

    if not (os.path.exists(STORIES) and os.path.exists(CORPUS)):
        return []
    model = HookedTransformer.from_pretrained(STORIES)
    rows = []
    # anchor: the bare model forward up to the same layer on full contexts (no hooks, no store)
    toks = mx.random.randint(3, model.cfg.d_vocab, (32, 128)).astype(mx.int32)
    mx.eval(model(toks, stop_at_layer=3))
    t0 = time.perf_counter()
    for _ in range(4):
        mx.eval(model(toks, stop_at_layer=3))
    forward_tps = 4 * toks.size / (time.perf_counter() - t0)
    for hooks in (["blocks.2.hook_resid_post"], ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]):
        cfg = SAEConfig(context_size=128, store_batch_size_prompts=32, train_batch_size_tokens=batch,
                        shuffle_buffer_tokens=4 * batch)
        store = ActivationStore(model, hooks, CORPUS, cfg)
        store.next_batch()  # fill the buffer (not timed)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            b = store.next_batch()
        mx.eval(list(b.values()))
        dt = time.perf_counter() - t0
        rows.append(dict(hooks=len(hooks), stop_at_layer=store.stop_at_layer, context=cfg.context_size,
                         tokens_per_s=n_batches * batch / dt, sae_rows_per_s=n_batches * batch * len(hooks) / dt,
                         forward_tokens_per_s=forward_tps))
    return rows


def main(argv=None):
    backend = _backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=None, help="divide d_in, batch and k by this (default: 1 GPU, 8 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--no-streaming", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    scale = a.scale or (1 if backend != "cpu" else 16)
    steps = a.steps or (10 if backend != "cpu" else 3)
    t_start = time.perf_counter()
    print(f"SAE training benchmark on {backend} (mlx {mx.__version__}), scale 1/{scale}, {steps} timed steps "
          f"after {a.warmup} warm-up, float32, TF32 {'off' if os.environ.get('MLX_ENABLE_TF32') == '0' else 'default'}")
    rows = []
    for name in a.shapes:
        rows += bench_shape(name, SHAPES[name], scale, a.warmup, steps, a.archs)
    hdr = f"{'shape':5} {'implementation':38} {'d_in':>5} {'d_sae':>7} {'batch':>5} {'k':>4} {'ms/step':>9} " \
          f"{'tokens/s':>10} {'peak GB':>8} {'vs dense':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['shape']:5} {r['impl']:38} {r['d_in']:5d} {r['d_sae']:7d} {r['batch']:5d} {r['k']:4d} "
              f"{r['ms']:9.1f} {r['tokens_per_s']:10,.0f} {r['peak_gb']:8.3f} {r['ratio']:7.2f}x")
    stream = []
    if not a.no_streaming:
        stream = bench_streaming(batch=1024, n_batches=8 if backend == "cpu" else 64)
        for s in stream:
            print(f"streaming from stories260K: {s['hooks']} hook(s) from one forward (stop_at_layer="
                  f"{s['stop_at_layer']}, context {s['context']}): {s['tokens_per_s']:,.0f} tokens/s, "
                  f"{s['sae_rows_per_s']:,.0f} SAE rows/s (bare forward to that layer: "
                  f"{s['forward_tokens_per_s']:,.0f} tokens/s)")
    total = time.perf_counter() - t_start
    print(f"total {total:.1f}s")
    summary = []
    for r in rows:
        if r["impl"].startswith("dense"):
            continue
        summary.append({"row": f"SAE step {r['impl'][len('hooked_mlx '):]}, {r['shape']} at 1/{scale} "
                               f"(d_in {r['d_in']}, F {r['d_sae']}, B {r['batch']}, k {r['k']})",
                        "value": f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_gb']:.2f} GB",
                        "anchor": f"dense MLX step {r['tokens_per_s'] / r['ratio']:,.0f} tok/s",
                        "ratio": round(r["ratio"], 3), "goal": ">= 1x" if "no dead" in r["impl"] else ""})
    for s_ in stream:
        summary.append({"row": f"streaming activations, stories260K, {s_['hooks']} hook(s) per forward",
                        "value": f"{s_['tokens_per_s']:,.0f} tok/s",
                        "anchor": f"bare forward {s_['forward_tokens_per_s']:,.0f} tok/s",
                        "ratio": round(s_["tokens_per_s"] / s_["forward_tokens_per_s"], 3), "goal": ""})
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"benchmark": "sae_train", "backend": backend, "scale": scale, "steps": steps, "train": rows,
                       "streaming": stream, "summary": summary, "seconds": total}, fh, indent=2)


if __name__ == "__main__":
    main()
