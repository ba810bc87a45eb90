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
* circuit-tracer's cross-layer transcoder layout (``model_kind: cross_layer_transcoder``; ``W_enc_{l}`` and
  ``W_dec_{l}`` files, as its ``load_clt`` reads them): a ``CrossLayerTranscoder``.

The input hook may be ``ln2.hook_normalized`` or ``hook_resid_mid``; the output hook is ``hook_mlp_out``.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx

from ..readers import load_safetensors
from ..sae.config import SAEConfig
from ..sae.files import build_sae, load_sae
from ..sae.sae import SAE
from .transcoders import CrossLayerTranscoder

#: circuit-tracer's hook names (TransformerLens names inside a block) that map onto this library's hooks
CT_INPUT_HOOKS = {"ln2.hook_normalized": "ln2.hook_normalized", "hook_resid_mid": "hook_resid_mid"}
CT_OUTPUT_HOOKS = {"hook_mlp_out": "hook_mlp_out"}


def load_transcoders(path: str) -> dict[int, SAE] | CrossLayerTranscoder:
    """{layer: transcoder} from ``path``: circuit-tracer's layout when it has a ``config.yaml`` (a cross-layer
    transcoder there gives a ``CrossLayerTranscoder``), else its subfolders (the layer is read from each one's input
    hook, ``blocks.L...``); a folder that is itself one transcoder gives one layer."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder of transcoders.")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return load_circuit_tracer(path)
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


def _ct_config(path: str) -> tuple[dict, str, str]:
    import yaml

    with open(os.path.join(path, "config.yaml")) as f:
        cfg = yaml.safe_load(f) or {}
    hooks = []
    for key, known in (("feature_input_hook", CT_INPUT_HOOKS), ("feature_output_hook", CT_OUTPUT_HOOKS)):
        name = cfg.get(key)
        if name not in known:
            raise ValueError(f"{path}/config.yaml: {key} {name!r} is not supported; supported: {sorted(known)} "
                             f"(the transcoders must read the MLP's input, normalised before the norm's weight or "
                             f"the residual stream before the norm, and write the MLP's output).")
        hooks.append(known[name])
    return cfg, hooks[0], hooks[1]


def load_circuit_tracer(path: str) -> dict[int, SAE] | CrossLayerTranscoder:
    """circuit-tracer's ``config.yaml`` folder: a transcoder set or a cross-layer transcoder."""
    cfg, _, _ = _ct_config(path)
    kind = cfg.get("model_kind")
    if kind == "cross_layer_transcoder":
        return load_circuit_tracer_clt(path)
    if kind == "transcoder_set":
        return load_circuit_tracer_set(path)
    raise ValueError(f"{path}/config.yaml: model_kind {kind!r}; expected 'transcoder_set' or 'cross_layer_transcoder'.")


def load_circuit_tracer_clt(path: str) -> CrossLayerTranscoder:
    """circuit-tracer's cross-layer transcoder layout (its ``load_clt``): ``W_enc_{l}.safetensors`` holding
    ``W_enc_{l}`` [F, d], ``b_enc_{l}``, ``b_dec_{l}`` and a JumpReLU's ``threshold_{l}``, and ``W_dec_{l}.safetensors``
    holding ``W_dec_{l}`` [F, L-l, d]."""
    cfg, hook_in, _ = _ct_config(path)
    L = len([f for f in os.listdir(path) if re.fullmatch(r"W_enc_\d+\.safetensors", f)])
    if L == 0:
        raise ValueError(f"{path}: a cross-layer transcoder needs W_enc_0.safetensors, W_dec_0.safetensors, ...")
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for layer in range(L):
        files = [os.path.join(path, f"W_{kind}_{layer}.safetensors") for kind in ("enc", "dec")]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: {os.path.basename(file)} is missing ({L} encoder files).")
        enc = load_safetensors(files[0])
        dec = load_safetensors(files[1])
        try:
            W_enc.append(enc[f"W_enc_{layer}"].astype(mx.float32).T)
            b_enc.append(enc[f"b_enc_{layer}"].astype(mx.float32))
            b_dec.append(enc[f"b_dec_{layer}"].astype(mx.float32))
            if f"threshold_{layer}" in enc:
                thr.append(enc[f"threshold_{layer}"].astype(mx.float32).reshape(-1))
            W_dec.append(dec[f"W_dec_{layer}"].astype(mx.float32))
        except KeyError as e:
            raise ValueError(f"{path}: layer {layer}'s files lack {e.args[0]!r} (circuit-tracer's CLT layout).") from e
    if thr and len(thr) != L:
        raise ValueError(f"{path}: only some layers have a JumpReLU threshold.")
    k = cfg.get("k") if cfg.get("activation") == "topk" else None  # (hooked_mlx's TopK CLTs record k)
    clt = CrossLayerTranscoder(W_enc=W_enc, b_enc=mx.stack(b_enc), W_dec=W_dec, b_dec_=mx.stack(b_dec),
                               threshold=mx.stack(thr) if thr else None, hook_in=hook_in,
                               k=int(k) if k is not None else None)
    mx.eval(clt.W_enc, clt.W_dec, clt.b_enc, clt.b_dec_, clt.threshold)
    return clt


def load_circuit_tracer_set(path: str) -> dict[int, SAE]:
    """A circuit-tracer transcoder set (``config.yaml`` + one safetensors file per layer; see the module doc)."""
    cfg, hook_in, hook_out = _ct_config(path)
    kind = cfg.get("model_kind")
    if kind != "transcoder_set":
        raise ValueError(f"{path}/config.yaml: model_kind {kind!r}; this reads circuit-tracer's per-layer "
                         f"'transcoder_set' (load_transcoders reads both kinds).")
    hooks = [hook_in, hook_out]
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
    tensors = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if jump:
        tensors["threshold"] = t["activation_function.threshold"]
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    return build_sae(cfg, tensors, file)
