"""Reading checkpoints (mlx-lm / Hugging Face dirs, canonical dirs, hub ids, GGUF) and writing canonical ones."""

from .checkpoint import (
    Checkpoint,
    dequantize_weights,
    quantization_params,
    read_checkpoint,
    resolve_path,
    save_canonical,
)

__all__ = ["Checkpoint", "read_checkpoint", "resolve_path", "save_canonical", "dequantize_weights",
           "quantization_params"]
