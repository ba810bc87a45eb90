"""Fused SAE kernels (hooked_mlx.sae.kernels.fused): the pure-MLX fallback equals the dense reference.

Outputs and every gradient (x, W_enc, b_enc, W_dec, b_dec) in float32 to <= 1e-5 relative, for TopK
and BatchTopK, AuxK on and off; the fused optimizer pass equals the trainer's separate steps (MLX Adam);
a broken GPU back end is caught by the self-check and replaced by the reference with a warning.
The CUDA kernels themselves are checked on the GPU machine by tests/gpu/sae_kernels_device.py.
"""

from __future__ import annotations

import warnings

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels import reference as R
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

B, D, F, K, K_AUX = 16, 32, 256, 8, 24


def _problem(seed=0, n_dead=100):
    ks = mx.random.split(mx.random.key(seed), 6)
    x = mx.random.normal((B, D), key=ks[0]) + 0.5
    W_dec = mx.random.normal((F, D), key=ks[1])
    W_dec = W_dec / mx.linalg.norm(W_dec, axis=-1, keepdims=True)
    W_enc = mx.array(W_dec.T) + 0.05 * mx.random.normal((D, F), key=ks[2])
    b_enc = 0.1 * mx.random.normal((F,), key=ks[3])
    b_dec = 0.2 * mx.random.normal((D,), key=ks[4])
    dead = mx.zeros((F,), mx.bool_).at[mx.random.permutation(F, key=ks[5])[:n_dead]].add(True)
    return x, W_enc, b_enc, W_dec, b_dec, dead


def _rel_close(a, b, tol=1e-5):
    a, b = mx.array(a).astype(mx.float32), mx.array(b).astype(mx.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(mx.max(mx.abs(b)).item(), 1e-30)
    err = mx.max(mx.abs(a - b)).item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x {scale:.3g}"


def _dense_topk_loss(x, W_enc, b_enc, W_dec, b_dec, dead, k, k_aux, aux_on, aux_relu=True):
    """The dense reference (reference.py + dense decode): sparsify's FVU + scaled AuxK."""
    pre = R.encode_pre(x, W_enc, b_enc, b_dec)
    vals, idx = R.topk_select(pre, k)
    f = mx.put_along_axis(mx.zeros_like(pre), idx, vals, axis=-1)
    x_hat = R.dense_decode(f, W_dec, b_dec)
    tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
    e = x - x_hat
    loss = mx.sum(mx.square(e)) / tv
    if aux_on:
        pd = mx.where(dead, pre, -mx.inf)
        if aux_relu:
            av, ai = R.topk_select(pd, k_aux)
        else:  # raw dead pre-activations (the trainer's AuxK); -inf fillers give 0
            ai = mx.stop_gradient(mx.argpartition(pd, F - k_aux, axis=-1)[..., F - k_aux:])
            av = mx.take_along_axis(pd, ai, axis=-1)
            av = mx.where(mx.isfinite(av), av, 0.0)
        fa = mx.put_along_axis(mx.zeros_like(pre), ai, av, axis=-1)
        e_hat = fa @ W_dec
        scale = mx.minimum(mx.sum(dead.astype(mx.float32)) / k_aux, 1.0)
        loss = loss + scale * mx.sum(mx.square(e_hat - mx.stop_gradient(e))) / tv
    return loss, x_hat


@pytest.mark.parametrize("aux_on,aux_relu", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("n_dead", [100, 5])  # 5 < k_aux: the AuxK pick includes -inf (value-0) entries
def test_topk_fused_fallback_equals_dense_reference(aux_on, aux_relu, n_dead):
    if not aux_on and n_dead == 5:
        pytest.skip("dead count only matters with AuxK")
    x, W_enc, b_enc, W_dec, b_dec, dead = _problem(1, n_dead)
    args = (x, W_enc, b_enc, W_dec, b_dec)
    ops = FU.ReferenceOps()

    def fused_loss(x, W_enc, b_enc, W_dec, b_dec):
        out = FU.topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, K, dead if aux_on else None,
                                  K_AUX if aux_on else None, aux_relu=aux_relu, ops=ops)
        tv = mx.sum(mx.square(x - mx.mean(x, axis=0)))
        e = x - out.x_hat
        loss = mx.sum(mx.square(e)) / tv
        if aux_on:
            scale = mx.minimum(mx.sum(dead.astype(mx.float32)) / K_AUX, 1.0)
            loss = loss + scale * mx.sum(mx.square(out.e_hat - mx.stop_gradient(e))) / tv
        return loss, out.x_hat

    def dense_loss(x, W_enc, b_enc, W_dec, b_dec):
        return _dense_topk_loss(x, W_enc, b_enc, W_dec, b_dec, dead, K, K_AUX, aux_on, aux_relu)

    (lf, xf), gf = mx.value_and_grad(fused_loss, argnums=(0, 1, 2, 3, 4))(*args)
    (ld, xd), gd = mx.value_and_grad(dense_loss, argnums=(0, 1, 2, 3, 4))(*args)
    _rel_close(lf, ld)
    _rel_close(xf, xd)
    for name, a, b in zip(("dx", "dW_enc", "db_enc", "dW_dec", "db_dec"), gf, gd):
        assert mx.max(mx.abs(b)).item() > 0, name  # every gradient is exercised
        _rel_close(a, b), name
    # sparse structure: the encoder gradient lives only on the kept latents
    out = FU.topk_sae_forward(*args, K, dead if aux_on else None, K_AUX if aux_on else None, ops=ops)
    kept = mx.zeros((F,), mx.bool_).at[out.idx.reshape(-1).astype(mx.int32)].add(True)
    if aux_on:
        kept = kept | mx.zeros((F,), mx.bool_).at[out.aux_idx.reshape(-1).astype(mx.int32)].add(True)
    assert mx.all(mx.where(kept[None, :], True, gf[1] == 0)).item()


def test_topk_fused_inside_compiled_step_and_unused_cotangents():
    x, W_enc, b_enc, W_dec, b_dec, dead = _problem(2)
    ops = FU.ReferenceOps()
    C = mx.random.normal((B, D), key=mx.random.key(7))

    def f(W_enc, b_enc, W_dec, b_dec):
        out = FU.topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, K, ops=ops)
        return mx.sum(out.x_hat * C) + mx.sum(out.vals * 0.5)  # a cotangent on vals too

    def g(W_enc, b_enc, W_dec, b_dec):
        pre = R.encode_pre(x, W_enc, b_enc, b_dec)
        vals, idx = R.topk_select(pre, K)
        return mx.sum(R.sparse_decode(vals, idx, W_dec, b_dec) * C) + mx.sum(vals * 0.5)

    got = mx.compile(mx.grad(f, argnums=(0, 1, 2, 3)))(W_enc, b_enc, W_dec, b_dec)
    want = mx.grad(g, argnums=(0, 1, 2, 3))(W_enc, b_enc, W_dec, b_dec)
    for a, b in zip(got, want):
        _rel_close(a, b)


@pytest.mark.parametrize("case", ["continuous", "ties_at_zero"])
def test_batchtopk_radix_threshold_and_grads(case):
    x, W_enc, b_enc, W_dec, b_dec, _ = _problem(3)
    if case == "ties_at_zero":
        b_enc = b_enc - 3.0  # fewer than k*B positive entries: the cut is 0 and ties keep every zero
    pre = R.encode_pre(x, W_enc, b_enc, b_dec)
    acts = mx.maximum(pre, 0)
    cut = FU.batchtopk_threshold(pre, K, ops=FU.ReferenceOps())
    _, cut_ref = R.batchtopk_mask(acts, K)
    assert cut.item() == cut_ref.item()
    if case == "ties_at_zero":
        assert cut.item() == 0.0
    else:
        assert mx.sum(acts >= cut).item() == K * B
    # random values including negatives / exact ties of large magnitude
    v = mx.round(mx.random.normal((64, 100), key=mx.random.key(4)) * 4) / 4
    c = FU.batchtopk_threshold(v, 3, ops=FU.ReferenceOps())
    assert c.item() == R.batchtopk_mask(mx.maximum(v, 0), 3)[1].item()

    def loss(fn, W_enc, b_enc, W_dec, b_dec):
        p = R.encode_pre(x, W_enc, b_enc, b_dec)
        f, _ = fn(mx.maximum(p, 0), K)
        return mx.sum(mx.square(R.dense_decode(f, W_dec, b_dec) - x))

    la, ga = mx.value_and_grad(lambda *a: loss(FU.batchtopk_mask, *a), argnums=(0, 1, 2, 3))(
        W_enc, b_enc, W_dec, b_dec)
    lb, gb = mx.value_and_grad(lambda *a: loss(R.batchtopk_mask, *a), argnums=(0, 1, 2, 3))(
        W_enc, b_enc, W_dec, b_dec)
    _rel_close(la, lb)
    for a, b in zip(ga, gb):
        _rel_close(a, b)


def test_fused_adam_renorm_equals_trainer_sequence():
    _, W_enc, b_enc, W_dec, _, _ = _problem(5)
    params = {"W_dec": W_dec, "W_enc": W_enc, "b_enc": b_enc}
    opt = optim.Adam(learning_rate=1e-2, betas=[0.9, 0.999], eps=1e-8, bias_correction=True)
    opt.init(params)
    mine = {k: (v, mx.zeros_like(v), mx.zeros_like(v)) for k, v in params.items()}
    ops = FU.ReferenceOps()
    for step in range(1, 4):
        ks = mx.random.split(mx.random.key(10 + step), 3)
        grads = {k: mx.random.normal(v.shape, key=kk) for (k, v), kk in zip(params.items(), ks)}
        # trainer: project, Adam, renorm (three passes)
        g = dict(grads)
        W = params["W_dec"]
        g["W_dec"] = g["W_dec"] - mx.sum(g["W_dec"] * W, axis=-1, keepdims=True) * W
        params = opt.apply_gradients(g, params)
        params["W_dec"] = params["W_dec"] / (mx.linalg.norm(params["W_dec"], axis=-1, keepdims=True) + 1e-8)
        # fused: one pass for W_dec, plain fused Adam for the rest
        mine["W_dec"] = FU.fused_adam_renorm(*mine["W_dec"][:1], grads["W_dec"], *mine["W_dec"][1:], lr=1e-2,
                                             step=step, ops=ops)
        for k in ("W_enc", "b_enc"):
            p, m, v = mine[k]
            mine[k] = FU.adam(p, grads[k], m, v, lr=1e-2, step=step, ops=ops)
    for k in params:
        _rel_close(mine[k][0], params[k])
        _rel_close(mine[k][1], opt.state[k]["m"])
        _rel_close(mine[k][2], opt.state[k]["v"])


class _Plain(FU.ReferenceOps):
    """A 'back end' that is the reference, under another name: drives the per-op custom VJPs."""

    name = "plain"


def test_per_op_dropin_custom_vjps_match_reference(monkeypatch):
    x, W_enc, b_enc, W_dec, b_dec, dead = _problem(6)
    monkeypatch.setattr(FU, "get_ops", lambda name=None: _Plain())

    def loss(mod, W_enc, b_enc, W_dec, b_dec):
        pre = mod.encode_pre(x, W_enc, b_enc, b_dec)
        vals, idx = mod.topk_select(pre, K)
        x_hat = mod.topk_decode(vals, idx, W_dec, b_dec)
        pd = mx.where(dead, pre, -mx.inf)
        av, ai = mod.topk_select(pd, K_AUX)
        e_hat = mod.sparse_decode(av, ai, W_dec)
        e = mx.stop_gradient(x - x_hat)
        return mx.sum(mx.square(x - x_hat)) + mx.sum(mx.square(e_hat - e))

    la, ga = mx.value_and_grad(lambda *a: loss(FU, *a), argnums=(0, 1, 2, 3))(W_enc, b_enc, W_dec, b_dec)
    lb, gb = mx.value_and_grad(lambda *a: loss(R, *a), argnums=(0, 1, 2, 3))(W_enc, b_enc, W_dec, b_dec)
    _rel_close(la, lb)
    for a, b in zip(ga, gb):
        _rel_close(a, b)


def test_self_check_passes_for_a_correct_back_end():
    assert FU.self_check(_Plain()) == []


class _BrokenDecode(FU.ReferenceOps):
    name = "cuda"

    def decode(self, vals, idx, W):
        return super().decode(vals, idx, W) * 1.01  # a subtly wrong kernel


class _Throws(FU.ReferenceOps):
    name = "metal"

    def row_topk(self, pre, k, dead=None, relu=True):
        raise RuntimeError("Custom kernels only run on GPU.")


@pytest.mark.parametrize("broken", [_BrokenDecode, _Throws])
def test_self_check_falls_back_with_a_warning(monkeypatch, broken):
    from hooked_mlx.sae.kernels import select as S

    monkeypatch.setattr(S, "_gpu_ops", lambda name: broken())
    monkeypatch.setattr(S, "_CHOSEN", {})
    monkeypatch.setenv("HOOKED_MLX_SAE_KERNELS", broken.name)
    with pytest.warns(RuntimeWarning, match=f"the {broken.name} back end failed its self-check"):
        ops = FU.get_ops()
    assert ops is S.REFERENCE_OPS and FU.backend() == "reference"
    # once decided, no second warning and the fused forward runs on the reference ops
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, W_enc, b_enc, W_dec, b_dec, _ = _problem(7)
        out = FU.topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, K)
        pre = R.encode_pre(x, W_enc, b_enc, b_dec)
        v, i = R.topk_select(pre, K)
        _rel_close(out.x_hat, R.sparse_decode(v, i, W_dec, b_dec))


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU back end is chosen on the CPU only")
def test_backend_on_cpu_is_the_cpu_ops():
    """On the CPU the fused module's ops are the sparse CPU ops (self-checked against the reference)."""
    assert FU.backend() == "cpu"


def test_topk_train_forward_equals_trainer_reference_branch():
    """StepKernels.topk_forward (the fused TopK branch) == the trainer's TopK branch of train_forward on the
    reference kernels:
    loss, x_hat, latents and every SAE-parameter gradient, AuxK on (some latents dead) and off."""
    from hooked_mlx.sae.config import SAEConfig
    from hooked_mlx.sae.metrics import mse
    from hooked_mlx.sae.sae import SAE
    from hooked_mlx.sae.step_kernels import StepKernels
    from hooked_mlx.sae.training import train_forward
    import mlx.nn as nn

    cfg = SAEConfig(d_in=D, d_sae=F, architecture="topk", k=K, aux_k=K_AUX, aux_k_coefficient=0.5)
    sae = SAE(cfg)
    x, W_enc, b_enc, W_dec, b_dec, dead = _problem(8, 60)
    sae.update({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    fused = StepKernels("fused")
    fused.ops = FU.ReferenceOps()  # the fused forward and sparse backward on the pure-MLX primitives
    reference = StepKernels("reference")
    for use_dead in (True, False):
        def mine(x, use_dead=use_dead):
            x_hat, vals, idx, aux = fused.topk_forward(sae, x, dead, use_dead)
            fired = mx.zeros((F,)).at[idx.reshape(-1).astype(mx.int32)].add(
                (mx.stop_gradient(vals) > 0).astype(mx.float32).reshape(-1)) > 0
            return mse(x, x_hat) + aux, (aux, fired)

        def ref(x, use_dead=use_dead):
            loss, (mets, fired, _) = train_forward(sae, x, dead, mx.array(1.0), reference, use_dead=use_dead)
            return loss, (mets["aux_loss"] if "aux_loss" in mets else None, fired)

        (la, (auxa, fa)), ga = nn.value_and_grad(sae, mine)(x)
        (lb, (auxb, fb)), gb = nn.value_and_grad(sae, ref)(x)
        _rel_close(la, lb)
        assert mx.array_equal(fa, fb).item()
        if use_dead:
            assert auxa.item() > 0  # the AuxK term is exercised
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            _rel_close(ga[name], gb[name])


def test_trainer_compiled_step_with_fused_backend_matches_reference(monkeypatch):
    """SAETrainer(kernels="fused") runs its compiled step through the fused per-op functions (custom VJPs
    for the select and the sparse decode; here over reference math under another name, as a GPU back end
    would be) and follows the reference trainer step for step, AuxK included once latents go dead."""
    from hooked_mlx.sae.config import SAEConfig
    from hooked_mlx.sae.training import SAETrainer

    ops = _Plain()
    monkeypatch.setattr(FU, "get_ops", lambda name=None: ops)
    Bt = 64
    cfg = SAEConfig(d_in=D, d_sae=F, architecture="topk", k=K, aux_k_coefficient=1 / 32, lr=1e-3,
                    lr_warmup_steps=0, lr_schedule="constant", train_batch_size_tokens=Bt,
                    training_tokens=Bt * 100, b_dec_init="mean", dead_tokens_window=Bt * 3,
                    normalize_activations="none")
    xs = [mx.random.normal((Bt, D), key=mx.random.key(40 + i)) + 0.3 for i in range(8)]
    curves, dead_seen = {}, {}
    for kern in ("reference", "fused"):
        t = SAETrainer(cfg, kernels=kern)
        t.initialize(xs[0], 1.0)
        ls = []
        for x in xs:
            t.step(x)
            mx.eval(t.state_arrays())
            m = t.read_metrics()
            ls.append((m["loss"], m["aux_loss"]))
        curves[kern] = ls
        dead_seen[kern] = any(a > 0 for _, a in ls)
    assert dead_seen["reference"], "the AuxK path was not exercised"
    for (la, aa), (lb, ab) in zip(curves["fused"], curves["reference"]):
        assert abs(la - lb) <= 1e-5 * abs(lb) and abs(aa - ab) <= 1e-5 * max(abs(ab), 1e-12)


class _LowpBackward(FU.ReferenceOps):
    lowp_backward = True  # what the CUDA / Metal back ends do: bf16 dY and xc in the per-latent sums


def test_lowp_backward_changes_only_the_latent_sums_within_bf16_rounding():
    x, W_enc, b_enc, W_dec, b_dec, dead = _problem(2, 100)
    args = (x, W_enc, b_enc, W_dec, b_dec)

    def grads(ops):
        def loss(*a):
            out = FU.topk_sae_forward(*a, K, dead, K_AUX, ops=ops)
            return mx.sum(mx.square(a[0] - out.x_hat)) + mx.sum(mx.square(out.e_hat))
        return mx.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)

    full, low = grads(FU.ReferenceOps()), grads(_LowpBackward())
    for name, a, b in zip(("dx", "dW_enc", "db_enc", "dW_dec", "db_dec"), low, full):
        err = (mx.max(mx.abs(a - b)) / mx.max(mx.abs(b))).item()
        if name in ("dW_enc", "dW_dec"):
            assert 0 < err <= 1e-2, (name, err)  # bf16 operands (2^-8 relative), fp32 sums
        else:
            assert err <= 1e-6, (name, err)


def _compact_like_the_kernel(pre: np.ndarray, t: float, off: np.ndarray, take: np.ndarray, n_keep: int):
    """NumPy model of ``hk_bt_compact``: each row's entries above t and its first take[row] at t, in column
    order, from off[row]."""
    rows = np.full(n_keep, -1)
    cols = np.full(n_keep, -1)
    acts = np.maximum(pre, 0)
    for r in range(pre.shape[0]):
        ties = np.nonzero(acts[r] == t)[0][:take[r]]
        kept = np.sort(np.concatenate([np.nonzero(acts[r] > t)[0], ties]))
        rows[off[r]:off[r] + len(kept)] = r
        cols[off[r]:off[r] + len(kept)] = kept
    return rows, cols, acts[rows, cols]


@pytest.mark.parametrize("seed,n_keep", [(0, 37), (1, 200), (2, 640), (3, 1)])
def test_batch_entry_layout_places_exactly_the_batch_top_entries(seed, n_keep):
    """The GPU BatchTopK bookkeeping (``gpu.batch_entry_layout``): with the exact cut, every row's share, laid out
    contiguously in row order, is the batch's n_keep largest relu'd entries, ties at the cut to the first rows."""
    from hooked_mlx.sae.kernels.gpu import batch_entry_layout

    rng = np.random.default_rng(seed)
    pre = np.round(rng.normal(size=(16, 40)) * 2) / 2  # many ties; negatives (relu 0) too
    if seed == 2:
        pre = -np.abs(pre)  # 640 = every entry, all relu'd to 0
    t = float(np.sort(np.maximum(pre, 0).ravel())[::-1][n_keep - 1])  # the exact cut (batch_kth_largest)
    acts = np.maximum(pre, 0)
    counts = mx.array(np.stack([(acts > t).sum(1), (acts == t).sum(1)], axis=1).astype(np.int32))
    off, take = (np.array(a) for a in batch_entry_layout(counts, n_keep))
    rows, cols, vals = _compact_like_the_kernel(pre, t, off, take, n_keep)
    assert (rows >= 0).all() and len(set(zip(rows.tolist(), cols.tolist()))) == n_keep  # every slot, once
    assert np.array_equal(np.sort(vals), np.sort(acts.ravel())[::-1][:n_keep][::-1])  # the batch's top n_keep
    assert (np.diff(rows) >= 0).all()
    tie_rows = rows[vals == t] if (acts > t).sum() < n_keep else rows[:0]
    eq_rows = np.repeat(np.arange(16), (acts == t).sum(1))
    assert np.array_equal(np.sort(tie_rows), eq_rows[:len(tie_rows)])  # ties: the first rows' first


@pytest.mark.parametrize("n_keep", [1, 300, 4096])
def test_radix_cut_of_bfloat16_values_takes_two_passes_and_is_exact(n_keep):
    """bfloat16 pre-activations have float32 keys whose low 16 bits are zero: the radix select decides them in
    two passes, and its cut is still the exact n_keep-th largest relu'd entry."""
    rng = np.random.default_rng(n_keep)
    pre = mx.array(rng.normal(size=(32, 128)).astype(np.float32)).astype(mx.bfloat16)
    calls = []

    class Counting(FU.ReferenceOps):
        def radix_histogram(self, keys, prefix, shift):
            calls.append(shift)
            return super().radix_histogram(keys, prefix, shift)

    got = Counting().batch_kth_largest(pre, n_keep).item()
    want = np.sort(np.maximum(np.array(pre.astype(mx.float32)), 0).ravel())[::-1][n_keep - 1]
    assert got == want and calls == [24, 16]
