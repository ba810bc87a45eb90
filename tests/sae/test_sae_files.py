"""SAE files: native round trip; SAELens and sparsify files written / read by test-side code that follows
the documented formats (sae-algorithms.md sections 7 and 8) give identical outputs."""

from __future__ import annotations

import json

from hooked_mlx.sae import (
    SAE,
    SAEConfig,
    detect_format,
    export_saelens,
    export_sparsify,
    load_sae,
    load_saelens,
    load_sparsify,
    save_sae,
)
from hooked_mlx.sae.files import sparsify_hook_name
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_sae_model import _random_sae
from tolerance import assert_close

D, F = 16, 64
X = np.random.default_rng(7).normal(size=(40, D)).astype(np.float32)


def _out(sae, x=X):
    return np.array(sae.encode(mx.array(x))), np.array(sae(mx.array(x)))


# --- test-side implementations of the documented semantics ------------------------------------------


def saelens_forward(folder, x):
    """SAELens v6 inference from its files: encode = act((x - b_dec*apply) @ W_enc + b_enc), decode f@W_dec+b_dec."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.astype(np.float64)
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        f = np.maximum(pre, 0)
    elif arch == "topk":
        n = np.linalg.norm(t["W_dec"], axis=1) if cfg.get("rescale_acts_by_decoder_norm") else np.ones(F)
        h = pre * n
        f = np.zeros_like(h)
        idx = np.argsort(-h, axis=-1)[:, : cfg["k"]]
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(h, idx, -1), 0), -1)
        f = f / n
    elif arch == "jumprelu":
        f = np.maximum(pre, 0) * (pre > t["threshold"])
    return f, f @ t["W_dec"] + t["b_dec"]


def write_saelens(folder, arch, rng, k=5, rescale=False, apply_b_dec=True):
    folder.mkdir(parents=True)
    t = {"W_enc": rng.normal(size=(D, F)), "b_enc": rng.normal(size=F) * 0.1,
         "W_dec": rng.normal(size=(F, D)) * 0.3, "b_dec": rng.normal(size=D) * 0.2}
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.1.hook_resid_post",
                        "model_name": "stories260K", "context_size": 128}}
    if arch == "topk":
        cfg.update(k=k, rescale_acts_by_decoder_norm=rescale)
    if arch == "jumprelu":
        t["threshold"] = np.abs(rng.normal(size=F)) * 0.5
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))


def write_sparsify(folder, rng, k=6):
    folder.mkdir(parents=True)
    t = {"encoder.weight": rng.normal(size=(F, D)), "encoder.bias": rng.normal(size=F) * 0.1,
         "W_dec": rng.normal(size=(F, D)) * 0.3, "b_dec": rng.normal(size=D) * 0.2}
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4,
                                                 "normalize_decoder": True, "num_latents": F, "k": k,
                                                 "multi_topk": False, "skip_connection": False, "d_in": D}))
    return t


def sparsify_forward(folder, x):
    """sparsify: relu((x - b_dec) @ encoder.weight.T + encoder.bias), top-k, sum of W_dec rows + b_dec."""
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae.safetensors")).items()}
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=-1)[:, : cfg["k"]]
    vals = np.take_along_axis(pre, idx, -1)
    return np.einsum("bk,bkd->bd", vals, t["W_dec"][idx]) + t["b_dec"]


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_native_round_trip(arch, tmp_path):
    sae = _random_sae(arch, d_in=D, d_sae=F, hook_name="blocks.1.hook_resid_post")
    save_sae(sae, str(tmp_path / "s"))
    assert detect_format(str(tmp_path / "s")) == "native"
    back = load_sae(str(tmp_path / "s"))
    assert back.cfg == sae.cfg
    for a, b in zip(_out(sae), _out(back)):
        np.testing.assert_array_equal(a, b)
    assert not list((tmp_path / "s").glob("*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_export_matches_documented_semantics(arch, tmp_path):
    sae = _random_sae(arch, d_in=D, d_sae=F, hook_name="blocks.1.hook_resid_post", model_name="stories260K")
    sae.fold_input_scale(2.5)  # as after training with normalisation
    folder = tmp_path / "sl"
    export_saelens(sae, str(folder))
    cfg = json.loads((folder / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert cfg["architecture"] == expected_arch
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if expected_arch == "jumprelu" else set())
    if arch == "batchtopk":
        np.testing.assert_array_equal(tensors["threshold"], np.full(F, 0.4, dtype=np.float32))
    if arch == "topk":
        assert cfg["k"] == sae.cfg.k and cfg["rescale_acts_by_decoder_norm"] is False
    f_ref, xh_ref = saelens_forward(folder, X)
    f, xh = _out(sae)
    assert_close(f, f_ref, tol=1e-4)
    assert_close(xh, xh_ref, tol=1e-4)
    back = load_saelens(str(folder))
    assert_close(_out(back)[1], xh, tol=1e-5)


@pytest.mark.parametrize("arch, rescale", [("standard", False), ("topk", False), ("topk", True), ("jumprelu", False)])
def test_saelens_files_load_with_identical_outputs(arch, rescale, tmp_path):
    folder = tmp_path / arch
    write_saelens(folder, arch, np.random.default_rng(1), rescale=rescale)
    assert detect_format(str(folder)) == "saelens"
    sae = load_sae(str(folder))
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    f_ref, xh_ref = saelens_forward(folder, X)
    f, xh = _out(sae)
    assert_close(xh, xh_ref, tol=1e-4)
    if not rescale:
        assert_close(f, f_ref, tol=1e-4)
    else:  # folded decoder norms: same reconstruction, latents scaled by ||W_dec,i||
        n = np.linalg.norm(load_file(str(folder / "sae_weights.safetensors"))["W_dec"], axis=1)
        assert_close(f, f_ref * n, tol=1e-4)


def test_saelens_rejects_what_it_cannot_load_exactly(tmp_path):
    folder = tmp_path / "n"
    write_saelens(folder, "standard", np.random.default_rng(2))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "covariance_whitening"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations = 'covariance_whitening' is not supported"):
        load_saelens(str(folder))
    cfg["normalize_activations"] = "none"
    cfg["architecture"] = "matching_pursuit"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'matching_pursuit' is not supported"):
        load_saelens(str(folder))


def test_sparsify_files_load_with_identical_outputs(tmp_path):
    root = tmp_path / "sp"
    write_sparsify(root / "layers.1", np.random.default_rng(3))
    write_sparsify(root / "layers.2.mlp", np.random.default_rng(4))
    assert detect_format(str(root)) == "sparsify"
    with pytest.raises(ValueError, match="pass hookpoint="):
        load_sparsify(str(root))
    sae = load_sparsify(str(root), hookpoint="layers.1")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.k == 6
    assert_close(_out(sae)[1], sparsify_forward(root / "layers.1", X.astype(np.float64)), tol=1e-4)
    assert load_sae(str(root / "layers.2.mlp")).cfg.hook_name == "blocks.2.hook_mlp_out"
    assert sparsify_hook_name("model.layers.7.self_attn") == "blocks.7.hook_attn_out"


def test_sparsify_export_round_trip(tmp_path):
    sae = _random_sae("topk", d_in=D, d_sae=F, hook_name="blocks.1.hook_resid_post")
    folder = export_sparsify(sae, str(tmp_path), hookpoint="layers.1")
    t = load_file(str(tmp_path / "layers.1" / "sae.safetensors"))
    assert t["encoder.weight"].shape == (F, D) and t["W_dec"].shape == (F, D)
    assert_close(_out(sae)[1], sparsify_forward(tmp_path / "layers.1", X.astype(np.float64)), tol=1e-4)
    assert_close(_out(load_sparsify(folder))[1], _out(sae)[1], tol=1e-6)
    with pytest.raises(ValueError, match="sparsify stores TopK SAEs only"):
        export_sparsify(_random_sae("relu", d_in=D, d_sae=F), str(tmp_path / "x"))


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no SAE files"):
        load_sae(str(tmp_path))
    sae = SAE(SAEConfig(architecture="topk", d_in=D, d_sae=F, k=4))
    save_sae(sae, str(tmp_path / "s"))
    w = load_file(str(tmp_path / "s" / "sae.safetensors"))
    w["W_enc"] = w["W_enc"][:, :10]
    save_file(w, str(tmp_path / "s" / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"tensor W_enc has shape \(16, 10\), expected \(16, 64\)"):
        load_sae(str(tmp_path / "s"))
