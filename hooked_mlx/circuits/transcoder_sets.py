"""A set of per-layer transcoders from a folder: one subfolder per layer, each in any format ``load_sae`` reads
(hooked_mlx, SAELens, Gemma Scope 2), e.g. what ``hooked-mlx train-transcoders --out DIR`` writes."""

from __future__ import annotations

import os
import re

from ..sae.files import load_sae
from ..sae.sae import SAE


def load_transcoders(path: str) -> dict[int, SAE]:
    """{layer: transcoder} from the subfolders of ``path`` (the layer is read from each one's input hook,
    ``blocks.L...``); a folder that is itself one transcoder gives one layer."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder of transcoders.")
    subs = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isdir(os.path.join(path, f)))
    out: dict[int, SAE] = {}
    for folder in subs or [path]:
        try:
            tc = load_sae(folder)
        except (ValueError, FileNotFoundError):
            if subs:
                continue  # (other folders: checkpoints, logs)
            raise
        if not tc.cfg.is_transcoder:
            raise ValueError(f"{folder} holds an SAE ({tc.cfg.hook_name}), not a transcoder: attribution needs "
                             f"transcoders that read an MLP's input and write its output.")
        m = re.match(r"blocks\.(\d+)\.", tc.cfg.hook_name)
        if m is None:
            raise ValueError(f"{folder}: the transcoder reads {tc.cfg.hook_name!r}, which names no layer.")
        layer = int(m.group(1))
        if layer in out:
            raise ValueError(f"{path} has two transcoders for layer {layer}.")
        out[layer] = tc
    if not out:
        raise ValueError(f"{path} holds no transcoders (expected one subfolder per layer).")
    return out
