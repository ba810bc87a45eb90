"""SAEs and transcoders written by SAELens 6.54.12 itself (tests/sae/data/saelens_6.54.12, made by make_saelens_fixtures.py
with SAELens's own classes and writers) load in hooked_mlx and give SAELens's own outputs: the latents
(``encode``) and the reconstruction (``forward``) SAELens computed from the same files."""

from __future__ import annotations

import json
import os
import shutil

from hooked_mlx.sae import detect_format, load_sae, load_saelens
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file
from tolerance import assert_close

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saelens_6.54.12")
LOADABLE = ["standard", "standard_no_b_dec_in", "jumprelu", "topk", "topk_rescaled", "batchtopk_inference",
            "matryoshka_batchtopk_inference", "gated", "standard_expected_average_only_in",
            "standard_constant_norm_rescale", "standard_layer_norm", "topk_layer_norm", "hook_z", "stories_topk",
            "transcoder", "skip_transcoder", "jumprelu_transcoder"]
#: SAELens applies these normalisations per token at run time: decode alone stays in the normalised space
RUN_TIME_NORMED = ["standard_constant_norm_rescale", "standard_layer_norm", "topk_layer_norm"]


def _expected(name):
    return load_file(os.path.join(ROOT, name, "expected.safetensors"))


@pytest.mark.parametrize("name", LOADABLE)
def test_saelens_written_sae_gives_saelens_outputs(name):
    folder = os.path.join(ROOT, name)
    assert detect_format(folder) == "saelens"
    exp = _expected(name)
    # a hook_z SAE reads [..., n_heads, d_head] flattened (SAELens's reshape; a spliced one is reshaped for it)
    x_in = exp["x"].reshape(exp["x"].shape[0], -1)
    sae_out = exp["sae_out"].reshape(x_in.shape[0], -1)
    for sae in (load_saelens(folder), load_sae(folder)):
        x = mx.array(x_in)
        f = np.array(sae.encode(x))
        assert_close(f, exp["feature_acts"], 1e-5, err_msg=f"{name}: latents")
        # the same latents are active (a threshold or top-k cut that moved would show here first)
        np.testing.assert_array_equal(f > 0, exp["feature_acts"] > 0)
        assert_close(sae(x), sae_out, 1e-5, err_msg=f"{name}: reconstruction")
        assert_close(sae.predict(mx.array(f), x), sae_out, 1e-5, err_msg=f"{name}: predict")
        if "skip" not in name and name not in RUN_TIME_NORMED:  # (a skip transcoder adds x @ W_skip.T)
            assert_close(sae.decode(mx.array(f)), sae_out, 1e-5, err_msg=f"{name}: decode")
        assert sae.d_in == x_in.shape[1] and sae.d_sae == exp["feature_acts"].shape[1]
        assert sae.d_out == sae_out.shape[1]
        norm = {"standard_constant_norm_rescale": "constant_norm_rescale", "standard_layer_norm": "layer_norm",
                "topk_layer_norm": "layer_norm"}.get(name, "none")
        assert sae.cfg.normalize_activations == norm
        if name == "gated" or name.startswith("standard"):
            assert sae.cfg.architecture == ("gated" if name == "gated" else "relu")
        if "transcoder" in name:  # reads an MLP's input: writes that block's MLP output
            assert sae.cfg.is_transcoder and sae.cfg.hook_name_out == "blocks.1.hook_mlp_out"
            assert sae.cfg.skip_connection == ("skip" in name)


def test_saelens_fixtures_are_not_trivial():
    """Every case has some but not all latents active, so thresholds and cuts are exercised."""
    for name in LOADABLE:
        f = _expected(name)["feature_acts"]
        l0 = (f > 0).sum(-1).mean()
        assert 1 < l0 < f.shape[1] - 1, (name, l0)


def test_saelens_settings_not_supported_are_refused_by_name(tmp_path):
    for key, value in (("architecture", "temporal"), ("normalize_activations", "covariance_whitening"),
                       ("reshape_activations", "hook_q")):
        other = tmp_path / f"{key}_{value}"
        shutil.copytree(os.path.join(ROOT, "standard"), other)
        cfg = json.loads((other / "cfg.json").read_text())
        cfg[key] = value
        (other / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=value):
            load_saelens(str(other))


@pytest.mark.parametrize("name", ["gated", "standard_layer_norm", "topk_layer_norm", "standard_constant_norm_rescale",
                                  "hook_z"])
def test_saelens_formats_round_trip_through_export(name, tmp_path):
    """Exported again (export_saelens), the file keeps the architecture, the normalisation and the hook_z
    reshape, and gives SAELens's outputs."""
    from hooked_mlx.sae import export_saelens

    sae = load_saelens(os.path.join(ROOT, name))
    out = export_saelens(sae, str(tmp_path / name))
    cfg = json.loads(open(os.path.join(out, "cfg.json")).read())
    original = json.loads(open(os.path.join(ROOT, name, "cfg.json")).read())
    for key in ("architecture", "normalize_activations", "reshape_activations", "d_in", "d_sae"):
        assert cfg[key] == original[key], key
    again = load_saelens(out)
    exp = _expected(name)
    x = mx.array(exp["x"].reshape(exp["x"].shape[0], -1))
    assert_close(again(x), exp["sae_out"].reshape(x.shape[0], -1), 1e-5)


def test_trainer_refuses_what_only_loads():
    from hooked_mlx.sae import SAEConfig, SAETrainer

    with pytest.raises(ValueError, match="gated"):
        SAETrainer(SAEConfig(architecture="gated", d_in=8, d_sae=16))
    with pytest.raises(ValueError, match="layer_norm"):
        SAETrainer(SAEConfig(architecture="relu", d_in=8, d_sae=16, normalize_activations="layer_norm"))


def test_saelens_transcoder_output_hook(tmp_path):
    """SAELens does not record where a transcoder writes: inferred from an MLP-input hook, else asked for."""
    folder = os.path.join(ROOT, "transcoder")
    other = tmp_path / "tc"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
    (other / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hook_name_out"):
        load_saelens(str(other))
    assert load_saelens(str(other), hook_name_out="blocks.1.hook_mlp_out").cfg.hook_name == "blocks.1.hook_resid_pre"
    assert load_saelens(folder, hook_name_out="blocks.1.hook_resid_post").cfg.hook_name_out == "blocks.1.hook_resid_post"


def _saelens_python():
    """A Python that has sae_lens: $HOOKED_MLX_SAELENS_PYTHON, or this one if sae_lens is importable."""
    import importlib.util
    import sys

    env = os.environ.get("HOOKED_MLX_SAELENS_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("sae_lens") else None


LIVE = pytest.mark.skipif(_saelens_python() is None, reason="sae_lens is not importable and "
                          "HOOKED_MLX_SAELENS_PYTHON is not set (a Python with sae-lens==6.54.12)")


def _run_saelens(*args):
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_saelens_fixtures.py")
    subprocess.run([_saelens_python(), script, *args], check=True, capture_output=True, text=True)


@LIVE
def test_live_saelens_regenerates_the_committed_fixtures(tmp_path):
    """SAELens, run now, writes the same files and outputs as the committed fixtures: a format drift shows here."""
    _run_saelens("--out", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(ROOT))
    for name in os.listdir(ROOT):
        assert json.loads((tmp_path / name / "cfg.json").read_text()) == \
            json.loads(open(os.path.join(ROOT, name, "cfg.json")).read()), name
        new, old = load_file(str(tmp_path / name / "expected.safetensors")), _expected(name)
        for k in old:
            np.testing.assert_array_equal(new[k], old[k], err_msg=f"{name}/{k}")


@LIVE
def test_saelens_loads_hooked_mlx_exports_and_gives_the_same_outputs(tmp_path):
    """The reverse direction: every SAELens case, loaded by hooked_mlx and exported again, loads in SAELens
    itself and gives hooked_mlx's outputs."""
    from hooked_mlx.sae import export_saelens
    from safetensors.numpy import save_file

    ours = {}
    for name in LOADABLE:
        sae = load_saelens(os.path.join(ROOT, name))
        x = _expected(name)["x"]
        folder = export_saelens(sae, str(tmp_path / name))
        save_file({"x": x}, os.path.join(folder, "inputs.safetensors"))
        flat = mx.array(x.reshape(x.shape[0], -1))
        ours[name] = (np.array(sae.encode(flat)), np.array(sae(flat)).reshape(x.shape[0], -1))
    _run_saelens("--check-exports", str(tmp_path))
    for name, (f, out) in ours.items():
        theirs = load_file(str(tmp_path / name / "saelens_outputs.safetensors"))
        assert_close(theirs["feature_acts"], f, 1e-5, err_msg=f"{name}: latents")
        assert_close(theirs["sae_out"].reshape(out.shape), out, 1e-5, err_msg=f"{name}: output")


def test_saelens_bfloat16_files_load_as_float32(tmp_path):
    """SAELens's dtype field: a folder saved in bfloat16 loads (computing in float32) with the rounded weights."""
    src = os.path.join(ROOT, "topk")
    other = tmp_path / "bf16"
    shutil.copytree(src, other)
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["dtype"] = "bfloat16"
    (other / "cfg.json").write_text(json.dumps(cfg))
    w = mx.load(str(other / "sae_weights.safetensors"))
    mx.save_safetensors(str(other / "sae_weights.safetensors"), {k: v.astype(mx.bfloat16) for k, v in w.items()})
    sae, ref = load_saelens(str(other)), load_saelens(src)
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert getattr(sae, k).dtype == mx.float32
        assert mx.array_equal(getattr(sae, k), getattr(ref, k).astype(mx.bfloat16).astype(mx.float32)).item()
