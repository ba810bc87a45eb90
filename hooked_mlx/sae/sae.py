"""``SAE``: one module for the four architectures, with one encode / decode / forward interface.

Parameters (float32, row-major ``x @ W``): ``W_enc`` [d_in,d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae,d_in]
(row i = latent i's direction), ``b_dec`` [d_in], and ``threshold`` [d_sae] for JumpReLU (trained) and
BatchTopK (the running global threshold, the same value in every entry; not trained by gradient).

Inference semantics (x [..., d_in]):

* pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
* relu: f = relu(pre);  topk: the k largest of relu(pre) per token;  jumprelu / batchtopk: f = relu(pre) *
  (pre > threshold)
* gated (SAELens's, loaded from files): z = (x - b_dec) @ W_enc; pre = z * exp(r_mag) + b_enc (the magnitude
  path; SAELens's b_mag) and f = relu(pre) * (z + b_gate > 0)
* x_hat = f @ W_dec + b_dec

A trained SAE takes raw activations: input normalisation used during training is folded into the weights
(``fold_input_scale``) before the file is written. SAELens's run-time normalisations
(``cfg.normalize_activations`` = ``constant_norm_rescale`` / ``layer_norm``, loaded SAEs) are applied to each
input token inside ``encode_pre``, and undone on the output with that token's statistics by ``predict`` and
``__call__`` (``decode`` alone stays in the normalised space: it has no input to take them from).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..host import to_float
from ..shapes import SAEInput, SAELatents, SparseIndices, SparseValues
from .config import RUN_TIME_NORMS, SAEConfig
from .kernels import reference as K

#: SAELens's layer_norm epsilon (added to the std)
LN_EPS = 1e-5


class SAE(nn.Module):
    """A sparse autoencoder over ``cfg.d_in``-wide activations with ``cfg.resolved_d_sae`` latents."""

    def __init__(self, cfg: SAEConfig, key: mx.array | None = None):
        super().__init__()
        if cfg.d_in <= 0:
            raise ValueError(
                "SAEConfig.d_in = 0: set it to the width of the hooked activation (the trainer and the loaders "
                "fill it in from the model or the file)."
            )
        object.__setattr__(self, "cfg", cfg)
        D, F, Do = cfg.d_in, cfg.resolved_d_sae, cfg.resolved_d_out
        key = mx.random.key(cfg.seed) if key is None else key
        W = mx.random.normal((F, D), key=key)
        norm = 1.0 if cfg.resolved_decoder_unit_norm else cfg.decoder_init_norm
        W = W * (norm / mx.linalg.norm(W, axis=-1, keepdims=True))
        self.W_enc = mx.array(W.T)
        if Do != D:  # a transcoder's decoder writes another width
            W = mx.random.normal((F, Do), key=mx.random.split(key)[1])
            W = W * (norm / mx.linalg.norm(W, axis=-1, keepdims=True))
        self.W_dec = W
        self.b_enc = mx.zeros((F,))
        self.b_dec = mx.zeros((Do,))
        if cfg.skip_connection:
            self.W_skip = mx.zeros((Do, D))
        arch = cfg.arch
        if arch.threshold == "learned":
            self.threshold = mx.full((F,), cfg.jumprelu_init_threshold, dtype=mx.float32)
        elif arch.threshold == "running":
            self.threshold = mx.zeros((F,))
            self.freeze(keys=["threshold"], recurse=False)
        elif arch.gated:  # (b_enc is the magnitude path's bias, SAELens's b_mag)
            self.b_gate = mx.zeros((F,))
            self.r_mag = mx.zeros((F,))

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str = "") -> SAE:
        """A published SAE by name (``pretrained.from_pretrained``): a sae_lens release and SAE id when sae_lens is
        installed, else a Hugging Face repository id and folder; from the local HF cache first."""
        from .pretrained import from_pretrained  # (loading builds on this module)

        return from_pretrained(release, sae_id)

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        """The output width: d_in for an SAE, the target activation's for a transcoder."""
        return self.W_dec.shape[1]

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    # -- forward ----------------------------------------------------------------------------------------
    def _check(self, x: mx.array) -> mx.array:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"SAE input has last dimension {x.shape[-1]}, expected d_in = {self.d_in} (hook "
                f"{self.cfg.hook_name or '?'}). Pass activations of shape [..., {self.d_in}]."
            )
        return x.astype(mx.float32) if x.dtype != mx.float32 else x

    def normalize_input(self, x: SAEInput) -> SAEInput:
        """x as the encoder reads it: a SAELens run-time normalisation applied per token (identity otherwise)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (self.d_in ** 0.5 / mx.linalg.norm(x, axis=-1, keepdims=True))
        if mode == "layer_norm":
            xc = x - mx.mean(x, axis=-1, keepdims=True)
            return xc / (mx.std(xc, axis=-1, keepdims=True, ddof=1) + LN_EPS)
        return x

    def denormalize_output(self, y: SAEInput, x: SAEInput) -> SAEInput:
        """An output y in the normalised space mapped back with input x's per-token statistics (the inverse of
        ``normalize_input``, as SAELens applies it to the reconstruction)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return y * (mx.linalg.norm(x, axis=-1, keepdims=True) / self.d_in ** 0.5)
        if mode == "layer_norm":
            mu = mx.mean(x, axis=-1, keepdims=True)
            return y * mx.std(x - mu, axis=-1, keepdims=True, ddof=1) + mu
        return y

    def encode_pre(self, x: SAEInput) -> SAELatents:
        """Pre-activations [..., d_sae] (a gated SAE's: the magnitude path's)."""
        x = self.normalize_input(self._check(x))
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        if self.cfg.arch.gated:
            return K.encode_pre(x, self.W_enc, mx.zeros_like(self.b_enc), b_dec) * mx.exp(self.r_mag) + self.b_enc
        return K.encode_pre(x, self.W_enc, self.b_enc, b_dec)

    def activation(self, pre: mx.array) -> mx.array:
        """Latents [..., d_sae] from pre-activations, with the inference semantics of the architecture."""
        kind = self.cfg.arch.inference
        if kind == "relu":
            return mx.maximum(pre, 0)
        if kind == "topk":
            lead = pre.shape[:-1]
            p2 = pre.reshape(-1, pre.shape[-1])
            vals, idx = K.topk_select(p2, self.cfg.k)
            return K.scatter_dense(vals, idx, self.d_sae).reshape(*lead, self.d_sae)
        if kind == "gated":  # the gate reads the shared projection z = (pre - b_mag) / exp(r_mag)
            gate = (pre - self.b_enc) * mx.exp(-self.r_mag) + self.b_gate
            return mx.where(gate > 0, mx.maximum(pre, 0), 0)
        # "threshold": JumpReLU's learned threshold, BatchTopK's running one
        return mx.where(pre > self.threshold, mx.maximum(pre, 0), 0)

    def encode(self, x: SAEInput) -> SAELatents:
        """Latents f [..., d_sae] (dense, mostly zeros)."""
        return self.activation(self.encode_pre(x))

    def encode_sparse(self, x: SAEInput, k: int | None = None) -> tuple[SparseValues, SparseIndices]:
        """The k largest latents per token: (values [..., k], indices [..., k]) sorted by value, descending.

        ``k`` defaults to ``cfg.k``. For non-TopK architectures entries beyond the active ones are zeros.
        """
        k = self.cfg.k if k is None else k
        if not 1 <= k <= self.d_sae:
            raise ValueError(f"k = {k} is invalid: expected 1 <= k <= d_sae ({self.d_sae}).")
        f = self.encode(x)
        idx = mx.argsort(-f, axis=-1)[..., :k]
        return mx.take_along_axis(f, idx, axis=-1), idx

    def decode(self, f: SAELatents) -> SAEInput:
        """Reconstruction [..., d_out] = f @ W_dec + b_dec (d_out = d_in for an SAE; a skip transcoder's
        skip term needs the input: see ``predict``)."""
        return f @ self.W_dec + self.b_dec

    def skip_term(self, x: SAEInput) -> mx.array | None:
        """A skip transcoder's linear term x @ W_skip.T [..., d_out]; None for every other SAE."""
        return x @ self.W_skip.T if "W_skip" in self else None

    def predict(self, f: SAELatents, x: SAEInput) -> SAEInput:
        """The output for latents f of input x: ``decode(f)`` (mapped back to x's units under a run-time
        normalisation), plus a skip transcoder's ``skip_term(x)``."""
        return self._plus_skip(self.denormalize_output(self.decode(f), x), x)

    def _plus_skip(self, out: mx.array, x: mx.array) -> mx.array:
        skip = self.skip_term(x)
        return out if skip is None else out + skip

    def __call__(self, x: SAEInput) -> SAEInput:
        """Reconstruction x_hat [..., d_in] of x [..., d_in]; a transcoder's prediction [..., d_out] of its
        target activation (plus x @ W_skip.T for a skip transcoder)."""
        x = self._check(x)
        if self.cfg.arch.inference == "topk" and self.cfg.normalize_activations not in RUN_TIME_NORMS:
            lead = x.shape[:-1]
            vals, idx = K.topk_encode(x.reshape(-1, self.d_in), self.W_enc, self.b_enc, self.b_dec, self.cfg.k,
                                      self.cfg.apply_b_dec_to_input)
            return self._plus_skip(K.topk_decode(vals, idx, self.W_dec, self.b_dec).reshape(*lead, self.d_out), x)
        return self.predict(self.encode(x), x)

    # -- weight surgery ---------------------------------------------------------------------------------
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``x * scale`` take raw ``x`` (outputs in raw units): exact for every arch.

        W_enc *= s, W_dec /= s, b_dec /= s (pre-activations and thresholds are unchanged).
        """
        s = float(scale)
        if s == 1.0:
            return
        self.W_enc = self.W_enc * s
        self.W_dec = self.W_dec / s
        self.b_dec = self.b_dec / s

    def decoder_norms(self) -> mx.array:
        return mx.linalg.norm(self.W_dec, axis=-1)

    def fold_decoder_norms(self) -> None:
        """Rescale so every decoder row has unit norm, keeping x_hat the same for ReLU / TopK / JumpReLU.

        W_enc[:, i] *= n_i, b_enc *= n_i, threshold *= n_i, W_dec[i] /= n_i (valid because the activation
        functions are positively homogeneous; TopK ranking would change, so TopK is refused).
        """
        if self.cfg.arch.uses_k:
            raise ValueError("fold_decoder_norms changes TopK rankings; TopK-family decoders are kept at unit norm.")
        n = mx.maximum(self.decoder_norms(), 1e-12)
        self.W_enc = self.W_enc * n
        self.b_enc = self.b_enc * n
        self.W_dec = self.W_dec / n[:, None]
        if "threshold" in self:
            self.threshold = self.threshold * n
        if "b_gate" in self:  # (r_mag is a ratio of the two paths: unchanged)
            self.b_gate = self.b_gate * n

    def set_batchtopk_threshold(self, theta: float | mx.array) -> None:
        if self.cfg.arch.threshold != "running":
            raise ValueError("set_batchtopk_threshold applies to batchtopk SAEs only.")
        self.threshold = mx.full((self.d_sae,), theta, dtype=mx.float32) if not isinstance(theta, mx.array) \
            else mx.broadcast_to(theta.astype(mx.float32), (self.d_sae,))

    def calibrate_threshold(self, x: mx.array, target_l0: float | None = None) -> float:
        """BatchTopK: set the global threshold so that the inference L0 on activations x [N, d_in] is
        ``target_l0`` (default k): theta = the (target_l0 * N)-th largest relu(pre) over x. Returns theta.

        The running threshold of training (an EMA of each batch's smallest kept value) lags behind in short
        runs; this re-estimates it from data, e.g. held-out activations, after training.
        """
        if self.cfg.arch.threshold != "running":
            raise ValueError("calibrate_threshold applies to batchtopk SAEs only.")
        acts = mx.maximum(self.encode_pre(x.reshape(-1, self.d_in)), 0).reshape(-1)
        n_keep = int(round((self.cfg.k if target_l0 is None else target_l0) * x.reshape(-1, self.d_in).shape[0]))
        if not 1 <= n_keep <= acts.size:
            raise ValueError(f"target L0 gives {n_keep} kept entries; expected between 1 and {acts.size}.")
        kth = mx.min(mx.topk(acts, n_keep))
        # the largest value strictly below the cut, so that "pre > theta" keeps the cut entry itself
        below = mx.max(mx.where(acts < kth, acts, 0.0))
        theta = to_float((kth + below) / 2)
        self.set_batchtopk_threshold(theta)
        return theta

    def num_params(self) -> int:
        from ..host import flat_items

        return sum(v.size for _, v in flat_items(self.parameters()))

    def __repr__(self) -> str:
        extra = f", k={self.cfg.k}" if self.cfg.arch.uses_k else ""
        hook = f", hook={self.cfg.hook_name!r}" if self.cfg.hook_name else ""
        return f"SAE({self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{extra}{hook})"
