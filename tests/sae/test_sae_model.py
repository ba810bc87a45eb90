"""Reference kernels and the SAE module against NumPy definitions (sae-algorithms.md sections 1 and 7)."""

from __future__ import annotations

from hooked_mlx.sae import SAE, SAEConfig
from hooked_mlx.sae.kernels import reference as K
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close


def _np(a):
    return np.array(a, dtype=np.float64)


def _random_sae(arch, d_in=16, d_sae=64, k=4, seed=0, **kw):
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, seed=seed, **kw)
    sae = SAE(cfg)
    rng = np.random.default_rng(seed)
    sae.W_enc = mx.array(rng.normal(size=(d_in, d_sae)).astype(np.float32) * 0.5)
    sae.b_enc = mx.array(rng.normal(size=(d_sae,)).astype(np.float32) * 0.1)
    sae.W_dec = mx.array(rng.normal(size=(d_sae, d_in)).astype(np.float32) * 0.3)
    sae.b_dec = mx.array(rng.normal(size=(d_in,)).astype(np.float32) * 0.2)
    if arch in ("jumprelu", "batchtopk"):
        sae.threshold = mx.array(np.abs(rng.normal(size=(d_sae,))).astype(np.float32) * 0.5) if arch == "jumprelu" \
            else mx.full((d_sae,), 0.4)
    return sae


def _np_forward(sae, x):
    W_enc, b_enc, W_dec, b_dec = (_np(a) for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    arch = sae.cfg.architecture
    if arch == "relu":
        f = np.maximum(pre, 0)
    elif arch == "topk":
        f = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1)[:, : sae.cfg.k]
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    else:
        th = _np(sae.threshold)
        f = np.where(pre > th, np.maximum(pre, 0), 0)
    return f, f @ W_dec + b_dec


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_encode_decode_match_numpy(arch):
    sae = _random_sae(arch)
    x = np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)
    f_ref, xh_ref = _np_forward(sae, x.astype(np.float64))
    f = sae.encode(mx.array(x))
    assert_close(_np(f), f_ref, tol=2e-5)
    assert_close(_np(sae(mx.array(x))), xh_ref, tol=2e-5)
    assert_close(_np(sae.decode(f)), xh_ref, tol=2e-5)
    # leading dims are kept
    assert sae(mx.array(x).reshape(4, 8, 16)).shape == (4, 8, 16)
    if arch == "topk":
        assert np.all((_np(f) != 0).sum(-1) <= 4)


def test_topk_select_and_sparse_decode():
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(8, 50)).astype(np.float32)
    vals, idx = K.topk_select(mx.array(pre), 5)
    ref = np.sort(pre, axis=-1)[:, ::-1][:, :5]
    assert_close(np.sort(_np(vals), -1)[:, ::-1], np.maximum(ref, 0), tol=0)
    W = rng.normal(size=(50, 6)).astype(np.float32)
    dense = K.scatter_dense(vals, idx, 50)
    assert_close(_np(K.sparse_decode(vals, idx, mx.array(W))), _np(dense) @ W, tol=1e-5)


def test_batchtopk_keeps_k_times_batch():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(16, 40)), 0).astype(np.float32)
    kept, cut = K.batchtopk_mask(mx.array(acts), 3)
    kept = _np(kept)
    assert (kept > 0).sum() == 48
    assert float(cut) == pytest.approx(np.sort(acts.ravel())[::-1][47])


def test_jumprelu_straight_through_gradients():
    """d/dtheta of JumpReLU and of H follow the rectangle-kernel formulas; d/dz passes where z > theta."""
    eps = 0.5
    z = mx.array([[0.1, 0.9, 1.2, 2.0], [0.95, 0.3, 1.1, 0.6]])
    theta = mx.array([0.2, 1.0, 1.0, 0.5])
    gz, gt = mx.grad(lambda z, t: K.jumprelu(z, t, eps).sum(), argnums=(0, 1))(z, theta)
    zn, tn = _np(z), _np(theta)
    rect = (np.abs((zn - tn) / eps) < 0.5).astype(float)
    np.testing.assert_allclose(_np(gz), ((zn > tn) & (zn > 0)).astype(float))
    assert_close(_np(gt), (-(tn / eps) * rect).sum(0), tol=1e-6)
    hz, ht = mx.grad(lambda z, t: K.heaviside(z, t, eps).sum(), argnums=(0, 1))(z, theta)
    np.testing.assert_allclose(_np(hz), 0)
    assert_close(_np(ht), (-(1 / eps) * rect).sum(0), tol=1e-6)
    np.testing.assert_allclose(_np(K.jumprelu(z, theta, eps)), np.where(zn > tn, zn, 0))


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_fold_input_scale_is_exact(arch):
    """An SAE on x*s with folded weights gives the same latents and x_hat/s on raw x."""
    sae = _random_sae(arch)
    x = mx.array(np.random.default_rng(2).normal(size=(20, 16)).astype(np.float32))
    s = 3.7
    f_scaled, xh_scaled = sae.encode(x * s), sae(x * s)
    sae.fold_input_scale(s)
    np.testing.assert_allclose(_np(sae.encode(x)), _np(f_scaled), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_np(sae(x)), _np(xh_scaled) / s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_fold_decoder_norms_keeps_outputs(arch):
    sae = _random_sae(arch)
    x = mx.array(np.random.default_rng(3).normal(size=(20, 16)).astype(np.float32))
    before = sae(x)
    sae.fold_decoder_norms()
    assert_close(_np(sae.decoder_norms()), 1.0, tol=1e-5)
    assert_close(_np(sae(x)), _np(before), tol=1e-4)


def test_init_and_errors():
    cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=2)
    sae = SAE(cfg)
    assert_close(_np(sae.decoder_norms()), 1.0, tol=1e-5)  # unit-norm rows
    np.testing.assert_allclose(_np(sae.W_enc), _np(sae.W_dec).T)  # tied init
    relu = SAE(SAEConfig(architecture="relu", d_in=8, d_sae=32))
    assert_close(_np(relu.decoder_norms()), SAEConfig.defaults()["decoder_init_norm"], tol=1e-5)
    assert "threshold" in SAE(SAEConfig(architecture="jumprelu", d_in=8, d_sae=32))
    assert "threshold" not in SAE(SAEConfig(architecture="batchtopk", d_in=8, d_sae=32)).trainable_parameters()
    with pytest.raises(ValueError, match="last dimension 5, expected d_in = 8"):
        sae(mx.zeros((2, 5)))
    with pytest.raises(ValueError, match="d_in = 0"):
        SAE(SAEConfig())


def test_batchtopk_threshold_calibration():
    sae = _random_sae("batchtopk", d_in=16, d_sae=64, k=4)
    x = mx.array(np.random.default_rng(5).normal(size=(500, 16)).astype(np.float32))
    theta = sae.calibrate_threshold(x)
    assert float(sae.threshold[0]) == pytest.approx(theta) and theta > 0
    l0 = float((np.array(sae.encode(x)) != 0).sum(-1).mean())
    assert l0 == pytest.approx(4.0, abs=1e-6)
    sae.calibrate_threshold(x, target_l0=2.5)
    assert float((np.array(sae.encode(x)) != 0).sum(-1).mean()) == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(ValueError, match="batchtopk SAEs only"):
        _random_sae("topk").calibrate_threshold(x)
