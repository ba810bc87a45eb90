"""TopK-SAE training step, same process and GPU: hooked_mlx fused vs hooked_mlx reference vs EleutherAI sparsify.

One step = forward, FVU loss, backward, removal of the decoder-parallel gradient, Adam (bias-corrected,
lr 2e-4/sqrt(F/2^14) as sparsify's trainer), decoder rows renormalised. sparsify's step is exactly its
trainer's: forward under its bf16 autocast, ``fvu.backward()``,
``remove_gradient_parallel_to_decoder_directions()``, Adam step, ``set_decoder_norm_to_unit_norm()``.

* ``fused``     : ``hooked_mlx.sae.kernels.fused`` (``topk_sae_loss`` custom-VJP forward/backward, compiled;
                  ``fused_adam_renorm`` for W_dec, fused elementwise Adam for the rest).
* ``reference`` : the trainer's pure-MLX path (reference.py: fp32 encoder, ``argpartition`` top-k, gathered
                  decode, MLX autodiff; parallel removal, ``optim.Adam``, renorm; one ``mx.compile``-d step
                  with the state as inputs/outputs, like ``SAETrainer``).
* ``sparsify``  : eai-sparsify 1.3.x ``SparseCoder`` (PyTorch + Triton), imported without its trainer
                  (a package stub, so ``datasets`` is not needed).

Usage (GPU machine): ``python benchmarks/sae_kernels.py --shapes S1,S2 --out benchmarks/results/x.json``
Prints ms/step, tokens/s, peak memory (MLX: ``mx.get_peak_memory``; torch: ``max_memory_allocated``)
and the ratios against sparsify measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from functools import partial

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels import reference as R
from hooked_mlx.sae.kernels.step import FusedTopKStep
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

SHAPES = {
    "S1": dict(D=2048, F=32768, B=4096, K=64),
    "S2": dict(D=4096, F=131072, B=4096, K=128),
    "small": dict(D=512, F=8192, B=2048, K=32),
}
GOALS = {"S1": 650_000, "S2": 125_000}


def timed_ms(fn, reps: int, warmup: int = 2) -> float:
    """Milliseconds per evaluated ``fn()`` (after ``warmup`` calls), synchronised before and after."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def lr_for(F):
    return 2e-4 / math.sqrt(F / 2**14)


def init_params(D, F, seed=0):
    """sparsify-like init: W_enc ~ U(+-1/sqrt(D)) (nn.Linear), W_dec = unit-norm rows of W_enc^T, zero biases."""
    k = mx.random.key(seed)
    W_enc = mx.random.uniform(-1 / math.sqrt(D), 1 / math.sqrt(D), (D, F), key=k)
    W_dec = W_enc.T / mx.linalg.norm(W_enc.T, axis=-1, keepdims=True)
    return {"W_enc": W_enc, "b_enc": mx.zeros((F,)), "W_dec": mx.array(W_dec), "b_dec": mx.zeros((D,))}


def make_data(B, D, n=2, seed=1):
    ks = mx.random.split(mx.random.key(seed), n)
    return [mx.random.normal((B, D), key=kk) for kk in ks]


# ---------------------------------------------------------------------------------------------------
# hooked_mlx fused step
# ---------------------------------------------------------------------------------------------------


FusedStep = FusedTopKStep  # the library's bare fused TopK step (hooked_mlx.sae.kernels.step)


# ---------------------------------------------------------------------------------------------------
# hooked_mlx reference step (the trainer's math on reference.py)
# ---------------------------------------------------------------------------------------------------


class _Params(nn.Module):
    def __init__(self, params):
        super().__init__()
        for n, p in params.items():
            setattr(self, n, p)


class ReferenceStep:
    def __init__(self, params, k, lr, betas=(0.9, 0.999), eps=1e-8):
        self.model = model = _Params(params)
        self.opt = opt = optim.Adam(learning_rate=lr, betas=list(betas), eps=eps, bias_correction=True)
        opt.init(model.trainable_parameters())
        mx.eval(model.parameters(), opt.state)

        def loss_fn(x):
            pre = R.encode_pre(x, model.W_enc, model.b_enc, model.b_dec)
            vals, idx = R.topk_select(pre, k)
            x_hat = R.topk_decode(vals, idx, model.W_dec, model.b_dec)
            tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
            return mx.sum(mx.square(x - x_hat)) / tv

        lg = nn.value_and_grad(model, loss_fn)
        state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x):
            loss, g = lg(x)
            W = model.W_dec
            g["W_dec"] = g["W_dec"] - mx.sum(g["W_dec"] * W, axis=-1, keepdims=True) * W
            opt.update(model, g)
            W = model.W_dec
            model.W_dec = W / (mx.linalg.norm(W, axis=-1, keepdims=True) + 1e-8)
            return loss

        self._step = step

    @property
    def params(self):
        return dict(self.model.parameters())

    def __call__(self, x):
        loss = self._step(x)
        mx.eval(loss, self.model.parameters(), self.opt.state)
        return loss


# ---------------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------------


def import_sparsify():
    """sparsify.sparse_coder and sparsify.config without sparsify/__init__ (which imports `datasets`)."""
    import importlib.util
    import types

    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("eai-sparsify is not installed (pip install eai-sparsify==1.3.*).")
        stub = types.ModuleType("sparsify")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = stub
    import sparsify.config as cfg
    import sparsify.sparse_coder as sc

    version = "?"
    try:
        from importlib.metadata import version as _v

        version = _v("eai-sparsify")
    except Exception:
        pass
    return sc, cfg, version


def bench_sparsify(shape, steps, warmup):
    import torch

    sc, cfg, version = import_sparsify()
    D, F, B, K = shape["D"], shape["F"], shape["B"], shape["K"]
    torch.manual_seed(0)
    dev = "cuda"
    sae = sc.SparseCoder(D, cfg.SparseCoderConfig(num_latents=F, k=K), device=dev, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr_for(F))
    xs = [torch.randn(B, D, device=dev) for _ in range(2)]

    def step(x):
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        return out.fvu

    for i in range(warmup):
        step(xs[i % 2])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(xs[i % 2])
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated()
    res = dict(ms=dt * 1e3, tokens_per_s=B / dt, peak_gb=peak / 1e9, loss=float(loss), version=version,
               torch=torch.__version__, decoder_impl=sc.decoder_impl.__name__)
    sae = opt = xs = None  # free the GPU memory before the next implementation
    gc.collect()
    torch.cuda.empty_cache()
    return res


def pick_lg_variant(shape, reps=5):
    """Time the two segmented latent-gradient kernels on this shape (after checking they agree) and keep
    the faster one on the CUDA ops object. Returns {variant: ms} and the choice."""
    ops = FU.get_ops()
    if not hasattr(ops, "lg_variant"):
        return None
    D, F, B, K = shape["D"], shape["F"], shape["B"], shape["K"]
    x, dY = make_data(B, D, 2, seed=4)
    idx = mx.random.randint(0, F, (B, K)).astype(mx.uint32)
    vals = mx.random.uniform(shape=(B, K))
    cols, rows = idx.reshape(-1), mx.repeat(mx.arange(B, dtype=mx.uint32), K)
    if getattr(ops, "lowp_backward", False):  # time the operands the step passes
        dY, x = dY.astype(mx.bfloat16), x.astype(mx.bfloat16)
    args = (cols, rows, rows, vals.reshape(-1), vals.reshape(-1) * 0.5, dY, x, F, True)
    times, outs = {}, {}
    for variant in ("v1", "v4"):
        outs[variant] = _with_variant(ops, variant, lambda: ops.latent_grads(*args))
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            _with_variant(ops, variant, lambda: ops.latent_grads(*args))
        mx.synchronize()
        times[variant] = (time.perf_counter() - t0) / reps * 1e3
    agree = all(mx.allclose(a, b, rtol=1e-5, atol=1e-6).item() for a, b in zip(outs["v1"], outs["v4"]))
    choice = min(times, key=times.get) if agree else "v1"
    ops.lg_variant = choice
    return {"ms": times, "agree": agree, "choice": choice}


def bench_mlx(kind, shape, steps, warmup):
    """kind: "fused", "fused_fp32bwd" (the fused step with fp32 operands in the per-latent gradient sums, to
    measure what the bf16 operands buy) or "reference"."""
    if kind == "fused_fp32bwd":
        ops = FU.get_ops()
        old = ops.lowp_backward
        ops.lowp_backward = False
        try:
            return bench_mlx("fused", shape, steps, warmup)
        finally:
            ops.lowp_backward = old
    D, F, B, K = shape["D"], shape["F"], shape["B"], shape["K"]
    mx.clear_cache()
    tuned = pick_lg_variant(shape) if kind == "fused" else None
    params = init_params(D, F)
    xs = make_data(B, D)
    mx.eval(params, xs)
    step = FusedStep(params, K, lr_for(F)) if kind == "fused" else ReferenceStep(params, K, lr_for(F))
    del params
    for i in range(warmup):
        step(xs[i % 2])
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(xs[i % 2])
    mx.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = dict(ms=dt * 1e3, tokens_per_s=B / dt, peak_gb=mx.get_peak_memory() / 1e9, loss=loss.item())
    if kind == "fused":
        res["backend"] = FU.backend()
        res["latent_grads_variant"] = tuned
        res["low_memory_optimizer"] = step.low_memory
        res["lowp_backward"] = bool(getattr(FU.get_ops(), "lowp_backward", False))
    step = xs = None
    gc.collect()
    mx.clear_cache()
    return res


def _with_variant(ops, variant, fn):
    old = getattr(ops, "lg_variant", None)
    ops.lg_variant = variant
    try:
        out = fn()
        mx.eval(out)
        return out
    finally:
        ops.lg_variant = old


def profile(shape, reps=10):
    """Milliseconds of each piece of the fused step at this shape (each evaluated on its own)."""
    ops = FU.get_ops()
    D, F, B, K = shape["D"], shape["F"], shape["B"], shape["K"]
    p = init_params(D, F)
    x = make_data(B, D, 1)[0]
    W16 = p["W_enc"].astype(ops.matmul_dtype or mx.float32)
    pre = ops.pre(x, p["W_enc"], p["b_enc"], W16)
    vals, idx = ops.row_topk(pre, K)
    dY = make_data(B, D, 1, seed=3)[0]
    cols = idx.reshape(-1)
    rows = mx.repeat(mx.arange(B, dtype=mx.uint32), K)
    ce = vals.reshape(-1) * 0.5
    g = mx.random.normal(p["W_dec"].shape)
    m, v = g * 0.1, mx.abs(g) * 0.01
    hp = FU.adam_hparams(1e-4, 0.9, 0.999, 1e-8, 3)
    db = mx.random.normal((F,))
    gE, mE, vE = (mx.contiguous(a.T) for a in (g, m, v))  # W_enc-shaped [D,F], contiguous as in the step
    mx.eval(p, x, W16, pre, vals, idx, dY, g, m, v, hp, db, gE, mE, vE)
    step = FusedStep(p, K, 1e-4)
    items = {
        "encoder matmul bf16 (addmm)": lambda: ops.pre(x, p["W_enc"], p["b_enc"], W16),
        "W_enc -> bf16 cast": lambda: p["W_enc"].astype(mx.bfloat16),
        "row top-k select (radix)": lambda: ops.row_topk(pre, K),
        "mx.argpartition top-k (for comparison)": lambda: mx.argpartition(pre, F - K, axis=-1)[:, F - K:],
        "sparse decode": lambda: ops.decode(vals, idx, p["W_dec"]),
        "gathered dot products": lambda: ops.gather_dot(dY, idx, p["W_dec"]),
        "latent grads (segmented, incl. sort)": lambda: ops.latent_grads(cols, rows, rows, vals.reshape(-1), ce, dY,
                                                                          x, F, True),
        "argsort of the entry keys (latent grads prep)": lambda: mx.argsort(cols * B + rows),
        "latent grads v4 (segmented, float4)": lambda: _with_variant(ops, "v4", lambda: ops.latent_grads(
            cols, rows, rows, vals.reshape(-1), ce, dY, x, F, True)),
        "latent grads v4, bf16 dY / x operands": lambda: _with_variant(ops, "v4", lambda: ops.latent_grads(
            cols, rows, rows, vals.reshape(-1), ce, dY.astype(mx.bfloat16), x.astype(mx.bfloat16), F, True)),
        "latent grads (atomic scatter-add)": lambda: ops.latent_grads(cols, rows, rows, vals.reshape(-1), ce, dY, x,
                                                                       F, False),
        "W_enc @ db_enc (b_dec share)": lambda: p["W_enc"] @ db,
        "fused Adam+proj+renorm W_dec": lambda: ops.adam_rows(p["W_dec"], g, m, v, hp, True, True, 1e-8),
        "fused Adam W_enc (+bf16 copy)": lambda: ops.adam(p["W_enc"], gE, mE, vE, hp, mx.bfloat16),
        "forward+backward (compiled)": lambda: step.grad_fn(step.params, x, step.W_lowp),
        "whole fused step": lambda: step(x),
    }
    out = {}
    for name, fn in items.items():
        out[name] = timed_ms(fn, reps)
        print(f"  {name:42s} {out[name]:8.3f} ms", flush=True)
    step = None
    gc.collect()
    mx.clear_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="S1,S2")
    ap.add_argument("--impls", default="fused,reference,sparsify",
                    help="comma-separated: fused, fused_fp32bwd, reference, sparsify")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", action="store_true", help="also time each piece of the fused step")
    a = ap.parse_args(argv)
    impls = a.impls.split(",")
    device = "cpu"
    try:
        if mx.cuda.is_available():
            import subprocess

            device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                    text=True).stdout.strip() or "cuda"
    except Exception:
        pass
    meta = dict(device=device, mlx=mx.__version__, python=platform.python_version(), command=" ".join(sys.argv),
                steps=a.steps, warmup=a.warmup, tf32=os.environ.get("MLX_ENABLE_TF32", "1 (default)"))
    results = {"meta": meta, "shapes": {}}
    print(json.dumps(meta))
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        row = {"shape": shape}
        if a.profile:
            print(f"{name} profile of the fused step ({FU.backend()} back end):")
            row["profile_ms"] = profile(shape)
        for impl in impls:
            try:
                r = bench_sparsify(shape, a.steps, a.warmup) if impl == "sparsify" else \
                    bench_mlx(impl, shape, a.steps, a.warmup)
            except Exception as e:  # record it and go on to the next implementation
                r = {"error": f"{type(e).__name__}: {e}"}
            row[impl] = r
            print(f"{name} {impl:9s} " + (f"{r['ms']:8.2f} ms/step {r['tokens_per_s']:>10,.0f} tok/s "
                                          f"peak {r['peak_gb']:6.2f} GB  loss {r['loss']:.4f}" if "ms" in r
                                          else r["error"]), flush=True)
        base = row.get("sparsify", {})
        for impl in impls:
            r = row[impl]
            if "ms" in r and "ms" in base:
                r["speedup_vs_sparsify"] = base["ms"] / r["ms"]
                r["memory_vs_sparsify"] = r["peak_gb"] / base["peak_gb"]
        if "ms" in row.get("fused", {}) and "ms" in row.get("reference", {}):
            row["fused"]["speedup_vs_reference"] = row["reference"]["ms"] / row["fused"]["ms"]
        if name in GOALS and "ms" in row.get("fused", {}):
            f = row["fused"]
            row["goal"] = dict(tokens_per_s=GOALS[name], reached=f["tokens_per_s"] >= GOALS[name],
                               memory_le_sparsify=("peak_gb" in base and f["peak_gb"] <= base["peak_gb"]))
        results["shapes"][name] = row
        print(f"{name} ratios: " + json.dumps({i: {k: round(v, 3) for k, v in row[i].items()
                                                   if k.endswith(("sparsify", "reference"))} for i in impls}),
              flush=True)
        if a.out:  # after every shape, atomically
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            tmp = a.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(results, fh, indent=1)
            os.replace(tmp, a.out)
    return results


if __name__ == "__main__":
    main()
