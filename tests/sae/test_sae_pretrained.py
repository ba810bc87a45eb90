"""Published SAEs: Gemma Scope's parameter files (Gemma Scope params.npz, Gemma Scope 2 params.safetensors) load
as JumpReLU SAEs / transcoders that compute Gemma Scope's published formula, and ``from_pretrained(release,
sae_id)`` resolves through sae_lens's directory or a repository id, from the local Hugging Face cache."""

from __future__ import annotations

import sys
import types

from hooked_mlx.sae import SAE, detect_format, from_pretrained, load_gemma_scope, load_sae
import huggingface_hub.constants as hf_constants
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file
from tolerance import assert_close

D, F, N = 16, 48, 32


def _params(rng, d_out=D, affine=False):
    p = {"W_enc": rng.normal(size=(D, F)) / 4, "W_dec": rng.normal(size=(F, d_out)) / 4,
         "b_enc": rng.normal(size=F) / 2, "b_dec": rng.normal(size=d_out) / 2, "threshold": np.abs(rng.normal(size=F)) / 3}
    if affine:
        p["affine_skip_connection"] = rng.normal(size=(D, d_out)) / 4
    return {k: v.astype(np.float32) for k, v in p.items()}


def _gemma_scope_formula(p, x):
    """The JumpReLU SAE of the Gemma Scope tutorial (no b_dec subtraction on the input), in float64."""
    pre = x @ p["W_enc"].astype(np.float64) + p["b_enc"]
    f = np.where(pre > p["threshold"], pre, 0.0)
    out = f @ p["W_dec"].astype(np.float64) + p["b_dec"]
    if "affine_skip_connection" in p:
        out = out + x @ p["affine_skip_connection"].astype(np.float64)
    return f, out


def test_gemma_scope_params_npz_is_its_jumprelu_formula(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    p = _params(rng)
    np.savez(folder / "params.npz", **{k.lower(): v for k, v in p.items()})
    assert detect_format(str(folder)) == "gemma_scope"
    x = rng.normal(size=(N, D)).astype(np.float32)
    f, out = _gemma_scope_formula(p, x.astype(np.float64))
    for sae in (load_sae(str(folder)), load_gemma_scope(str(folder))):
        assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
        assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and not sae.cfg.is_transcoder
        assert_close(sae.encode(mx.array(x)), f, 1e-5)
        assert_close(sae(mx.array(x)), out, 1e-5)
    assert load_gemma_scope(str(folder), hook_name="blocks.3.hook_mlp_out").cfg.hook_name == "blocks.3.hook_mlp_out"


def test_gemma_scope_2_affine_transcoder(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "transcoder_all" / "layer_2_width_16k_l0_small_affine"
    folder.mkdir(parents=True)
    p = _params(rng, d_out=D, affine=True)
    save_file({k.lower(): v for k, v in p.items()}, str(folder / "params.safetensors"))
    sae = load_sae(str(folder))
    assert sae.cfg.is_transcoder and sae.cfg.skip_connection
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == ("blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out")
    x = rng.normal(size=(N, D)).astype(np.float32)
    assert_close(sae(mx.array(x)), _gemma_scope_formula(p, x.astype(np.float64))[1], 1e-5)


def test_gemma_scope_without_a_site_in_the_path_asks_for_the_hook(tmp_path):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    np.savez(folder / "params.npz", **{k.lower(): v for k, v in _params(np.random.default_rng(2)).items()})
    with pytest.raises(ValueError, match="hook_name="):
        load_sae(str(folder))


def _fake_hub_cache(root, repo_id, folder, rng):
    """The Hugging Face cache layout (models--org--name/refs/main -> snapshots/<hash>/...)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / folder
    target.mkdir(parents=True)
    p = _params(rng)
    np.savez(target / "params.npz", **{k.lower(): v for k, v in p.items()})
    return p


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # (as if sae_lens were not installed)
    return tmp_path / "hub"


def test_from_pretrained_reads_the_local_hugging_face_cache(offline_cache):
    rng = np.random.default_rng(3)
    folder = "layer_5/width_16k/average_l0_71"
    p = _fake_hub_cache(offline_cache, "google/gemma-scope-2b-pt-mlp", folder, rng)
    for sae in (from_pretrained("google/gemma-scope-2b-pt-mlp", folder),
                SAE.from_pretrained("google/gemma-scope-2b-pt-mlp", folder)):
        assert sae.cfg.hook_name == "blocks.5.hook_mlp_out"
        assert sae.cfg.extra["repo_id"] == "google/gemma-scope-2b-pt-mlp"
        x = rng.normal(size=(N, D)).astype(np.float32)
        assert_close(sae(mx.array(x)), _gemma_scope_formula(p, x.astype(np.float64))[1], 1e-5)


def test_from_pretrained_errors_say_what_to_do(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"load_sae\(path\)"):
        from_pretrained("google/gemma-scope-2b-pt-res", "layer_0/width_16k/average_l0_1")
    with pytest.raises(ValueError, match="Install sae-lens"):
        from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical")


def test_from_pretrained_resolves_sae_lens_release_names(offline_cache, monkeypatch):
    """With sae_lens installed, its pretrained directory maps (release, sae_id) to (repository, folder)."""
    rng = np.random.default_rng(4)
    p = _fake_hub_cache(offline_cache, "google/gemma-scope-2b-pt-res", "layer_7/width_16k/average_l0_20", rng)
    entry = types.SimpleNamespace(repo_id="google/gemma-scope-2b-pt-res",
                                  saes_map={"layer_7/width_16k/canonical": "layer_7/width_16k/average_l0_20"})
    mod = types.ModuleType("sae_lens.loading.pretrained_saes_directory")
    mod.get_pretrained_saes_directory = lambda: {"gemma-scope-2b-pt-res-canonical": entry}  # type: ignore[attr-defined]
    for name in ("sae_lens", "sae_lens.loading"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sae_lens.loading.pretrained_saes_directory", mod)
    sae = from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_7/width_16k/canonical")
    assert sae.cfg.hook_name == "blocks.7.hook_resid_post"
    x = rng.normal(size=(N, D)).astype(np.float32)
    assert_close(sae(mx.array(x)), _gemma_scope_formula(p, x.astype(np.float64))[1], 1e-5)
    with pytest.raises(ValueError, match="has no SAE 'layer_8"):
        from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_8/width_16k/canonical")
