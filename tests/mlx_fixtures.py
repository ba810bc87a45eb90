"""Helpers shared by the tests: tiny random mlx-lm checkpoints built with mlx-lm's own classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
STORIES = (ROOT / ".." / "shared" / "models" / "stories260K").resolve()


def save_mlx_lm_model(model, config: dict, path: Path, tokenizer_from: Path | None = STORIES) -> Path:
    """Save an mlx-lm model object in mlx-lm's own layout (config.json + model.safetensors)."""
    from mlx.utils import tree_flatten

    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None and tokenizer_from.exists():
        for f in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy2(tokenizer_from / f, path / f)
    return path


def build_mlx_lm_checkpoint(path: Path, config: dict, seed: int = 0, quantize: dict | None = None,
                            tokenizer_from: Path | None = STORIES):
    """Build a tiny random model with mlx-lm's own class for ``config["model_type"]``, run its sanitize
    round trip, optionally quantize it as mlx-lm does, and save it in mlx-lm's layout.

    Returns (mlx_lm_model, path). Random weights are scaled up so that logits are not all ~0."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    params = tree_flatten(model.parameters())
    new = []
    for k, v in params:
        if k.endswith("norm.weight") or "layernorm" in k or k.endswith("ln_f.weight") or ".ln_" in k:
            new.append((k, 1.0 + 0.1 * mx.random.normal(v.shape)))
        elif v.ndim >= 2:
            new.append((k, mx.random.normal(v.shape) * (1.0 / (v.shape[-1] ** 0.5))))
        else:
            new.append((k, 0.1 * mx.random.normal(v.shape)))
    model.update(tree_unflatten(new))
    cfg = dict(config)
    if quantize is not None:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        cfg["quantization"] = dict(quantize)
    mx.eval(model.parameters())
    save_mlx_lm_model(model, cfg, path, tokenizer_from)
    return model, path


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
