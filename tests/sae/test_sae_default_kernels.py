"""The default trainer path (kernels="auto": the device's fused ops and the fused update) computes what the
reference path computes: every architecture tracks the reference over many steps, the CPU ops equal the
reference ops, and the clip folded into Adam's hyper-parameters equals clipping the gradient."""

from __future__ import annotations

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.sae import SAEConfig, SAETrainer
from hooked_mlx.sae.kernels import fused as FU
from hooked_mlx.sae.kernels import native_build
from hooked_mlx.sae.kernels.cpu import CpuOps
import mlx.core as mx
import numpy as np
import pytest
from sae_fixtures import make_sparse_data
from tolerance import assert_close, rel_maxdiff

B = 256


def _cfg(arch, **kw):
    base = dict(architecture=arch, hook_name="h", d_in=32, d_sae=256, k=8, lr=3e-3, lr_warmup_steps=5,
                train_batch_size_tokens=B, training_tokens=40 * B, dead_tokens_window=4 * B,
                normalize_activations="none", grad_clip_norm=0.05)  # a clip that is active on most steps
    base.update(kw)
    return SAEConfig(**base)


def _run(cfg, kernels, data, steps=40):
    t = SAETrainer(cfg, kernels=kernels)
    batches = [mx.array(data[i * B:(i + 1) * B]) for i in range(steps)]
    t.initialize(batches[0])
    for x in batches:
        t.step(x)
    mx.eval(t.state_arrays())
    return t, t.read_metrics()


def test_auto_is_the_default_and_picks_the_cpu_ops():
    t = SAETrainer(_cfg("topk"))
    assert SAEConfig().kernels == "auto"
    if mx.default_device() == mx.cpu:
        expected = "cpu"
    else:
        expected = "cuda" if mx.cuda.is_available() else "metal"
    assert t.kernels_name == expected  # a back end that failed its self-check would show "reference"
    assert t.fused_ops is not None


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_default_path_tracks_the_reference(arch):
    data = make_sparse_data()
    kw = {"l1_coefficient": 0.3} if arch == "relu" else {"l0_coefficient": 0.05} if arch == "jumprelu" else {}
    cfg = _cfg(arch, **kw)
    fast, m_fast = _run(cfg, "auto", data)
    ref, m_ref = _run(cfg, "reference", data)
    # 40 Adam steps from the same start. fp32 back ends (CPU): rounding of different summation orders only.
    # GPU back ends run the encoder matmul in bf16 (fp32 accumulation), as sparsify's autocast does.
    # JumpReLU's step function is discontinuous: after ~15 steps a pre-activation within rounding of its
    # threshold lands on the other side in one run (measured: 5e-8 after 10 steps, 2.7e-4 after 20 and 40).
    lowp = fast.fused_ops.matmul_dtype is not None
    p_tol, m_tol = (3e-2, 3e-2) if lowp else (1e-3, 2e-3) if arch == "jumprelu" else (2e-4, 2e-3)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        d = rel_maxdiff(getattr(fast.sae, name), getattr(ref.sae, name))
        print(f"{arch} {name}: max relative difference to the reference after 40 steps {d:.2e}")
        assert d < p_tol, name
    for k in ("loss", "fvu", "l0", "grad_norm", "lr"):
        assert m_fast[k] == pytest.approx(m_ref[k], rel=m_tol, abs=1e-6), k
    assert int(fast.aux["step"].item()) == int(ref.aux["step"].item()) == 40


def test_cpu_ops_equal_reference_ops():
    rng = np.random.default_rng(0)
    Bn, D, F, k = 64, 48, 512, 8
    pre = mx.array(rng.normal(size=(Bn, F)).astype(np.float32))
    cpu, ref = CpuOps(), FU.ReferenceOps()
    (v1, i1), (v2, i2) = cpu.row_topk(pre, k), ref.row_topk(pre, k)
    assert np.array_equal(np.sort(np.array(v1), -1), np.sort(np.array(v2), -1))
    assert np.array_equal(np.sort(np.array(i1), -1), np.sort(np.array(i2), -1))
    W = mx.array(rng.normal(size=(F, D)).astype(np.float32))
    Y = mx.array(rng.normal(size=(Bn, D)).astype(np.float32))
    assert_close(cpu.decode(v1, i1, W), ref.decode(v1, i1, W))
    assert_close(cpu.gather_dot(Y, i1, W), ref.gather_dot(Y, i1, W))
    rows = mx.repeat(mx.arange(Bn, dtype=mx.uint32), k)
    cols = i1.reshape(-1)
    coef = v1.reshape(-1)
    got, want = cpu.latent_grads(cols, rows, rows, coef, coef * 2, Y, Y, F), \
        ref.latent_grads(cols, rows, rows, coef, coef * 2, Y, Y, F)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert FU.self_check(cpu) == []


def test_sorted_entries_delimit_each_latents_sums():
    """The GPU back ends' segmented ``latent_grads`` kernels read latent f's entries at offsets[f]:offsets[f+1]
    of ``gpu.sorted_entries``, rows ascending; a NumPy kernel on that contract equals the reference sums."""
    from hooked_mlx.sae.kernels import gpu

    rng = np.random.default_rng(2)
    Bn, D, F, k = 40, 12, 300, 6
    cols = mx.array(rng.integers(0, F, size=Bn * k).astype(np.uint32))
    rows = mx.repeat(mx.arange(Bn, dtype=mx.uint32), k)
    cd, ce = (mx.array(rng.normal(size=Bn * k).astype(np.float32)) for _ in range(2))
    Y, X = (mx.array(rng.normal(size=(Bn, D)).astype(np.float32)) for _ in range(2))
    offsets, r_dec, r_enc, c_dec, c_enc = (np.array(a) for a in gpu.sorted_entries(cols, rows, rows, cd, ce, Bn, F))
    assert offsets[0] == 0 and offsets[-1] == Bn * k and np.all(np.diff(offsets) >= 0)
    dec, enc, db = np.zeros((F, D), np.float32), np.zeros((D, F), np.float32), np.zeros(F, np.float32)
    for f in range(F):
        q = slice(offsets[f], offsets[f + 1])
        assert np.all(np.diff(r_dec[q].astype(np.int64)) >= 0)  # rows ascending within a latent: a fixed order
        dec[f], enc[:, f], db[f] = c_dec[q] @ np.array(Y)[r_dec[q]], c_enc[q] @ np.array(X)[r_enc[q]], c_enc[q].sum()
    want = FU.ReferenceOps().latent_grads(cols, rows, rows, cd, ce, Y, X, F)
    for a, b in zip((dec, enc, db), want):
        assert_close(mx.array(a), b)


def test_clip_folded_into_adam_equals_clipping_the_gradient():
    rng = np.random.default_rng(1)
    p, g, m, v = (mx.array(rng.normal(size=(16, 8)).astype(np.float32)) for _ in range(4))
    v = mx.abs(v)
    s = 0.37
    hp_folded = FU.adam_hparams(1e-3, 0.9, 0.999, 1e-8, 5, grad_scale=s)
    hp_plain = FU.adam_hparams(1e-3, 0.9, 0.999, 1e-8, 5)
    ops = FU.ReferenceOps()
    for a, b in zip(ops.adam(p, g, m, v, hp_folded), ops.adam(p, g * s, m, v, hp_plain)):
        assert_close(a, b, 1e-6)


class _InPassOps(FU.ReferenceOps):
    """The reference ops with the GPU back ends' update layout (projection inside the decoder pass)."""

    fused_optimizer = True


def _reference_update(params, grads, opt, clip):
    """The trainer's reference update: projection, clip_grad_norm, MLX Adam, renorm."""
    import mlx.optimizers as optim

    g = dict(grads)
    W = params["W_dec"]
    g["W_dec"] = g["W_dec"] - mx.sum(g["W_dec"] * W, axis=-1, keepdims=True) * W
    g, norm = optim.clip_grad_norm(g, clip)
    new = opt.apply_gradients(g, params)
    new["W_dec"] = new["W_dec"] / (mx.linalg.norm(new["W_dec"], axis=-1, keepdims=True) + 1e-8)
    return new, norm


def _native_cpu_ops():
    from hooked_mlx.sae.kernels.cpu_native import NativeCpuOps

    return NativeCpuOps()


@pytest.mark.parametrize("ops", [FU.ReferenceOps(), _InPassOps(), CpuOps(), "native"],
                         ids=["pre-pass", "in-pass", "cpu-mlx", "cpu"])
@pytest.mark.parametrize("clip", [1e-3, 100.0], ids=["clipped", "unclipped"])
def test_fused_update_equals_the_reference_update(ops, clip):
    from hooked_mlx.sae.fused_update import fused_adam_update
    import mlx.optimizers as optim

    if ops == "native":
        if not native_build.enabled():
            pytest.skip("HOOKED_MLX_CPU_NATIVE=0")
        ops = _native_cpu_ops()
    rng = np.random.default_rng(2)
    D, F = 24, 96
    W_dec = rng.normal(size=(F, D)).astype(np.float32)
    params = {"W_enc": mx.array(rng.normal(size=(D, F)).astype(np.float32)), "b_enc": mx.zeros((F,)),
              "W_dec": mx.array(W_dec / np.linalg.norm(W_dec, axis=-1, keepdims=True)), "b_dec": mx.ones((D,))}
    grads = {k: mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.1) for k, v in params.items()}
    lr_fn = optim.linear_schedule(1e-3, 2e-3, 10)
    ref_opt = optim.Adam(learning_rate=lr_fn, bias_correction=True)
    ref_opt.init(params)
    fused_opt = optim.Adam(learning_rate=lr_fn, bias_correction=True)
    fused_opt.init(params)
    p_ref, p_fused = params, params
    for _ in range(3):
        p_ref, n_ref = _reference_update(p_ref, grads, ref_opt, clip)
        p_fused, n_fused, _, applied = fused_adam_update(p_fused, grads, fused_opt.state, lr_fn, betas=(0.9, 0.999),
                                                         eps=1e-8, clip=clip, unit_norm=True, ops=ops)
        assert bool(applied.item())
        assert float(n_fused) == pytest.approx(float(n_ref), rel=1e-5)
    for k in params:
        assert_close(p_fused[k], p_ref[k], 1e-6, err_msg=k)
        assert_close(fused_opt.state[k]["m"], ref_opt.state[k]["m"], 1e-6, err_msg=k)
        assert_close(fused_opt.state[k]["v"], ref_opt.state[k]["v"], 1e-6, err_msg=k)
    assert int(fused_opt.state["step"].item()) == int(ref_opt.state["step"].item()) == 3
    # a skipped step (non-finite gradient) changes nothing, exactly: no copy of the old state is kept
    bad = {**grads, "W_enc": grads["W_enc"] * float("nan")}
    before = {k: np.array(v) for k, v in p_fused.items()}
    m_before = np.array(fused_opt.state["W_dec"]["m"])
    p_skip, _, _, applied = fused_adam_update(p_fused, bad, fused_opt.state, lr_fn, betas=(0.9, 0.999), eps=1e-8,
                                              clip=clip, unit_norm=True, ops=ops)
    assert not bool(applied.item())
    for k in params:
        assert np.array_equal(np.array(p_skip[k]), before[k]), k
    assert np.array_equal(np.array(fused_opt.state["W_dec"]["m"]), m_before)
    assert int(fused_opt.state["step"].item()) == 3


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_low_memory_update_order_computes_the_same_step(arch):
    """``low_memory`` (the default for SAEs above 2 GB) runs the fused Adam passes after the compiled step,
    one parameter at a time; it is the same update, including the skipped non-finite step."""
    data = make_sparse_data()
    cfg = _cfg(arch, **({"l0_coefficient": 0.05} if arch == "jumprelu" else {}))
    runs = []
    for low_memory in (False, True):
        t = SAETrainer(cfg, kernels="auto")
        t.fused_ops, t.fused_update, t.low_memory = _InPassOps(), True, low_memory  # the GPU update layout
        batches = [mx.array(data[i * B:(i + 1) * B]) for i in range(12)]
        batches[7] = batches[7] * float("nan")  # one bad step: skipped, and reported
        t.initialize(batches[0])
        for x in batches:
            t.step(x)
        mx.eval(t.state_arrays())
        runs.append(t)
    fast, slow = runs
    assert fast.has_non_finite_step() and slow.has_non_finite_step()
    assert int(slow.aux["bad_step"].item()) == int(fast.aux["bad_step"].item()) == 7
    for name, v in fast.sae.trainable_parameters().items():
        assert_close(slow.sae.trainable_parameters()[name], v, 1e-6, err_msg=name)
        assert_close(slow.optimizer.state[name]["v"], fast.optimizer.state[name]["v"], 1e-6, err_msg=name)
    assert int(slow.optimizer.state["step"].item()) == int(fast.optimizer.state["step"].item()) == 7
