"""`hooked-mlx harvest` and `hooked-mlx train-sae` end to end on stories260K (tiny settings)."""

from __future__ import annotations

import json

from hooked_mlx.cli import main
from hooked_mlx.sae import SAEConfig, load_sae, load_saelens
import mlx.core as mx
import numpy as np
from tolerance import assert_close


def test_harvest_then_train_from_shards(stories_path, corpus_path, tmp_path, capsys):
    acts = tmp_path / "acts"
    rc = main(["harvest", "--model", str(stories_path), "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.3.hook_resid_post",
               "--data", str(corpus_path), "--tokens", "6000", "--shard-tokens", "2500", "--context-size", "64",
               "--out", str(acts), "--quiet"])
    assert rc == 0
    man = json.loads((acts / "manifest.json").read_text())
    assert man["hook_names"] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert man["n_tokens"] == 6000 and len(man["shards"]) == 3
    out = tmp_path / "saes"
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(corpus_path.read_text().split("\n\n")[-6:]))
    rc = main(["train-sae", "--data", str(acts), "--out", str(out), "--architecture", "batchtopk", "--k", "8",
               "--expansion-factor", "4", "--train-batch-size-tokens", "256", "--shuffle-buffer-tokens", "256",
               "--training-tokens", "5120", "--lr-warmup-steps", "2", "--export", "saelens", "--model",
               str(stories_path), "--eval-data", str(held), "--eval-docs", "4", "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    report = json.loads(stdout[stdout.index("{"):])
    for hook in man["hook_names"]:
        sae = load_sae(str(out / hook))
        assert sae.cfg.hook_name == hook and sae.cfg.architecture == "batchtopk" and sae.d_sae == 256
        assert sae.cfg.context_size == 64
        sl = load_saelens(str(out / hook / "saelens"))
        assert sl.cfg.architecture == "jumprelu"
        x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
        assert_close(np.array(sl(mx.array(x))), np.array(sae(mx.array(x))), tol=1e-5)
        ev = report[hook]["eval"]
        assert 0 < ev["fvu"] < 1.5 and report[hook]["eval_tokens"] > 100
        assert ev["ce_loss_zero_ablation"] > ev["ce_loss_clean"] and "kl_score" in ev


def test_train_streaming_with_checkpoint_and_resume(stories_path, corpus_path, tmp_path):
    args = ["train-sae", "--model", str(stories_path), "--hook", "blocks.0.hook_resid_post", "--data",
            str(corpus_path), "--out", str(tmp_path / "sae"), "--architecture", "topk", "--k", "4",
            "--expansion-factor", "2", "--train-batch-size-tokens", "128", "--shuffle-buffer-tokens", "512",
            "--training-tokens", "1280", "--context-size", "32", "--store-batch-size-prompts", "4",
            "--norm-estimation-tokens", "256", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every-steps",
            "5", "--eval-batches", "0", "--quiet"]
    assert main(args) == 0
    first = load_sae(str(tmp_path / "sae"))
    assert first.cfg.model_name == str(stories_path)
    # resuming a finished run re-saves the same SAE
    assert main(args + ["--resume"]) == 0
    again = load_sae(str(tmp_path / "sae"))
    np.testing.assert_array_equal(np.array(first.W_dec), np.array(again.W_dec))
    assert main(["train-sae", "--data", str(corpus_path), "--out", str(tmp_path / "x"), "--quiet"]) == 2  # no model
    assert SAEConfig.defaults()["k"] != 4  # flags override the one set of defaults


def test_issue6_form_positional_model_and_short_aliases(stories_path, corpus_path, tmp_path, capsys):
    # exactly: hooked-mlx train-sae MODEL --hook blocks.2.hook_resid_post --arch topk --k 32 --expansion 16
    #          --data FILE --tokens N --out DIR [--resume]
    out = tmp_path / "sae"
    form = ["train-sae", str(stories_path), "--hook", "blocks.2.hook_resid_post", "--arch", "topk", "--k", "32",
            "--expansion", "16", "--data", str(corpus_path), "--tokens", "8192", "--out", str(out)]
    assert main(form) == 0
    sae = load_sae(str(out))
    c = sae.cfg
    assert (c.architecture, c.k, c.expansion_factor, c.training_tokens) == ("topk", 32, 16, 8192)
    assert c.hook_name == "blocks.2.hook_resid_post" and c.model_name == str(stories_path)
    assert sae.d_sae == 16 * sae.d_in == 16 * 64
    assert (out / "checkpoint" / "checkpoint.safetensors").exists()  # default --checkpoint-dir: OUT/checkpoint
    capsys.readouterr()
    assert main(form + ["--resume"]) == 0  # a finished run: resumes at its last step, re-saves the same SAE
    assert "Resuming from" in capsys.readouterr().err
    np.testing.assert_array_equal(np.array(load_sae(str(out)).W_dec), np.array(sae.W_dec))
    # the model once, not twice
    assert main(form[:1] + form[1:] + ["--model", "other/model"]) == 2
