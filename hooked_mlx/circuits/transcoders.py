"""What a replacement model replaces its MLPs with: per-layer transcoders or one cross-layer transcoder, behind one
interface (``Replacement``) that the replacement model and the attribution graph read.

* ``PerLayer``: one transcoder (``SAE`` with ``hook_name_out``) per layer; a layer's features write to that layer's
  MLP output only.
* ``CrossLayerTranscoder``: circuit-tracer's CLT (Ameisen et al. 2025). An encoder per layer reads that layer's MLP
  input; the features of layer l write to the MLP outputs of layers l, l+1, ..., L-1 (decoder ``W_dec[l]``
  [F, L-l, d]); layer t's output is the sum over l <= t plus ``b_dec[t]`` (plus ``x_t @ W_skip[t]`` with skip terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..sae.config import RUN_TIME_NORMS, SAEConfig
from ..sae.files import build_sae
from ..sae.sae import SAE

#: where a replacement may read (the MLP's normalised input before the norm's weight, or the residual stream before
#: the MLP's norm), and where it writes (the MLP's output); names inside a block
HOOK_INS = ("ln2.hook_normalized", "hook_resid_mid")
HOOK_OUT = "hook_mlp_out"


class Replacement:
    """The interface: ``n_layers``; per layer ``encode`` (features [P, F] of the MLP input x [P, d]),
    ``encoder`` ([d, F]: a feature's value is W_enc[:, f] . x, its pre-activation less b_enc) and ``skip_term``;
    ``decode`` (every layer's output from every layer's features, without skip terms) and ``decoder_rows``
    (what feature f of layer l writes to layers l ..: [n, n_out, d]); ``out_layers`` (the layers l's features
    write to)."""

    n_layers: int
    hook_in: str = HOOK_INS[0]

    def encode(self, layer: int, x: mx.array) -> mx.array:
        raise NotImplementedError

    def encoder(self, layer: int) -> mx.array:
        raise NotImplementedError

    def skip_term(self, layer: int, x: mx.array) -> mx.array | None:
        raise NotImplementedError

    def decode_layer(self, layer: int, acts: list[mx.array]) -> mx.array:
        """Layer ``layer``'s output [P, d] (without its skip term) from the features of layers 0..layer."""
        raise NotImplementedError

    def decode(self, acts: list[mx.array]) -> list[mx.array]:
        return [self.decode_layer(t, acts) for t in range(self.n_layers)]

    def n_features(self, layer: int) -> int:
        return int(self.encoder(layer).shape[-1])

    def b_dec(self, layer: int) -> mx.array:
        raise NotImplementedError

    def out_layers(self, layer: int) -> range:
        raise NotImplementedError

    def decoder_rows(self, layer: int, features: mx.array) -> mx.array:
        raise NotImplementedError


class PerLayer(Replacement):
    """Per-layer transcoders {layer: SAE}, each reading ``blocks.l.{hook_in}`` (one of ``HOOK_INS``, the same for
    every layer) and writing ``blocks.l.hook_mlp_out``."""

    def __init__(self, transcoders: dict[int, SAE], n_layers: int):
        missing = [layer for layer in range(n_layers) if layer not in transcoders]
        if missing:
            raise ValueError(f"Attribution replaces every MLP: no transcoder for layer(s) {missing}; pass one per "
                             f"layer, {{0: tc0, ..., {n_layers - 1}: tc{n_layers - 1}}}.")
        first = transcoders[0].cfg.hook_name
        self.hook_in = first.split(".", 2)[-1] if first.startswith("blocks.0.") else first
        if self.hook_in not in HOOK_INS:
            raise ValueError(f"Layer 0's transcoder reads {first!r}; a replacement reads one of "
                             f"{', '.join(f'blocks.L.{h}' for h in HOOK_INS)}.")
        for layer, tc in transcoders.items():
            want = (f"blocks.{layer}.{self.hook_in}", f"blocks.{layer}.{HOOK_OUT}")
            if (tc.cfg.hook_name, tc.cfg.hook_name_out or tc.cfg.hook_name) != want:
                raise ValueError(f"Layer {layer}'s transcoder reads {tc.cfg.hook_name!r} and writes "
                                 f"{tc.cfg.hook_name_out!r}; expected {want[0]!r} -> {want[1]!r} (every layer's "
                                 f"transcoder reads the same hook).")
            cfg = tc.cfg
            if cfg.arch.gated or cfg.normalize_activations in RUN_TIME_NORMS:
                raise ValueError(f"Layer {layer}'s transcoder is {cfg.architecture} / {cfg.normalize_activations}: "
                                 f"attribution needs an encoder input that is linear in the MLP input (relu, topk, "
                                 f"batchtopk, jumprelu without a run-time normalisation).")
        self.transcoders = {int(k): v for k, v in transcoders.items()}
        self.n_layers = n_layers

    def encode(self, layer, x):
        return self.transcoders[layer].encode(x)

    def encoder(self, layer):
        return self.transcoders[layer].W_enc

    def skip_term(self, layer, x):
        return self.transcoders[layer].skip_term(x)

    def decode_layer(self, layer, acts):
        return self.transcoders[layer].decode(acts[layer])

    def b_dec(self, layer):
        return self.transcoders[layer].b_dec

    def out_layers(self, layer):
        return range(layer, layer + 1)

    def decoder_rows(self, layer, features):
        return self.transcoders[layer].W_dec[features][:, None]


@dataclass
class CrossLayerTranscoder(Replacement):
    """A cross-layer transcoder (see the module doc). Arrays: ``W_enc[l]`` [d, F], ``b_enc`` [L, F], ``W_dec[l]``
    [F, L-l, d], ``b_dec`` [L, d], optional ``threshold`` [L, F] (JumpReLU: pre * (pre > threshold); else ReLU)
    and ``W_skip`` [L, d, d] (layer l's skip term x @ W_skip[l]). ``hook_in``: what each layer's encoder reads, one of
    ``HOOK_INS``. ``k``: a TopK CLT (the k largest pre-activations per token and layer, relu'd; what ``train_clt``
    trains with ``architecture="topk"``)."""

    W_enc: list[mx.array]
    b_enc: mx.array
    W_dec: list[mx.array]
    b_dec_: mx.array
    threshold: mx.array | None = None
    W_skip: mx.array | None = None
    hook_in: str = HOOK_INS[0]
    k: int | None = None

    def __post_init__(self):
        self.n_layers = len(self.W_enc)
        L = self.n_layers
        d, F = self.W_enc[0].shape
        for layer in range(L):
            for name, a, want in (("W_enc", self.W_enc[layer], (d, F)), ("W_dec", self.W_dec[layer], (F, L - layer, d))):
                if tuple(a.shape) != want:
                    raise ValueError(f"Cross-layer transcoder: {name}[{layer}] has shape {tuple(a.shape)}; expected "
                                     f"{want}.")
        for name, a, want in (("b_enc", self.b_enc, (L, F)), ("b_dec", self.b_dec_, (L, d)),
                              ("threshold", self.threshold, (L, F)), ("W_skip", self.W_skip, (L, d, d))):
            if a is not None and tuple(a.shape) != want:
                raise ValueError(f"Cross-layer transcoder: {name} has shape {tuple(a.shape)}; expected {want}.")
        self.d_model, self.d_transcoder = d, F
        if self.hook_in not in HOOK_INS:
            raise ValueError(f"Cross-layer transcoder: hook_in {self.hook_in!r}; expected one of {HOOK_INS}.")
        if self.k is not None and (self.threshold is not None or not 1 <= self.k <= F):
            raise ValueError(f"Cross-layer transcoder: k = {self.k} needs 1 <= k <= {F} and no JumpReLU threshold.")

    def encode(self, layer, x):
        pre = x.astype(mx.float32) @ self.W_enc[layer] + self.b_enc[layer]
        if self.k is not None:
            F = pre.shape[-1]
            idx = mx.argpartition(pre, F - self.k, axis=-1)[..., F - self.k:]
            vals = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0)
            return mx.put_along_axis(mx.zeros_like(pre), idx, vals, axis=-1)
        if self.threshold is None:
            return mx.maximum(pre, 0)
        return mx.where(pre > self.threshold[layer], pre, 0.0)

    def encoder(self, layer):
        return self.W_enc[layer]

    def skip_term(self, layer, x):
        return None if self.W_skip is None else x @ self.W_skip[layer]

    def decode_layer(self, layer, acts):
        y = self.b_dec_[layer]
        for source in range(layer + 1):
            y = y + acts[source] @ self.W_dec[source][:, layer - source]
        return y

    def b_dec(self, layer):
        return self.b_dec_[layer]

    def out_layers(self, layer):
        return range(layer, self.n_layers)

    def decoder_rows(self, layer, features):
        return self.W_dec[layer][features]

    def layer_transcoder(self, layer: int) -> SAE:
        """Layer ``layer``'s encoder as a transcoder ``SAE`` (its decoder: the rows this layer writes to its own MLP
        output), for what reads features through an ``SAE`` such as ``sae.analysis.top_contexts``. Its features
        equal the CLT's wherever the thresholds are >= 0 (an ``SAE``'s JumpReLU also applies relu)."""

        arch = "topk" if self.k is not None else "jumprelu" if self.threshold is not None else "relu"
        cfg = SAEConfig(architecture=arch, k=self.k or SAEConfig.defaults()["k"], d_in=self.d_model,
                        d_sae=self.d_transcoder,
                        d_out=self.d_model, hook_name=f"blocks.{layer}.{self.hook_in}",
                        hook_name_out=f"blocks.{layer}.{HOOK_OUT}", apply_b_dec_to_input=False,
                        decoder_unit_norm=False, normalize_activations="none",
                        extra={"cross_layer_transcoder_layer": layer})
        tensors = {"W_enc": self.W_enc[layer], "b_enc": self.b_enc[layer], "W_dec": self.W_dec[layer][:, 0],
                   "b_dec": self.b_dec_[layer]}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold[layer]
        return build_sae(cfg, tensors, f"cross-layer transcoder layer {layer}")


def as_replacement(transcoders, n_layers: int) -> Replacement:
    """``transcoders``: a ``Replacement`` (e.g. a ``CrossLayerTranscoder``) or per-layer transcoders {layer: SAE}."""
    if isinstance(transcoders, Replacement):
        if transcoders.n_layers != n_layers:
            raise ValueError(f"The cross-layer transcoder has {transcoders.n_layers} layers; the model has {n_layers}.")
        return transcoders
    return PerLayer(transcoders, n_layers)
