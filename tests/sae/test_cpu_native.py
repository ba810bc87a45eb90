"""The native CPU kernels (``kernels/cpu_native.cpp``): every primitive equals the pure-MLX reference ops on
the benchmark's shapes and on edge cases, none of them changes an array its caller still holds, and the
back end falls back to the pure-MLX CPU ops (with a warning) when the kernels cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels import native_build
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

pytestmark = pytest.mark.skipif(not native_build.enabled(), reason="HOOKED_MLX_CPU_NATIVE=0")

REF = FU.ReferenceOps()


@pytest.fixture(scope="module")
def native():
    from hooked_mlx.sae.kernels.cpu_native import NativeCpuOps

    return NativeCpuOps()


def _arr(rng, *shape, scale=1.0):
    return mx.array((rng.normal(size=shape) * scale).astype(np.float32))


def _same_selection(got, want, pre, dead=None, relu=True):
    """Same multiset of values as the reference, and each index points at its value."""
    (gv, gi), (wv, _) = got, want
    assert gv.shape == wv.shape and gi.dtype == mx.uint32
    assert np.array_equal(np.sort(np.array(gv), -1), np.sort(np.array(wv), -1))
    src = pre if dead is None else mx.where(dead.astype(mx.bool_), pre, -mx.inf)
    at = mx.take_along_axis(src, gi.astype(mx.int32), axis=-1)
    at = mx.maximum(at, 0) if relu else mx.where(mx.isfinite(at), at, 0)
    assert np.array_equal(np.array(at), np.array(gv))
    assert all(len(set(r)) == len(r) for r in np.array(gi).tolist())  # no latent picked twice


@pytest.mark.parametrize("B,F,k", [(256, 2304, 16), (64, 9216, 32), (7, 100, 100), (5, 37, 1)])
def test_row_topk_equals_the_reference(native, B, F, k):
    rng = np.random.default_rng(B + F)
    pre = _arr(rng, B, F)
    _same_selection(native.row_topk(pre, k), REF.row_topk(pre, k), pre)
    dead = mx.array(rng.random(F) < 0.3)
    _same_selection(native.row_topk(pre, k, dead), REF.row_topk(pre, k, dead), pre, dead)
    _same_selection(native.row_topk(pre, k, dead, relu=False), REF.row_topk(pre, k, dead, relu=False), pre, dead,
                    relu=False)


def test_row_topk_ties_and_too_few_eligible(native):
    pre = mx.array(np.repeat(np.array([[1.0, 3.0, 3.0, 3.0, 2.0, -1.0] * 8], np.float32), 3, 0))  # ties
    _same_selection(native.row_topk(pre, 5), REF.row_topk(pre, 5), pre)
    dead = mx.array(np.arange(48) < 3)  # 3 eligible latents for k = 5: the rest read -inf, value 0
    got = native.row_topk(pre, 5, dead, relu=False)
    _same_selection(got, REF.row_topk(pre, 5, dead, relu=False), pre, dead, relu=False)
    assert np.array_equal(np.sort(np.array(got[0][0])), [0, 0, 1, 3, 3])


@pytest.mark.parametrize("B,D,F,k", [(256, 576, 2304, 16), (33, 20, 50, 7)])
def test_sparse_decode_gather_and_latent_sums_equal_the_reference(native, B, D, F, k):
    rng = np.random.default_rng(D)
    W, Y, X = _arr(rng, F, D), _arr(rng, B, D), _arr(rng, B, D)
    vals, idx = REF.row_topk(_arr(rng, B, F), k)
    assert_close(native.decode(vals, idx, W), REF.decode(vals, idx, W), 1e-5)
    assert_close(native.gather_dot(Y, idx, W), REF.gather_dot(Y, idx, W), 1e-5)
    cols = idx.reshape(-1)
    rows = mx.repeat(mx.arange(B, dtype=mx.uint32), k)
    rows_enc = mx.array(rng.permutation(B * k) % B).astype(mx.uint32)  # another row per entry
    cd, ce = _arr(rng, B * k), _arr(rng, B * k)
    got = native.latent_grads(cols, rows, rows_enc, cd, ce, Y, X, F)
    want = REF.latent_grads(cols, rows, rows_enc, cd, ce, Y, X, F)
    for name, a, b in zip(("dW_dec", "dW_enc", "db_enc"), got, want):
        assert a.shape == b.shape, name
        assert_close(a, b, 1e-5, err_msg=name)
    dec_only = native.latent_grads(cols, rows, rows, cd, None, Y, X, F)
    assert dec_only[1] is None and dec_only[2] is None
    assert_close(dec_only[0], want[0], 1e-5)
    # repeated calls give bitwise the same sums (a fixed order per latent)
    again = native.latent_grads(cols, rows, rows_enc, cd, ce, Y, X, F)
    for a, b in zip(got, again):
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("B,F,k", [(256, 2304, 16), (32, 100, 100), (8, 37, 1)])
def test_batch_entries_decode_and_dots_equal_the_reference(native, B, F, k):
    """BatchTopK's flattened entries: the same k*B values as a top-k over the flattened batch, each at its (row,
    latent), rows ascending; their decode and gathered dots equal the reference's."""
    rng = np.random.default_rng(B + k)
    pre, W, dY = _arr(rng, B, F), _arr(rng, F, 24), _arr(rng, B, 24)
    rows, cols, vals = native.batch_entries(pre, k * B)
    want = REF.batch_entries(pre, k * B)
    assert rows.shape == cols.shape == vals.shape == (k * B,)
    assert np.array_equal(np.sort(np.array(vals)), np.sort(np.array(want[2])))
    acts = np.maximum(np.array(pre), 0)
    r, c = np.array(rows).astype(np.int64), np.array(cols).astype(np.int64)
    assert np.array_equal(acts[r, c], np.array(vals))
    assert len(set(zip(r.tolist(), c.tolist()))) == k * B and np.all(np.diff(r) >= 0)
    assert_close(native.entries_decode(rows, cols, vals, W, B), REF.entries_decode(rows, cols, vals, W, B), 1e-5)
    assert_close(native.entries_dot(dY, rows, cols, W), REF.entries_dot(dY, rows, cols, W), 1e-5)


def test_batch_entries_ties_and_too_few_positive(native):
    """Ties at the cut fill exactly k*B entries in row order; with fewer positive entries than k*B, the rest are
    zeros (which decode to nothing)."""
    pre = mx.array(np.tile(np.array([2.0, 1.0, 1.0, 1.0, -1.0], np.float32), (4, 1)))
    rows, cols, vals = native.batch_entries(pre, 6)  # 4 twos, then 2 of the 12 ones
    assert np.array_equal(np.sort(np.array(vals)), [1, 1, 2, 2, 2, 2])
    assert np.array_equal(np.array(rows)[np.array(vals) == 1], [0, 0])
    neg = mx.array(-np.abs(np.random.default_rng(0).normal(size=(3, 10))).astype(np.float32))
    neg[0, 3] = 5.0
    rows, cols, vals = native.batch_entries(neg, 4)
    assert np.array_equal(np.sort(np.array(vals)), [0, 0, 0, 5])


def test_adam_passes_and_norms_equal_the_reference(native):
    rng = np.random.default_rng(3)
    F, D = 300, 40
    W = _arr(rng, F, D)
    W = W / mx.linalg.norm(W, axis=-1, keepdims=True)
    g, m = _arr(rng, F, D), _arr(rng, F, D, scale=0.1)
    v = mx.abs(_arr(rng, F, D, scale=0.01))
    hp = FU.adam_hparams(1e-3, 0.9, 0.999, 1e-8, mx.array(7), grad_scale=0.5)
    for rp, rn in ((True, True), (False, True), (False, False)):
        for name, a, b in zip("Wmv", native.adam_rows(W, g, m, v, hp, rp, rn, 1e-8),
                              REF.adam_rows(W, g, m, v, hp, rp, rn, 1e-8)):
            assert_close(a, b, 1e-5, err_msg=f"adam_rows {name} {rp} {rn}")
    b = _arr(rng, 4099)  # a vector whose length is no multiple of the chunk
    for name, a, c in zip("pmv", native.adam(b, b * 0.5, b * 0.1, mx.abs(b), hp), REF.adam(b, b * 0.5, b * 0.1, mx.abs(b), hp)):
        assert_close(a, c, 1e-5, err_msg=f"adam {name}")
    for args in ((g,), (g, W), (b,), (g.reshape(1, -1), W.reshape(1, -1))):
        assert float(native.sq_norm(*args)) == pytest.approx(float(REF.sq_norm(*args)), rel=1e-5)


def test_a_skipped_step_and_non_finite_gradients(native):
    """apply = 0 leaves p, m, v bitwise as they were, non-finite gradient entries included; a non-finite
    gradient makes the norm non-finite (the trainer's skip test)."""
    rng = np.random.default_rng(4)
    W, m = _arr(rng, 50, 8), _arr(rng, 50, 8)
    v = mx.abs(_arr(rng, 50, 8))
    g = mx.where(mx.array(rng.random((50, 8)) < 0.1), mx.nan, _arr(rng, 50, 8))
    skip = FU.adam_hparams(1e-3, 0.9, 0.999, 1e-8, 3, apply=mx.array(False))
    for got, want in zip(native.adam_rows(W, g, m, v, skip, True, True, 1e-8), (W, m, v)):
        assert np.array_equal(np.array(got), np.array(want))
    for got, want in zip(native.adam(W, g, m, v, skip), (W, m, v)):
        assert np.array_equal(np.array(got), np.array(want))
    assert not np.isfinite(float(native.sq_norm(g)))
    assert not np.isfinite(float(native.sq_norm(g, W)))


def test_held_inputs_are_never_overwritten(native):
    """The passes reuse an old state buffer only when nothing else holds it: arrays the caller keeps are
    unchanged, inside a compiled function and outside."""
    rng = np.random.default_rng(5)
    p, g, m = _arr(rng, 64, 16), _arr(rng, 64, 16), _arr(rng, 64, 16)
    v = mx.abs(_arr(rng, 64, 16))
    hp = FU.adam_hparams(1e-2, 0.9, 0.999, 1e-8, 1)
    mx.eval(p, g, m, v, hp)
    keep = [np.array(a) for a in (p, m, v)]
    step = mx.compile(lambda p, g, m, v, hp: native.adam_rows(p, g, m, v, hp, True, True, 1e-8))
    for fn in (lambda: native.adam(p, g, m, v, hp), lambda: step(p, g, m, v, hp)):
        out = fn()
        mx.eval(out)
        assert not np.array_equal(np.array(out[0]), keep[0])
        for a, b in zip((p, m, v), keep):
            assert np.array_equal(np.array(a), b)


def test_the_build_is_cached_and_the_back_end_is_native(native):
    assert native.name == "cpu" and native.fused_optimizer
    lib = native_build._build(True, True)
    assert lib.is_file() and lib.parent.parent == native_build.cache_root() / "cpu_kernels"
    assert FU.get_ops("cpu").name == "cpu"  # passed its self-check (a failure would give "reference")


_FALLBACK = """
import warnings
warnings.simplefilter("always")
import hooked_mlx
from hooked_mlx.sae.kernels import fused as FU
with warnings.catch_warnings(record=True) as w:
    ops = FU.get_ops("cpu")
print(ops.name + "|" + " ".join(str(x.message) for x in w))
"""


@pytest.mark.parametrize("env,warned", [({"HOOKED_MLX_CPU_NATIVE": "0"}, ""),
                                        ({"CXX": "/nonexistent/c++"}, "/nonexistent/c++"),
                                        ({"HOOKED_MLX_CACHE_DIR": "/dev/null/cache"}, "HOOKED_MLX_CACHE_DIR")],
                         ids=["off", "no-compiler", "unwritable-cache"])
def test_falls_back_to_the_mlx_cpu_ops(tmp_path, env, warned):
    full = {**os.environ, "HOOKED_MLX_CACHE_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], env=full, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    name, _, msg = out.stdout.strip().partition("|")
    assert name == "cpu-mlx"
    assert ("native CPU kernels are not available" in msg and warned in msg) == bool(warned), msg
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left behind
