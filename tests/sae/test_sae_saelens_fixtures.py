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
            "transcoder", "skip_transcoder", "jumprelu_transcoder"]


def _expected(name):
    return load_file(os.path.join(ROOT, name, "expected.safetensors"))


@pytest.mark.parametrize("name", LOADABLE)
def test_saelens_written_sae_gives_saelens_outputs(name):
    folder = os.path.join(ROOT, name)
    assert detect_format(folder) == "saelens"
    exp = _expected(name)
    for sae in (load_saelens(folder), load_sae(folder)):
        x = mx.array(exp["x"])
        f = np.array(sae.encode(x))
        assert_close(f, exp["feature_acts"], 1e-5, err_msg=f"{name}: latents")
        # the same latents are active (a threshold or top-k cut that moved would show here first)
        np.testing.assert_array_equal(f > 0, exp["feature_acts"] > 0)
        assert_close(sae(x), exp["sae_out"], 1e-5, err_msg=f"{name}: reconstruction")
        if "skip" not in name:  # (a skip transcoder's output adds x @ W_skip.T to the decode)
            assert_close(sae.decode(mx.array(f)), exp["sae_out"], 1e-5, err_msg=f"{name}: decode")
        assert sae.d_in == exp["x"].shape[1] and sae.d_sae == exp["feature_acts"].shape[1]
        assert sae.d_out == exp["sae_out"].shape[1]
        if "transcoder" in name:  # reads an MLP's input: writes that block's MLP output
            assert sae.cfg.is_transcoder and sae.cfg.hook_name_out == "blocks.1.hook_mlp_out"
            assert sae.cfg.skip_connection == ("skip" in name)


def test_saelens_fixtures_are_not_trivial():
    """Every case has some but not all latents active, so thresholds and cuts are exercised."""
    for name in LOADABLE:
        f = _expected(name)["feature_acts"]
        l0 = (f > 0).sum(-1).mean()
        assert 1 < l0 < f.shape[1] - 1, (name, l0)


def test_saelens_architectures_not_supported_are_refused_by_name():
    with pytest.raises(ValueError, match="gated"):
        load_saelens(os.path.join(ROOT, "gated"))


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
