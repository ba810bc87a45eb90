"""The writers' rules (hooked_mlx/outputs.py): refuse what is there, replace only their own files with
overwrite, never leave a half-written output, and checkpoints only from finite states."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx import HookedTransformer
from hooked_mlx.cli import main as cli_main
from hooked_mlx.outputs import OutputExistsError, staged_dir
from hooked_mlx.sae import SAE, SAEConfig, load_sae, save_sae
from hooked_mlx.sae.store import ArraySource, harvest
from hooked_mlx.sae.training import CHECKPOINT_FILE, NonFiniteLossError, load_checkpoint, train_saes
import mlx.core as mx
import numpy as np
import pytest


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main([str(a) for a in argv])
    return rc, err.getvalue()


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_convert_overwrite_replaces_only_its_own_files(stories_path, tmp_path):
    out = tmp_path / "canon"
    assert _cli("convert", stories_path, out)[0] == 0
    first = _files(out)
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(first)
    # the user adds files; a second convert refuses, --overwrite keeps them
    (out / "NOTES.md").write_text("mine")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard of something else")
    rc, err = _cli("convert", stories_path, out, "--dtype", "float16")
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert _files(out) == {**first, "NOTES.md": b"mine", "model-00002-of-00002.safetensors":
                           b"a stale shard of something else"}
    assert _cli("convert", stories_path, out, "--dtype", "float16", "--overwrite")[0] == 0
    after = _files(out)
    assert after["NOTES.md"] == b"mine"
    assert after["model-00002-of-00002.safetensors"] == b"a stale shard of something else"
    assert after["model.safetensors"] != first["model.safetensors"]
    # a canonical folder reads its own weights file only: the stale shard beside it is ignored
    m = HookedTransformer.from_pretrained(out)
    assert m(m.to_tokens("Once upon a time")).shape[-1] == m.cfg.d_vocab
    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {mx.float16}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".canon.")]  # no staging folder left


def test_staged_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("k")
    with pytest.raises(RuntimeError):
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "keep.txt").write_text("replaced?")
            raise RuntimeError("writer failed")
    assert (out / "keep.txt").read_text() == "k" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("n")
    assert (out / "keep.txt").read_text() == "k" and (out / "sub" / "new.txt").read_text() == "n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_dir(empty) as tmp:  # an empty folder is taken without overwrite
        (tmp / "x").write_text("x")
    assert (empty / "x").read_text() == "x"


def test_save_sae_overwrite_keeps_other_files(tmp_path):
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, hook_name="h"))
    d = tmp_path / "s"
    save_sae(sae, str(d))
    (d / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        save_sae(sae, str(d))
    sae2 = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2, hook_name="h", seed=7))
    save_sae(sae2, str(d), overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    assert np.array_equal(np.array(load_sae(str(d)).W_enc), np.array(sae2.W_enc))


def test_harvest_refuses_then_overwrites_own_files(stories, tmp_path):
    out = tmp_path / "acts"
    cfg = SAEConfig(context_size=16)
    docs = ["Once upon a time there was a cat."] * 8
    man = harvest(stories, "blocks.1.hook_resid_post", docs, str(out), 40, cfg=cfg, progress=False)
    (out / "mine.txt").write_text("keep")
    before = _files(out)
    with pytest.raises(OutputExistsError, match="harvest"):
        harvest(stories, "blocks.1.hook_resid_post", docs, str(out), 40, cfg=cfg, progress=False)
    assert _files(out) == before
    again = harvest(stories, "blocks.1.hook_resid_post", docs, str(out), 40, cfg=cfg, progress=False,
                    overwrite=True)
    assert again["n_tokens"] == man["n_tokens"] and (out / "mine.txt").read_text() == "keep"


def test_train_sae_cli_resume_and_overwrite(stories_path, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["Once upon a time there was a little girl named Lily. She liked cats."] * 20))
    out = tmp_path / "sae"
    args = ["train-sae", stories_path, "--hook", "blocks.1.hook_resid_post", "--data", corpus, "--out", out,
            "--tokens", "512", "--train-batch-size-tokens", "128", "--d-sae", "32", "--k", "4",
            "--checkpoint-every-steps", "2", "--quiet", "--eval-batches", "0", "--context-size", "32"]
    assert _cli(*args)[0] == 0
    assert {"cfg.json", "sae.safetensors", f"checkpoint/{CHECKPOINT_FILE}"} <= set(_files(out))
    rc, err = _cli(*args)  # again: OUT holds a finished run
    assert rc == 2 and "not empty" in err
    assert _cli(*args, "--resume")[0] == 0  # only train-sae's own files there: --resume continues in place
    (out / "notes.md").write_text("mine")
    rc, err = _cli(*args, "--resume")
    assert rc == 2 and "notes.md" in err  # a foreign file: --resume alone does not write over it
    assert _cli(*args, "--overwrite")[0] == 0
    assert (out / "notes.md").read_text() == "mine"


def _poisoned_source(data: np.ndarray, bad_step: int | None, batch: int):
    """An ArraySource whose batch ``bad_step`` is NaN (None: clean); the shuffle state is the real one."""

    class Src(ArraySource):
        def next_batch(self):
            out = super().next_batch()
            self.served = getattr(self, "served", 0) + 1
            if bad_step is not None and self.served == bad_step + 1:
                out = {k: v * float("nan") for k, v in out.items()}
            return out

    return Src({"h": data}, batch, seed=3)


def test_non_finite_step_keeps_last_good_checkpoint_and_resume_works(tmp_path):
    B = 64
    data = np.random.default_rng(0).normal(size=(40 * B, 8)).astype(np.float32)
    # checkpoints every 3 steps, metrics every 5: the bad step 5 (0-based) is first seen at the step-6 checkpoint
    cfg = SAEConfig(architecture="topk", hook_name="h", d_sae=32, k=4, lr=1e-3, train_batch_size_tokens=B,
                    training_tokens=12 * B, checkpoint_every_steps=3, log_every_steps=5, normalize_activations="none")
    ck = tmp_path / "ck"
    with pytest.raises(NonFiniteLossError) as info:
        train_saes(cfg, _poisoned_source(data, 5, B), checkpoint_path=str(ck), progress=False)
    msg = str(info.value)
    assert "step 5" in msg and str(ck / CHECKPOINT_FILE) in msg and "(step 3)" in msg and "--resume" in msg
    tensors, meta = load_checkpoint(str(ck))
    assert meta["step"] == 3
    assert all(bool(mx.isfinite(v).all()) for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating))
    # resume from the good checkpoint with clean data: the same parameters as an uninterrupted clean run
    resumed = train_saes(cfg, _poisoned_source(data, None, B), checkpoint_path=str(ck), resume=True, progress=False)
    full = train_saes(cfg, _poisoned_source(data, None, B), checkpoint_path=str(tmp_path / "ck2"), progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert np.array_equal(np.array(getattr(resumed["h"], name)), np.array(getattr(full["h"], name))), name


def test_non_finite_without_checkpoint_says_so(tmp_path):
    B = 64
    data = np.random.default_rng(1).normal(size=(20 * B, 8)).astype(np.float32)
    cfg = SAEConfig(architecture="topk", hook_name="h", d_sae=32, k=4, train_batch_size_tokens=B,
                    training_tokens=6 * B, log_every_steps=2, normalize_activations="none")
    with pytest.raises(NonFiniteLossError, match="No checkpoint_path was set"):
        train_saes(cfg, _poisoned_source(data, 1, B), progress=False)
    assert not os.listdir(tmp_path)
