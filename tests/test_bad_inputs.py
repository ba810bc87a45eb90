"""Bad input at the public boundary: one row per mistake a user makes, each with the exception type and the
key words its message must carry (what was wrong, what was expected, what to do). Where files are involved
the row also names them, and they must be byte-identical afterwards (nothing is destroyed on the way to
the error).

A row's ``run(env)`` gets a fresh ``Env``: the stories260K model, a scratch folder with copies of its
checkpoint, and helpers that build the objects a row needs.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx import HookedTransformer
from hooked_mlx import patching as P
from hooked_mlx.cli import main as cli_main
from hooked_mlx.lens import TunedLens
from hooked_mlx.loading.gguf import load_gguf
from hooked_mlx.outputs import OutputExistsError
from hooked_mlx.readers import CorruptFileError
from hooked_mlx.sae import SAE, SAEConfig, SAETrainer, export_saelens, load_sae, save_sae
from hooked_mlx.sae.store import ActivationStore, ArraySource, ShardSource, harvest
from hooked_mlx.sae.training import CHECKPOINT_FILE, load_checkpoint, train_saes
import mlx.core as mx
import numpy as np
import pytest


class CLIError(Exception):
    """A CLI call that exited non-zero; the message is its stderr."""


@dataclass
class Env:
    model: HookedTransformer
    tmp: Path
    stories_path: Path
    _copy: Path | None = None
    watched: dict[Path, dict] = field(default_factory=dict)

    @property
    def tokens(self) -> mx.array:
        return self.model.to_tokens("Once upon a time, there was a little girl")

    def ckpt_copy(self) -> Path:
        """A private copy of the stories260K checkpoint, plus a README the user wrote."""
        if self._copy is None:
            self._copy = self.tmp / "stories"
            shutil.copytree(self.stories_path, self._copy)
            (self._copy / "NOTES.md").write_text("my notes about this model\n")
        return self._copy

    def folder(self, name: str, files: dict[str, str | bytes]) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for k, v in files.items():
            (d / k).write_bytes(v if isinstance(v, bytes) else v.encode())
        return d

    def file(self, name: str, content: bytes | str = b"precious user data\n") -> Path:
        f = self.tmp / name
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return f

    def watch(self, *paths: Path) -> None:
        """These files (or every file under these folders) must be byte-identical after the row ran: their
        bytes are recorded now, when a row's inputs are built, before the call that must fail."""
        for p in paths:
            self.watched.setdefault(p, snapshot([p]))

    def cli(self, *argv: str) -> int:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main([str(a) for a in argv])
        if rc != 0:
            raise CLIError(err.getvalue())
        return rc

    def sae(self, **kw) -> SAE:
        cfg = SAEConfig(**{"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2, "hook_name": "h", **kw})
        return SAE(cfg)

    def metric_run(self, metric) -> mx.array:
        """The patching engine with ``metric`` (clean = corrupted prompt: every cell is cheap)."""
        toks = self.tokens
        _, cache = self.model.run_with_cache(toks)
        return P.get_act_patch_resid_pre(self.model, toks, cache, metric)


def snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in paths:
        if p.is_dir():
            out[f"{p}/"] = None
            for f in sorted(p.rglob("*")):
                out[str(f)] = f.read_bytes() if f.is_file() else None
        elif p.exists():
            out[str(p)] = p.read_bytes()
        else:
            out[str(p)] = b"<absent>"
    return out


@dataclass
class Row:
    id: str
    run: Callable[[Env], object]
    exc: type[BaseException]
    words: tuple[str, ...]


def _corrupt_config(env: Env) -> Path:
    d = env.ckpt_copy()
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    env.watch(d)
    return d


def _garbage_weights(env: Env) -> Path:
    d = env.ckpt_copy()
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    env.watch(d)
    return d


def _truncated_weights(env: Env) -> Path:
    d = env.ckpt_copy()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    env.watch(d)
    return d


def _tiny_gguf(env: Env, cut: int) -> Path:
    gguf = pytest.importorskip("gguf")
    f = env.tmp / "tiny.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - cut])
    env.watch(f)
    return f


def _existing_checkpoint(env: Env) -> Path:
    ck = env.tmp / "ck"
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    cfg = SAEConfig(architecture="topk", hook_name="h", d_sae=16, k=2, train_batch_size_tokens=32,
                    training_tokens=64, log_every_steps=1)
    train_saes(cfg, ArraySource({"h": x}, 32), checkpoint_path=str(ck), progress=False)
    env.watch(ck)
    return ck


def _train_cfg(**kw) -> SAEConfig:
    return SAEConfig(**{"architecture": "topk", "hook_name": "h", "d_sae": 16, "k": 2,
                        "train_batch_size_tokens": 32, "training_tokens": 64, "log_every_steps": 1, **kw})


def _src() -> ArraySource:
    return ArraySource({"h": np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)}, 32)


def _corpus(env: Env) -> Path:
    f = env.file("corpus.txt", "Once upon a time there was a cat.\n\nThe dog ran home.\n")
    env.watch(f)
    return f


def _non_empty(env: Env, name: str = "out") -> Path:
    d = env.folder(name, {"README.md": "mine", "results.csv": "1,2,3\n"})
    env.watch(d)
    return d


def _zero_head_12(env: Env):
    return env.model.run_with_hooks(env.tokens, fwd_hooks=[("blocks.1.attn.hook_z", P.zero_ablate(head=12))])


ROWS = [
    # -- loading -------------------------------------------------------------------------------------
    Row("config-not-json", lambda e: HookedTransformer.from_pretrained(_corrupt_config(e)), CorruptFileError,
        ("config.json", "not valid JSON", "truncated")),
    Row("config-json-array", lambda e: HookedTransformer.from_pretrained(
        e.folder("arr", {"config.json": "[1, 2]", "model.safetensors": b""})), CorruptFileError,
        ("config.json", "expected an object")),
    Row("weights-random-bytes", lambda e: HookedTransformer.from_pretrained(_garbage_weights(e)), CorruptFileError,
        ("model.safetensors", "corrupt")),
    Row("weights-truncated", lambda e: HookedTransformer.from_pretrained(_truncated_weights(e)), CorruptFileError,
        ("model.safetensors", "truncated")),
    Row("weights-empty-file", lambda e: HookedTransformer.from_pretrained(
        e.folder("empty", {"config.json": (e.stories_path / "config.json").read_text(), "model.safetensors": b""})),
        CorruptFileError, ("model.safetensors", "truncated or empty")),
    Row("gguf-truncated-data", lambda e: load_gguf(_tiny_gguf(e, cut=100)), CorruptFileError,
        ("tiny.gguf", "truncated", "Re-download")),
    Row("gguf-truncated-header", lambda e: load_gguf(_tiny_gguf(e, cut=16 * 8 * 4 + 200)), CorruptFileError,
        ("tiny.gguf", "truncated")),
    Row("gguf-not-gguf", lambda e: HookedTransformer.from_pretrained(e.file("model.gguf", b"PK\x03\x04" * 40)),
        CorruptFileError, ("model.gguf", "not a GGUF file", "corrupt")),
    Row("missing-path", lambda e: HookedTransformer.from_pretrained(e.tmp / "nope"), FileNotFoundError,
        ("does not exist", "Expected a checkpoint directory")),
    Row("dir-without-config", lambda e: HookedTransformer.from_pretrained(e.folder("noconf", {"a.txt": "x"})),
        FileNotFoundError, ("no config.json",)),
    # -- hooks -----------------------------------------------------------------------------------------
    Row("hook-unknown-name", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.0.hook_resid_prex", lambda a, hook: a)]), ValueError,
        ("Unknown hook name", "blocks.0.hook_resid_pre")),
    Row("hook-wrong-shape", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a[:, :2])]), ValueError,
        ("returned shape", "expected", "same shape")),
    # -- forward -----------------------------------------------------------------------------------------
    Row("token-id-past-vocab", lambda e: e.model(mx.array([[1, 600]])), ValueError, ("Token ids must lie in", "512")),
    Row("float-tokens", lambda e: e.model(mx.array([[1.0, 2.0]])), ValueError, ("integer array", "start_at_layer")),
    Row("empty-prompt", lambda e: e.model("", prepend_bos=False), ValueError, ("has no tokens", "non-empty")),
    Row("empty-token-array", lambda e: e.model(mx.zeros((1, 0), dtype=mx.int32)), ValueError,
        ("empty", "at least one token")),
    Row("stop-at-layer-range", lambda e: e.model(e.tokens, stop_at_layer=9), ValueError,
        ("stop_at_layer=9", "out of range", "5 layers")),
    Row("return-type", lambda e: e.model(e.tokens, return_type="probs"), ValueError, ("return_type must be",)),
    Row("prompt-past-n_ctx-rope", lambda e: e.model(mx.ones((1, 600), dtype=mx.int32)), UserWarning,
        ("600 positions", "trained context of 512")),
    Row("activation-store-past-n_ctx", lambda e: ActivationStore(
        e.model, "blocks.0.hook_resid_post", ["a b c"], SAEConfig(context_size=1024)), UserWarning,
        ("ActivationStore", "1024 positions", "trained context of 512")),
    # -- generate ----------------------------------------------------------------------------------------
    Row("generate-negative-max-new", lambda e: e.model.generate("Once", max_new_tokens=-1), ValueError,
        ("max_new_tokens", ">= 0", "-1")),
    Row("generate-negative-temperature", lambda e: e.model.generate("Once", 2, temperature=-0.5), ValueError,
        ("temperature", ">= 0")),
    Row("generate-nan-temperature", lambda e: e.model.generate("Once", 2, temperature=float("nan")), ValueError,
        ("temperature", "finite")),
    Row("generate-top-p-zero", lambda e: e.model.generate("Once", 2, top_p=0.0), ValueError, ("top_p", "(0, 1]")),
    Row("generate-top-k-zero", lambda e: e.model.generate("Once", 2, top_k=0), ValueError, ("top_k", ">= 1")),
    # -- patching metrics --------------------------------------------------------------------------------
    Row("metric-token-past-vocab", lambda e: P.LogProb(600)(e.model(e.tokens)), ValueError,
        ("LogProb token", "600", "vocabulary of 512")),
    Row("metric-token-past-vocab-engine", lambda e: e.metric_run(P.LogitDiff(3, 9999)), ValueError,
        ("LogitDiff incorrect", "9999", "vocabulary of 512")),
    Row("metric-negative-token", lambda e: P.Prob(-3), ValueError, ("token ids are >= 0",)),
    Row("metric-position-past-end", lambda e: P.LogitDiff(3, 4, pos=40)(e.model(e.tokens)), ValueError,
        ("position 40", "out of range", "sequences of")),
    Row("metric-position-past-end-engine", lambda e: e.metric_run(P.LogProb(3, pos=-50)), ValueError,
        ("position -50", "out of range")),
    Row("metric-tokens-per-prompt-mismatch", lambda e: P.LogProb([3, 4, 5])(e.model(e.tokens)), ValueError,
        ("3 token ids", "batch has 1")),
    Row("metric-returns-string", lambda e: e.metric_run(my_metric_returning_text), TypeError,
        ("my_metric_returning_text", "returned str", "mx.array scalar")),
    Row("metric-returns-vector", lambda e: e.metric_run(lambda logits: logits[0, -1]), ValueError,
        ("<lambda>", "must return a scalar")),
    # -- interventions -----------------------------------------------------------------------------------
    Row("zero-ablate-head-out-of-range", _zero_head_12, ValueError,
        ("zero_ablate", "blocks.1.attn.hook_z", "head 12", "8 heads", "-8..7")),
    Row("zero-ablate-pos-out-of-range", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.1.hook_resid_pre", P.zero_ablate(pos=50))]), ValueError,
        ("zero_ablate", "blocks.1.hook_resid_pre", "position 50", "out of range")),
    Row("head-on-headless-hook", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.1.hook_resid_pre", P.scale(2.0, head=1))]), ValueError,
        ("scale", "no head axis", "hook_z")),
    Row("add-vector-wrong-size", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.2.hook_resid_pre", P.add_vector(mx.ones((10,))))]), ValueError,
        ("add_vector", "blocks.2.hook_resid_pre", "(10,)", "does not broadcast", "[64]")),
    Row("mean-ablate-wrong-size", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.0.hook_mlp_out", P.mean_ablate(mx.zeros((3, 64))))]), ValueError,
        ("mean_ablate", "blocks.0.hook_mlp_out", "(3, 64)", "does not broadcast")),
    Row("index-out-of-range", lambda e: e.model.run_with_hooks(
        e.tokens, fwd_hooks=[("blocks.0.hook_mlp_out", P.zero_ablate(index=(0, 99)))]), ValueError,
        ("zero_ablate", "index=(0, 99)", "does not index")),
    # -- SAE config and training ---------------------------------------------------------------------------
    Row("sae-k-zero", lambda e: SAEConfig(k=0), ValueError, ("SAEConfig.k = 0", "integer >= 1")),
    Row("sae-architecture", lambda e: SAEConfig(architecture="foo"), ValueError, ("architecture", "'topk'")),
    Row("sae-lr-nan", lambda e: SAEConfig(lr=float("nan")), ValueError, ("SAEConfig.lr", "finite")),
    Row("trainer-wrong-width", lambda e: SAETrainer(_train_cfg(d_in=8)).step(mx.ones((32, 5))), ValueError,
        ("shape (32, 5)", "expected [B, 8]")),
    Row("train-over-existing-checkpoint", lambda e: train_saes(
        _train_cfg(), _src(), checkpoint_path=str(_existing_checkpoint(e)), progress=False), OutputExistsError,
        (CHECKPOINT_FILE, "already holds", "resume=True", "overwrite=True")),
    Row("train-checkpoint-path-is-file", lambda e: train_saes(
        _train_cfg(), _src(), checkpoint_path=str(_watched_file(e, "ck")), progress=False), OutputExistsError,
        ("is a file", "folder")),
    Row("harvest-shard-truncated", lambda e: ShardSource(str(_harvested(e, "shard")), 8), CorruptFileError,
        ("shard_00000.safetensors", "truncated")),
    Row("harvest-manifest-not-json", lambda e: ShardSource(str(_harvested(e, "manifest")), 8), CorruptFileError,
        ("harvest manifest", "manifest.json", "not valid JSON")),
    Row("checkpoint-not-a-checkpoint", lambda e: load_checkpoint(str(_watched_file(e, "c.safetensors", b"xx"))),
        CorruptFileError, ("c.safetensors", "truncated")),
    # -- file writers ------------------------------------------------------------------------------------
    Row("save-sae-non-empty-folder", lambda e: save_sae(e.sae(), str(_non_empty(e))), OutputExistsError,
        ("not empty", "README.md", "--overwrite")),
    Row("save-sae-onto-file", lambda e: save_sae(e.sae(), str(_watched_file(e, "sae"))), OutputExistsError,
        ("is a file", "Choose another path")),
    Row("export-saelens-non-empty", lambda e: export_saelens(e.sae(), str(_non_empty(e))), OutputExistsError,
        ("export_saelens", "not empty")),
    Row("load-sae-corrupt-weights", lambda e: load_sae(str(_corrupt_sae(e))), CorruptFileError,
        ("sae.safetensors", "truncated")),
    Row("load-sae-config-not-json", lambda e: load_sae(str(_sae_bad_cfg(e))), CorruptFileError,
        ("cfg.json", "not valid JSON")),
    Row("tuned-lens-save-existing", lambda e: TunedLens(5, 64).save(_watched_file(e, "lens.safetensors")),
        OutputExistsError, ("already exists", "overwrite=True")),
    Row("plot-existing-file", lambda e: P.plot_patching(np.zeros((2, 3)), _watched_file(e, "p.png")),
        OutputExistsError, ("plot_patching", "already exists")),
    # -- CLI ----------------------------------------------------------------------------------------------
    Row("cli-convert-onto-source", lambda e: e.cli("convert", _watched_ckpt(e), _watched_ckpt(e)), CLIError,
        ("convert", "is the source", "outside")),
    Row("cli-convert-inside-source", lambda e: e.cli("convert", _watched_ckpt(e), _watched_ckpt(e) / "canon"),
        CLIError, ("is inside the source",)),
    Row("cli-convert-non-empty-out", lambda e: e.cli("convert", e.stories_path, _non_empty(e)), CLIError,
        ("not empty", "README.md", "--overwrite")),
    Row("cli-convert-out-is-file", lambda e: e.cli("convert", e.stories_path, _watched_file(e, "out")), CLIError,
        ("is a file", "folder")),
    Row("cli-train-sae-out-is-file", lambda e: e.cli(
        "train-sae", e.stories_path, "--hook", "blocks.1.hook_resid_post", "--data", _corpus(e),
        "--out", _watched_file(e, "sae_out"), "--tokens", "256"), CLIError, ("train-sae --out", "is a file")),
    Row("cli-train-sae-out-non-empty", lambda e: e.cli(
        "train-sae", e.stories_path, "--hook", "blocks.1.hook_resid_post", "--data", _corpus(e),
        "--out", _non_empty(e), "--tokens", "256"), CLIError, ("not empty", "--overwrite")),
    Row("cli-harvest-onto-corpus", lambda e: e.cli(
        "harvest", "--model", e.stories_path, "--hook", "blocks.1.hook_resid_post", "--data", _corpus(e),
        "--out", _corpus(e)), CLIError, ("harvest --out", "is the source")),
    Row("cli-harvest-non-empty", lambda e: e.cli(
        "harvest", "--model", e.stories_path, "--hook", "blocks.1.hook_resid_post", "--data", _corpus(e),
        "--out", _non_empty(e)), CLIError, ("harvest --out", "not empty")),
]


def my_metric_returning_text(logits):
    return "0.5"


def _watched_file(env: Env, name: str, content: bytes = b"precious user data\n") -> Path:
    f = env.file(name, content)
    env.watch(f)
    return f


def _watched_ckpt(env: Env) -> Path:
    d = env.ckpt_copy()
    env.watch(d)
    return d


def _harvested(env: Env, damage: str) -> Path:
    d = env.tmp / "acts"
    harvest(env.model, "blocks.1.hook_resid_post", ["Once upon a time there was a cat."] * 4, str(d), 32,
            cfg=SAEConfig(context_size=16), progress=False)
    f = d / ("shard_00000.safetensors" if damage == "shard" else "manifest.json")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40])
    env.watch(d)
    return d


def _corrupt_sae(env: Env) -> Path:
    d = env.tmp / "sae_c"
    save_sae(env.sae(), str(d))
    data = (d / "sae.safetensors").read_bytes()
    (d / "sae.safetensors").write_bytes(data[:-64])
    env.watch(d)
    return d


def _sae_bad_cfg(env: Env) -> Path:
    d = env.tmp / "sae_j"
    save_sae(env.sae(), str(d))
    (d / "cfg.json").write_text('{"architecture": "topk", ')
    env.watch(d)
    return d


def test_table_is_large_enough():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, stories, stories_path, tmp_path):
    env = Env(stories, tmp_path, stories_path)
    if issubclass(row.exc, Warning):
        object.__setattr__(stories, "_warned_context", False)  # the warning is once per model
        with pytest.warns(row.exc) as rec:
            row.run(env)
        msg = " ".join(str(w.message) for w in rec if issubclass(w.category, row.exc))
    else:
        with pytest.raises(row.exc) as info:
            row.run(env)
        msg = str(info.value)
    for w in row.words:
        assert w in msg, f"{row.id}: {w!r} not in the message:\n{msg}"
    for p, before in env.watched.items():
        assert snapshot([p]) == before, f"{row.id}: {p} changed on the way to the error"
