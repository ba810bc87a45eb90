"""Checkpoint reading and canonical writing.

Sources ``read_checkpoint`` understands:

* an mlx-lm (or Hugging Face safetensors) directory: ``config.json`` + ``model*.safetensors``;
* a canonical hooked_mlx directory (``config.json`` with ``hooked_mlx_format``; see weights/README.md);
* a ``.gguf`` file (llama architecture);
* a hub id (``org/name``), through ``huggingface_hub``: from the local cache when offline.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..config import FORMAT_VERSION, HookedConfig
from ..models import get_family
from ..outputs import staged_dir
from ..readers import CorruptFileError, load_safetensors, read_json

TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
]


@dataclass
class Checkpoint:
    """What a source holds: canonical config, canonical weights, and where its tokenizer lives."""

    cfg: HookedConfig
    weights: dict[str, mx.array]
    source: Path
    tokenizer_dir: Path | None = None
    tokenizer: object | None = None  # a ready tokenizer (GGUF), else loaded from tokenizer_dir
    hf_config: dict | None = None
    metadata: dict = field(default_factory=dict)


def resolve_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path for a directory, file or hub id (downloaded or taken from the local HF cache)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    s = str(path_or_repo)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not s.endswith(".gguf")
    if not looks_like_repo:
        raise FileNotFoundError(
            f"{s!r} does not exist. Expected a checkpoint directory (config.json + *.safetensors), a .gguf "
            f"file, or a Hugging Face hub id such as 'mlx-community/SmolLM2-135M-Instruct-4bit'."
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    # read the cache location now: huggingface_hub reads its environment only when first imported
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(s, revision=revision, local_files_only=True, allow_patterns=patterns,
                                      cache_dir=cache_dir))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise FileNotFoundError(
            f"Hub id {s!r} (revision {revision or 'main'}) is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE is set. Download it on a connected machine (`huggingface-cli download {s}`) "
            f"and copy the cache, or pass a local directory."
        )
    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as e:  # network errors, missing repos
        raise FileNotFoundError(
            f"Could not download hub id {s!r} (revision {revision or 'main'}): {type(e).__name__}: {e}. "
            f"It is not in the local Hugging Face cache either. Pass a local directory, or download it "
            f"where the hub is reachable (`huggingface-cli download {s}`)."
        ) from None


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(path / "model*.safetensors"))) or sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path}. Expected model.safetensors or shards.")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_safetensors(f))
    return weights


def read_checkpoint(path_or_repo, revision: str | None = None) -> Checkpoint:
    path = resolve_path(path_or_repo, revision)
    if path.is_file():
        if path.suffix == ".gguf":
            return _read_gguf(path)
        raise ValueError(f"{path} is a file but not a .gguf; pass the checkpoint directory instead.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; it is not an mlx-lm or hooked_mlx checkpoint.")
    raw = read_json(cfg_file, "config file")
    if not isinstance(raw, dict):
        raise CorruptFileError(f"config file {cfg_file} holds a JSON {type(raw).__name__}, expected an object "
                               f"with the model's settings. Restore or re-create it.")
    if "hooked_mlx_format" in raw:
        # a canonical folder holds exactly one weights file (other .safetensors beside it are not ours)
        weights = load_safetensors(path / "model.safetensors")
        if raw["hooked_mlx_format"] > FORMAT_VERSION:
            raise ValueError(
                f"{path} is hooked_mlx format {raw['hooked_mlx_format']}; this version reads up to "
                f"{FORMAT_VERSION}. Upgrade hooked-mlx."
            )
        cfg = HookedConfig.from_dict(raw["config"])
        return Checkpoint(cfg, weights, path, tokenizer_dir=path, hf_config=raw.get("hf_config"))
    return from_hf(raw, _load_safetensors(path), path)


def from_hf(raw: dict, weights: dict, source: Path, tokenizer_dir: Path | None = None) -> Checkpoint:
    """Canonical config and weights from an HF-style config dict and HF / mlx-lm-named weights."""
    if "model_type" not in raw:
        raise ValueError(f"config.json in {source} has no 'model_type'.")
    raw = dict(raw)
    if raw["model_type"] in ("gemma3", "mistral3") and "text_config" in raw:
        # multimodal wrappers: the language model's config sits under text_config
        text = dict(raw["text_config"])
        text.setdefault("model_type", raw["model_type"] + "_text" if raw["model_type"] == "gemma3" else "mistral")
        text.setdefault("quantization", raw.get("quantization"))
        raw = text
    family = get_family(raw["model_type"])
    try:
        cfg = family.config_from_hf(raw, set(weights))
    except (KeyError, ValueError, TypeError) as e:  # a key missing or malformed: name the file and the key
        what = f"'{e.args[0]}' is missing" if isinstance(e, KeyError) else str(e).rstrip(".")
        raise ValueError(
            f"The config of {source} ({raw['model_type']}) cannot be read: {what}. Expected a transformers 4.x or "
            f"5.x config.json for this family; add the key (unknown keys are ignored).") from e
    q = raw.get("quantization") or raw.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        cfg.quantization = {"group_size": q.get("group_size", 64), "bits": q["bits"], "mode": q.get("mode", "affine")}
    canonical = family.convert_weights(weights, cfg)
    if cfg.quantization is None and any(k.endswith(".scales") for k in canonical):
        cfg.quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    return Checkpoint(cfg, canonical, source, tokenizer_dir=tokenizer_dir or source, hf_config=raw)


def _read_gguf(path: Path) -> Checkpoint:
    from .gguf import load_gguf

    g = load_gguf(path)
    ck = from_hf(g.hf_config, g.weights, path, tokenizer_dir=None)
    ck.tokenizer = g.tokenizer
    ck.tokenizer_dir = None  # the tokenizer is rebuilt from the GGUF metadata, not read from files
    ck.metadata = {"gguf": True, **{k: v for k, v in g.metadata.items() if isinstance(v, (str, int, float))}}
    return ck


# -- quantization ------------------------------------------------------------------------------------


def quantization_params(weights: dict[str, mx.array], module_path: str, in_features: int, cfg_q: dict | None) -> dict:
    """group_size / bits / mode of a quantized module, inferred from its tensors' shapes.

    bits = packed columns * 32 / in_features; group_size = in_features / scale columns."""
    w, s = weights[f"{module_path}.weight"], weights[f"{module_path}.scales"]
    mode = (cfg_q or {}).get("mode", "affine")
    bits = w.shape[-1] * 32 // in_features
    group_size = in_features // s.shape[-1]
    return {"group_size": int(group_size), "bits": int(bits), "mode": mode}


def dequantize_weights(weights: dict[str, mx.array], in_features: dict[str, int], cfg_q: dict | None,
                       dtype=None) -> dict[str, mx.array]:
    """Replace every quantized (weight, scales, biases) triplet by a float weight."""
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        prefix = key[: -len(".scales")]
        p = quantization_params(weights, prefix, in_features[prefix], cfg_q)
        scales, biases = weights[key], weights.get(f"{prefix}.biases")
        if p["mode"] == "affine":  # dequantize in float32: half-precision scales would round the result
            scales = scales.astype(mx.float32)
            biases = biases.astype(mx.float32) if biases is not None else None
        w = mx.dequantize(weights[f"{prefix}.weight"], scales, biases, p["group_size"], p["bits"], mode=p["mode"])
        out[f"{prefix}.weight"] = w.astype(dtype or weights[key].dtype)
        out.pop(key)
        out.pop(f"{prefix}.biases", None)
    return out


# -- canonical writing -------------------------------------------------------------------------------


def save_canonical(model, out_dir: str | os.PathLike, tokenizer_dir: Path | None = None, tokenizer=None,
                   hf_config: dict | None = None, *, overwrite: bool = False,
                   sources: tuple = ()) -> Path:
    """Write ``model`` as a canonical checkpoint, atomically (staged beside ``out_dir``, then renamed).

    Follows ``hooked_mlx.outputs``: an existing non-empty ``out_dir`` is refused unless ``overwrite``, which
    replaces only the files written here (config.json, model.safetensors, tokenizer files); ``out_dir`` may
    not be or lie inside any of ``sources`` (nor inside ``tokenizer_dir``)."""
    from ..host import flat_items

    srcs = (*sources, tokenizer_dir)
    with staged_dir(out_dir, sources=srcs, overwrite=overwrite, what="convert") as tmp:
        weights = dict(flat_items(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        meta = {"hooked_mlx_format": FORMAT_VERSION, "config": model.cfg.to_dict()}
        if hf_config is not None:
            meta["hf_config"] = hf_config
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=str))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        elif tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).expanduser().resolve()
