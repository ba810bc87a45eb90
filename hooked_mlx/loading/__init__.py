"""Reading checkpoints (mlx-lm / Hugging Face dirs, canonical dirs, hub ids, GGUF) and writing canonical ones."""

from .build import build_model, dtype_name, load, load_tokenizer, load_weights_checked, parse_dtype
from .checkpoint import (
    Checkpoint,
    dequantize_weights,
    quantization_params,
    read_checkpoint,
    resolve_path,
    save_canonical,
)

__all__ = ["load", "build_model", "load_weights_checked", "load_tokenizer", "parse_dtype", "dtype_name", "Checkpoint", "read_checkpoint", "resolve_path", "save_canonical", "dequantize_weights",
           "quantization_params"]
