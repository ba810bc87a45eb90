"""``SAEConfig``: the one validated config of a sparse autoencoder, its training run and its data.

Every default lives here and nowhere else: the trainer, the activation store, the CLI (``hooked-mlx
train-sae --help`` is generated from these fields), the docs and the tests read them from this class.
A bad value raises ``ValueError`` naming the field, the value and what is allowed.

Sections (one flat dataclass, so one ``cfg.json`` and one CLI flag per field):

* SAE: ``architecture``, ``d_in``, ``d_sae`` / ``expansion_factor``, ``k``, ``apply_b_dec_to_input``;
* losses: ``l1_coefficient`` (ReLU), ``l0_coefficient`` + ``jumprelu_bandwidth`` + ``jumprelu_init_threshold``
  (JumpReLU), ``batchtopk_threshold_lr`` (BatchTopK), ``aux_k`` / ``aux_k_coefficient`` (AuxK, TopK family),
  ``ghost_grads`` (ReLU);
* optimisation: Adam ``lr`` / ``adam_*`` (bias-corrected), ``lr_warmup_steps``, ``lr_schedule``,
  ``lr_end_factor``, ``sparsity_warmup_steps``, ``grad_clip_norm``, ``decoder_unit_norm``;
* data: ``hook_name``, ``context_size``, ``store_batch_size_prompts``, ``shuffle_buffer_tokens``,
  ``train_batch_size_tokens``, ``training_tokens``, ``normalize_activations``, ``prepend_bos``;
* bookkeeping: ``dead_tokens_window``, ``log_every_steps``, ``checkpoint_every_steps``, ``seed``, W&B.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .architectures import ARCHITECTURES, ARCHS, Architecture

LR_SCHEDULES = ("constant", "cosine", "linear")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
NORMALIZATIONS: dict[str, str] = {
    "none": "train on raw activations",
    "expected_average_only_in": "scale inputs by s = sqrt(d_in) / E||x|| (estimated before training); folded "
    "into the weights at the end, so the saved SAE takes raw activations",
    "constant_norm_rescale": "(SAELens, loaded SAEs) every input token is rescaled to norm sqrt(d_in) inside the "
    "SAE, and the output scaled back by the same token's factor",
    "layer_norm": "(SAELens, loaded SAEs) every input token is centred and divided by (its unbiased std + 1e-5) "
    "inside the SAE, and the output mapped back with the same token's mean and std",
}
#: normalisations the SAE applies to every input at run time (SAELens's; never folded into the weights)
RUN_TIME_NORMS = ("constant_norm_rescale", "layer_norm")
DTYPES = ("float32",)
#: SAE kernel back ends: "auto" = the fused ops of this device (CUDA, Metal or the sparse CPU ops, each
#: self-checked against the reference at first use), "fused" the same, "reference" the pure-MLX definition
KERNELS = ("auto", "fused", "reference")
#: dtype of the large gradients (W_enc, W_dec) in a data-parallel step's all_sum (NCCL / ring); the update
#: itself always runs in float32. bfloat16 halves the bytes on the wire at ~2^-8 relative rounding per hop;
#: "auto" picks it where the back end's backward already reads bf16 operands (the GPU kernels), else float32.
GRAD_REDUCE_DTYPES = ("auto", "float32", "bfloat16")

FORMAT_VERSION = 1

#: one line of help per field (the CLI flags and docs use it)
FIELD_HELP: dict[str, str] = {
    "d_in": "width of the hooked activation (0: taken from the model or the data)",
    "architecture": "SAE architecture: " + "; ".join(f"{k}: {v}" for k, v in ARCHITECTURES.items()),
    "d_sae": "number of latents (0: expansion_factor * d_in)",
    "expansion_factor": "d_sae / d_in when d_sae is 0",
    "k": "active latents per token (TopK; BatchTopK: on average over the batch)",
    "apply_b_dec_to_input": "subtract b_dec from the input before encoding",
    "dtype": "parameter dtype",
    "l1_coefficient": "ReLU: weight of the L1 penalty sum_i |f_i| * ||W_dec,i||",
    "l0_coefficient": "JumpReLU: weight of the L0 penalty sum_i H(z_i - theta_i)",
    "jumprelu_bandwidth": "JumpReLU: bandwidth epsilon of the rectangle-kernel pseudo-gradient",
    "jumprelu_init_threshold": "JumpReLU: initial threshold theta_0",
    "batchtopk_threshold_lr": "BatchTopK: EMA rate of the running inference threshold",
    "aux_k": "AuxK: dead latents used to model the residual (0: d_in // 2)",
    "aux_k_coefficient": "AuxK: weight alpha of the normalised auxiliary loss (0: off)",
    "ghost_grads": "ReLU: ghost grads for dead latents",
    "lr": "Adam learning rate (bias-corrected Adam)",
    "adam_beta1": "Adam beta1",
    "adam_beta2": "Adam beta2",
    "adam_eps": "Adam epsilon",
    "lr_warmup_steps": "steps of linear learning-rate warm-up from 0",
    "lr_schedule": "after warm-up: " + ", ".join(LR_SCHEDULES) + " (decay to lr * lr_end_factor)",
    "lr_end_factor": "final learning rate as a fraction of lr",
    "sparsity_warmup_steps": "steps over which the sparsity coefficient ramps linearly from 0",
    "grad_clip_norm": "global gradient-norm clip (0: off)",
    "grad_reduce_dtype": "data-parallel runs: dtype of the W_enc / W_dec gradients in the all_sum: "
                         + ", ".join(GRAD_REDUCE_DTYPES) + " (auto: bfloat16 where the back end's backward reads "
                         "bf16 operands, the GPU kernels; float32 otherwise. The update stays float32)",
    "kernels": "SAE kernel back end: auto (the fused ops of this device: CUDA, Metal or the sparse CPU ops, "
               "self-checked), fused (the same) or reference (pure MLX)",
    "decoder_unit_norm": "keep decoder rows at unit norm, removing the parallel gradient (default: TopK family)",
    "decoder_init_norm": "decoder row norm at init when rows are not kept at unit norm",
    "b_dec_init": "decoder-bias init from the first batch: " + ", ".join(B_DEC_INITS),
    "hook_name": "canonical hook name, e.g. blocks.2.hook_resid_post",
    "d_out": "transcoders: output width (0: d_in, an SAE)",
    "hook_name_out": "transcoders: the hook the output replaces ('': hook_name, an SAE)",
    "skip_connection": "transcoders: add a linear skip term x @ W_skip.T",
    "model_name": "model name or path recorded in saved files",
    "context_size": "tokens per context",
    "prepend_bos": "start each context with BOS",
    "packing": "concatenate documents (BOS-separated) into full contexts; else one document per context",
    "exclude_special_tokens": "drop BOS and pad positions from the training data",
    "store_batch_size_prompts": "contexts per model forward",
    "shuffle_buffer_tokens": "size of the fixed shuffle buffer, in tokens (per hook)",
    "train_batch_size_tokens": "tokens per training step",
    "training_tokens": "total training tokens",
    "normalize_activations": "input normalisation: " + "; ".join(f"{k}: {v}" for k, v in NORMALIZATIONS.items()),
    "norm_estimation_tokens": "tokens used to estimate the input normalisation",
    "dead_tokens_window": "a latent is dead after this many tokens without firing",
    "log_every_steps": "read the on-device metrics this often (one host sync)",
    "checkpoint_every_steps": "write a checkpoint this often (0: only at the end)",
    "seed": "random seed (initialisation, data order)",
    "wandb_project": "Weights & Biases project (empty: no W&B)",
    "wandb_run_name": "Weights & Biases run name",
    "extra": "free-form metadata carried into saved files",
}


@dataclass
class SAEConfig:
    """Hyper-parameters of one SAE and of its training run (see the module docstring for sections)."""

    # --- the SAE -----------------------------------------------------------------------------------
    d_in: int = 0  # width of the hooked activation; 0 = take it from the model / data
    architecture: str = "topk"
    d_sae: int = 0  # number of latents; 0 = expansion_factor * d_in
    expansion_factor: int = 16
    k: int = 32  # active latents per token (TopK, BatchTopK: average per token)
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    # transcoders: read hook_name, predict (and, spliced, replace) hook_name_out
    d_out: int = 0  # output width; 0 = d_in (an SAE)
    hook_name_out: str = ""  # where the output goes; "" = hook_name (an SAE)
    skip_connection: bool = False  # add x @ W_skip.T (W_skip [d_out, d_in]): a skip transcoder

    # --- losses ------------------------------------------------------------------------------------
    l1_coefficient: float = 1.0  # ReLU: lambda in lambda * sum_i |f_i| * ||W_dec,i||
    l0_coefficient: float = 1.0  # JumpReLU: lambda in lambda * sum_i H(z_i - theta_i)
    jumprelu_bandwidth: float = 0.05  # epsilon of the rectangle kernel (SAELens v6)
    jumprelu_init_threshold: float = 0.01  # theta_0 (SAELens v6)
    batchtopk_threshold_lr: float = 0.01  # theta <- (1 - lr) theta + lr * min kept activation
    aux_k: int = 0  # AuxK latents; 0 = d_in // 2 (TopK family)
    aux_k_coefficient: float = 1.0 / 32  # alpha of the normalised AuxK loss; 0 disables AuxK
    ghost_grads: bool = False  # ReLU only

    # --- optimisation ------------------------------------------------------------------------------
    lr: float = 2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 1000
    lr_schedule: str = "cosine"  # after warmup: constant / cosine / linear decay to lr * lr_end_factor
    lr_end_factor: float = 0.1
    sparsity_warmup_steps: int = 0  # ReLU/JumpReLU: the sparsity coefficient ramps linearly from 0
    grad_clip_norm: float = 1.0  # 0 disables clipping
    decoder_unit_norm: bool | None = None  # None: True for topk/batchtopk, False for relu/jumprelu
    decoder_init_norm: float = 0.1  # row norm at init when the decoder is not kept at unit norm
    b_dec_init: str = "geometric_median"
    kernels: str = "auto"  # how the step runs, not what it computes: excluded from resume's config check
    grad_reduce_dtype: str = "auto"  # multi-rank runs only; also excluded from resume's config check

    # --- data --------------------------------------------------------------------------------------
    hook_name: str = ""  # canonical hook name, e.g. "blocks.2.hook_resid_post"
    model_name: str = ""
    context_size: int = 128
    prepend_bos: bool = True
    packing: bool = True  # concatenate documents (BOS-separated) into full contexts; else one per row
    exclude_special_tokens: bool = True  # drop BOS and pad positions from the training data
    store_batch_size_prompts: int = 16  # contexts per model forward
    shuffle_buffer_tokens: int = 65536  # fixed-size shuffle buffer (rows of d_in floats per hook)
    train_batch_size_tokens: int = 4096
    training_tokens: int = 10_000_000
    normalize_activations: str = "expected_average_only_in"
    norm_estimation_tokens: int = 65536

    # --- bookkeeping -------------------------------------------------------------------------------
    dead_tokens_window: int = 10_000_000  # a latent is dead after this many tokens without firing
    log_every_steps: int = 50  # metrics stay on the device and are read this often
    checkpoint_every_steps: int = 0  # 0 = only at the end (when a checkpoint path is given)
    seed: int = 42
    wandb_project: str = ""  # empty = no W&B
    wandb_run_name: str = ""
    extra: dict = field(default_factory=dict)  # free-form metadata carried into saved files

    def __post_init__(self):
        self.validate()

    # -- derived values --------------------------------------------------------------------------------
    @property
    def is_transcoder(self) -> bool:
        """Whether this maps one activation to another (a transcoder) rather than reconstructing its input."""
        return (self.d_out not in (0, self.d_in) or self.hook_name_out not in ("", self.hook_name)
                or self.skip_connection)

    @property
    def resolved_d_out(self) -> int:
        return self.d_out or self.d_in

    @property
    def arch(self) -> Architecture:
        """The architecture's record (``architectures.py``): every fact about it that code branches on."""
        return ARCHS[self.architecture]

    @property
    def resolved_d_sae(self) -> int:
        return self.d_sae if self.d_sae else self.expansion_factor * self.d_in

    @property
    def resolved_aux_k(self) -> int:
        k = self.aux_k if self.aux_k else max(1, self.d_in // 2)
        return min(k, self.resolved_d_sae) if self.resolved_d_sae else k

    @property
    def resolved_decoder_unit_norm(self) -> bool:
        if self.decoder_unit_norm is None:
            return self.arch.uses_k
        return bool(self.decoder_unit_norm)

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.training_tokens / self.train_batch_size_tokens))

    @property
    def hook_layer(self) -> int | None:
        """The block index of ``hook_name`` (``blocks.3.hook_resid_post`` -> 3), or None for top hooks."""
        from ..names import hook_spec

        return hook_spec(self.hook_name).layer if self.hook_name else None

    # -- validation ------------------------------------------------------------------------------------
    def validate(self) -> SAEConfig:
        def bad(name: str, allowed: str):
            value = getattr(self, name)
            raise ValueError(f"SAEConfig.{name} = {value!r} is invalid: allowed {allowed}.")

        def int_at_least(name: str, lo: int):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"an integer >= {lo}")

        def number_in(name: str, lo: float, hi: float, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
            if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
                bad(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

        def one_of(name: str, options):
            if getattr(self, name) not in options:
                bad(name, "one of " + ", ".join(repr(o) for o in options))

        one_of("architecture", tuple(ARCHITECTURES))
        one_of("dtype", DTYPES)
        one_of("lr_schedule", LR_SCHEDULES)
        one_of("b_dec_init", B_DEC_INITS)
        one_of("kernels", KERNELS)
        one_of("grad_reduce_dtype", GRAD_REDUCE_DTYPES)
        one_of("normalize_activations", tuple(NORMALIZATIONS))
        int_at_least("d_in", 0)
        int_at_least("d_sae", 0)
        int_at_least("d_out", 0)
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ValueError("SAEConfig: a transcoder (d_out, hook_name_out or skip_connection set) cannot have "
                             "apply_b_dec_to_input=True: b_dec lives in the output space. Set it to False.")
        int_at_least("expansion_factor", 1)
        int_at_least("k", 1)
        int_at_least("aux_k", 0)
        number_in("l1_coefficient", 0, 1e6)
        number_in("l0_coefficient", 0, 1e6)
        number_in("jumprelu_bandwidth", 0, 1e3, lo_open=True)
        number_in("jumprelu_init_threshold", 0, 1e3)
        number_in("batchtopk_threshold_lr", 0, 1, lo_open=True)
        number_in("aux_k_coefficient", 0, 1e3)
        number_in("lr", 0, 1.0, lo_open=True)
        number_in("adam_beta1", 0, 1, hi_open=True)
        number_in("adam_beta2", 0, 1, hi_open=True)
        number_in("adam_eps", 0, 1, lo_open=True)
        int_at_least("lr_warmup_steps", 0)
        number_in("lr_end_factor", 0, 1)
        int_at_least("sparsity_warmup_steps", 0)
        number_in("grad_clip_norm", 0, 1e9)
        number_in("decoder_init_norm", 0, 1e3, lo_open=True)
        int_at_least("context_size", 2)
        int_at_least("store_batch_size_prompts", 1)
        int_at_least("train_batch_size_tokens", 1)
        int_at_least("shuffle_buffer_tokens", 1)
        int_at_least("training_tokens", 1)
        int_at_least("norm_estimation_tokens", 1)
        int_at_least("dead_tokens_window", 1)
        int_at_least("log_every_steps", 1)
        int_at_least("checkpoint_every_steps", 0)
        int_at_least("seed", 0)
        for name in ("apply_b_dec_to_input", "ghost_grads", "prepend_bos", "packing", "exclude_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.decoder_unit_norm is not None and not isinstance(self.decoder_unit_norm, bool):
            bad("decoder_unit_norm", "None (architecture default), True or False")
        for name in ("hook_name", "hook_name_out", "model_name", "wandb_project", "wandb_run_name"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string")
        if not isinstance(self.extra, dict):
            bad("extra", "a dict")
        if self.shuffle_buffer_tokens < self.train_batch_size_tokens:
            raise ValueError(
                f"SAEConfig.shuffle_buffer_tokens = {self.shuffle_buffer_tokens} is invalid: allowed an integer "
                f">= train_batch_size_tokens ({self.train_batch_size_tokens}), so that a batch can be drawn from it."
            )
        if self.ghost_grads and self.arch.sparsity != "l1":
            raise ValueError(
                f"SAEConfig.ghost_grads = True is invalid for architecture {self.architecture!r}: allowed only with "
                f"architecture 'relu' (TopK-family SAEs use AuxK: aux_k_coefficient)."
            )
        d_sae = self.resolved_d_sae
        if self.d_in and self.arch.uses_k and self.k > d_sae:
            raise ValueError(
                f"SAEConfig.k = {self.k} is invalid: allowed 1 <= k <= d_sae ({d_sae})."
            )
        if self.arch.selection == "batch" and self.train_batch_size_tokens * d_sae >= 2**31:
            raise ValueError(
                f"SAEConfig.train_batch_size_tokens = {self.train_batch_size_tokens} is invalid for batchtopk with "
                f"d_sae {d_sae}: allowed train_batch_size_tokens * d_sae < 2**31 (MLX int32 shapes)."
            )
        return self

    # -- (de)serialisation -----------------------------------------------------------------------------
    def replace(self, **changes) -> SAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (the one place defaults live)."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"Unknown SAEConfig keys {unknown}. Valid keys: {sorted(names)}. (Files written by SAELens or "
                f"sparsify load with hooked_mlx.sae.load_saelens / load_sparsify.)"
            )
        return cls(**d)
