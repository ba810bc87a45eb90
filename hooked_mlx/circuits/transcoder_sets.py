"""Per-layer transcoder sets from disk.

* A folder with one subfolder per layer, each in any format ``load_sae`` reads (hooked_mlx, SAELens, Gemma
  Scope 2), e.g. what ``hooked-mlx train-transcoders --out DIR`` writes.
* circuit-tracer's transcoder-set layout: a folder with a ``config.yaml`` (``model_kind: transcoder_set``,
  ``feature_input_hook``, ``feature_output_hook``, and optionally ``transcoders``: one file per layer, a path
  relative to the folder, an absolute path or an ``hf://repo/file`` URI read from the Hugging Face cache), or else
  ``layer_{i}.safetensors`` files. Each file is circuit-tracer's own (``W_enc`` [F, d], ``W_dec`` [F, d], ``b_enc``,
  ``b_dec``; a JumpReLU's ``activation_function.threshold``; a skip transcoder's ``W_skip`` [d, d], applied as
  x @ W_skip.T) or Gemma Scope 2's (``w_enc`` [d, F], ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``,
  ``affine_skip_connection``), as circuit-tracer's ``load_transcoder_set`` reads them.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx

from ..readers import load_safetensors
from ..sae.config import SAEConfig
from ..sae.files import load_sae
from ..sae.sae import SAE

#: circuit-tracer's hook names (TransformerLens names inside a block) that map onto this library's hooks
CT_INPUT_HOOKS = {"ln2.hook_normalized": "ln2.hook_normalized"}
CT_OUTPUT_HOOKS = {"hook_mlp_out": "hook_mlp_out"}


def load_transcoders(path: str) -> dict[int, SAE]:
    """{layer: transcoder} from ``path``: circuit-tracer's layout when it has a ``config.yaml``, else its
    subfolders (the layer is read from each one's input hook, ``blocks.L...``); a folder that is itself one
    transcoder gives one layer."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder of transcoders.")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return load_circuit_tracer_set(path)
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
        raise ValueError(f"{path} holds no transcoders (expected one subfolder per layer, or circuit-tracer's "
                         f"config.yaml).")
    return out


def load_circuit_tracer_set(path: str) -> dict[int, SAE]:
    """A circuit-tracer transcoder set (``config.yaml`` + one safetensors file per layer; see the module doc)."""
    import yaml

    with open(os.path.join(path, "config.yaml")) as f:
        cfg = yaml.safe_load(f) or {}
    kind = cfg.get("model_kind")
    if kind != "transcoder_set":
        raise ValueError(f"{path}/config.yaml: model_kind {kind!r}; only circuit-tracer's per-layer "
                         f"'transcoder_set' is read (cross-layer transcoders are not supported yet).")
    hooks = []
    for key, known in (("feature_input_hook", CT_INPUT_HOOKS), ("feature_output_hook", CT_OUTPUT_HOOKS)):
        name = cfg.get(key)
        if name not in known:
            raise ValueError(f"{path}/config.yaml: {key} {name!r} is not supported; supported: {sorted(known)} "
                             f"(the transcoders must read the MLP's normalised input before the norm's weight and "
                             f"write the MLP's output).")
        hooks.append(known[name])
    files = cfg.get("transcoders")
    if files is None:
        n = len([f for f in os.listdir(path) if re.fullmatch(r"layer_\d+\.safetensors", f)])
        files = [f"layer_{i}.safetensors" for i in range(n)]
    if not files:
        raise ValueError(f"{path}: config.yaml lists no transcoders and there are no layer_*.safetensors files.")
    return {layer: _load_ct_file(_resolve(path, ref), layer, *hooks) for layer, ref in enumerate(files)}


def _resolve(folder: str, ref: str) -> str:
    """A file named by a config.yaml entry: ``hf://repo_id/path[@revision]`` from the Hugging Face cache (never
    downloaded here), else a path, relative to the config's folder."""
    if ref.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        spec, _, revision = ref[len("hf://"):].partition("@")
        parts = spec.split("/")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            return hf_hub_download(repo, file, revision=revision or None, local_files_only=True)
        except Exception as e:
            raise FileNotFoundError(f"{ref} is not in the Hugging Face cache; download it first "
                                    f"(huggingface-cli download {repo} {file}).") from e
    p = ref if os.path.isabs(ref) else os.path.join(folder, ref)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{folder}/config.yaml names {ref}, which is not a file.")
    return p


def _load_ct_file(file: str, layer: int, hook_in: str, hook_out: str) -> SAE:
    t = {k: v.astype(mx.float32) for k, v in load_safetensors(file).items()}
    if "w_enc" in t:  # Gemma Scope 2's names and [d, F] encoder
        t = {"W_enc": t["w_enc"].T, "W_dec": t["w_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
             "activation_function.threshold": t["threshold"],
             **({"W_skip": t["affine_skip_connection"].T} if "affine_skip_connection" in t else {})}
    need = ("W_enc", "W_dec", "b_enc", "b_dec")
    missing = [k for k in need if k not in t]
    if missing:
        raise ValueError(f"{file}: missing {missing}; a circuit-tracer transcoder holds {', '.join(need)}.")
    unexpected = sorted(set(t) - set(need) - {"W_skip", "activation_function.threshold"})
    if unexpected:
        raise ValueError(f"{file}: unexpected tensors {unexpected}.")
    F, d = t["W_enc"].shape
    d_out = t["W_dec"].shape[1]
    jump = "activation_function.threshold" in t
    cfg = SAEConfig(architecture="jumprelu" if jump else "relu", d_in=d, d_sae=F, d_out=d_out,
                    hook_name=f"blocks.{layer}.{hook_in}", hook_name_out=f"blocks.{layer}.{hook_out}",
                    skip_connection="W_skip" in t, apply_b_dec_to_input=False, decoder_unit_norm=False,
                    normalize_activations="none", extra={"imported_from": "circuit_tracer", "path": file})
    sae = SAE(cfg)
    params = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if jump:
        params["threshold"] = t["activation_function.threshold"]
    if "W_skip" in t:
        params["W_skip"] = t["W_skip"]
    for k, v in params.items():
        want = getattr(sae, k).shape
        if tuple(v.shape) != tuple(want):
            raise ValueError(f"{file}: {k} has shape {tuple(v.shape)}; expected {tuple(want)}.")
    sae.update(params)
    mx.eval(sae.parameters())
    return sae
