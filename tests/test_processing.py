"""Weight processing: log-probs unchanged, and each step's defining property holds.

Families cover the applicability rules: gpt2 (LayerNorm with bias, learned positions, tied: every step),
gpt_neox (parallel block, partial rotary), qwen2_moe (RMSNorm, GQA value biases, MoE router/experts/shared
expert), gemma2 ((1 + w) norms, final soft-cap: no center_unembed), llama (the core family).
"""

from __future__ import annotations

import warnings

from hooked_mlx import HookedTransformer
from hooked_mlx.components.attention import linear_weight
from hooked_mlx.processing import PROCESSING_OPTIONS, process_weights
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_fixtures import build_mlx_lm_checkpoint
from test_architectures import FAMILIES, TOKENS, maxdiff
from tolerance import scale_of

ALL = {opt: True for opt in PROCESSING_OPTIONS}
EXPECTED = {  # steps that apply to each family
    "gpt2": set(PROCESSING_OPTIONS),
    "gpt_neox": set(PROCESSING_OPTIONS),
    "qwen2_moe": {"fold_ln", "center_unembed", "fold_value_biases"},
    "gemma2": {"fold_ln", "fold_value_biases"},
    "llama": {"fold_ln", "center_unembed", "fold_value_biases"},
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_llama_path):
    root = tmp_path_factory.mktemp("proc")
    out = {"llama": tiny_llama_path}
    for fam in ("gpt2", "gpt_neox", "qwen2_moe", "gemma2"):
        out[fam] = build_mlx_lm_checkpoint(root / fam, FAMILIES[fam], seed=3)[1]
    out["gpt2-q4"] = build_mlx_lm_checkpoint(root / "gpt2-q4", FAMILIES["gpt2"], seed=4,
                                             quantize={"group_size": 64, "bits": 4})[1]
    return out


def logprobs(model, toks=TOKENS):
    return nn.log_softmax(model(toks).astype(mx.float32), axis=-1)


def load_processed(path, **opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer.from_pretrained(path, **opts)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_processing_keeps_log_probs_and_records_steps(paths, family):
    raw = HookedTransformer.from_pretrained(paths[family])
    proc = load_processed(paths[family], **ALL)
    assert set(proc.cfg.processing) == EXPECTED[family]
    assert maxdiff(logprobs(proc), logprobs(raw)) <= 1e-4
    # the hooked path of the processed model agrees with its fast path
    logits, _ = proc.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post")
    assert maxdiff(logits, proc(TOKENS)) <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe", "gemma2"])
def test_fold_ln_leaves_pure_normalisations(paths, family):
    raw = HookedTransformer.from_pretrained(paths[family])
    proc = load_processed(paths[family], fold_ln=True)
    assert proc.cfg.processing == {"fold_ln": True}
    norms = [proc.ln_final] + [b[n] for b in proc.blocks for n in ("ln1", "ln2")]
    for norm in norms:
        assert mx.all(norm.effective_weight() == 1).item()
        if "bias" in norm:
            assert mx.all(norm.bias == 0).item()
    if family == "gemma2":  # post-norms stay weighted, as in TransformerLens
        assert maxdiff(proc.blocks[0].ln1_post.weight, raw.blocks[0].ln1_post.weight) == 0.0
    # LayerNorm models: the reading weights are centred over d_model
    if proc.cfg.normalization == "ln":
        b = proc.blocks[0]
        for layer in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.mlp.up_proj, proc.unembed.lm_head):
            assert mx.abs(linear_weight(layer).mean(axis=-1)).max().item() < 1e-6
    # the normalised activations keep their meaning
    names = ["blocks.1.ln2.hook_normalized", "ln_final.hook_scale"]
    _, c_raw = raw.run_with_cache(TOKENS, names_filter=names)
    _, c_proc = proc.run_with_cache(TOKENS, names_filter=names)
    for n in names:
        assert maxdiff(c_raw[n], c_proc[n]) <= 1e-5
    assert maxdiff(logprobs(proc), logprobs(raw)) <= 1e-4


def test_center_writing_weights_have_zero_mean_over_d_model(paths):
    raw = HookedTransformer.from_pretrained(paths["gpt2"])
    proc = load_processed(paths["gpt2"], center_writing_weights=True)
    assert proc.cfg.processing == {"center_writing_weights": True}
    assert not proc.cfg.tie_word_embeddings  # W_E changed, W_U must not
    assert mx.abs(proc.embed.weight.mean(-1)).max().item() < 1e-6
    assert mx.abs(proc.pos_embed.weight.mean(-1)).max().item() < 1e-6
    for b in proc.blocks:
        for layer in (b.attn.o_proj, b.mlp.down_proj):
            assert mx.abs(layer.weight.mean(0)).max().item() < 1e-6  # [dm, in]: mean over d_model
            assert abs(layer.bias.mean().item()) < 1e-6
    # every block's writes are mean-free, so the residual stream is too
    _, cache = proc.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("resid_post"))
    resid = cache["blocks.1.hook_resid_post"]
    assert mx.abs(resid.mean(-1)).max().item() < 1e-5 * scale_of(resid)
    assert maxdiff(logprobs(proc), logprobs(raw)) <= 1e-4


def test_center_unembed_gives_mean_free_logits(paths):
    raw = HookedTransformer.from_pretrained(paths["gpt_neox"])
    proc = load_processed(paths["gpt_neox"], center_unembed=True)
    assert mx.abs(proc.unembed.lm_head.weight.mean(0)).max().item() < 1e-6
    logits = proc(TOKENS)
    assert mx.abs(logits.mean(-1)).max().item() < 1e-5 * scale_of(logits)  # mean-free over the vocabulary
    assert maxdiff(logprobs(proc), logprobs(raw)) <= 1e-4


def test_center_unembed_is_skipped_with_soft_capped_logits(paths):
    with pytest.warns(UserWarning, match="soft-capped"):
        model = HookedTransformer.from_pretrained(paths["gemma2"], center_unembed=True)
    assert model.cfg.processing == {}


def test_center_writing_weights_is_skipped_for_rmsnorm(paths):
    with pytest.warns(UserWarning, match="RMSNorm"):
        model = HookedTransformer.from_pretrained(paths["llama"], center_writing_weights=True)
    assert model.cfg.processing == {}


def test_fold_value_biases_with_gqa(paths):
    """qwen2_moe: 4 query heads share 2 kv heads; b_V moves into b_O and attention outputs are unchanged."""
    raw = HookedTransformer.from_pretrained(paths["qwen2_moe"])
    assert raw.cfg.n_key_value_heads < raw.cfg.n_heads and not raw.cfg.o_bias
    proc = load_processed(paths["qwen2_moe"], fold_value_biases=True)
    assert proc.cfg.o_bias
    for b in proc.blocks:
        assert mx.all(b.attn.v_proj.bias == 0).item()
    names = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.0.attn.hook_z"]
    _, c_raw = raw.run_with_cache(TOKENS, names_filter=names)
    _, c_proc = proc.run_with_cache(TOKENS, names_filter=names)
    assert maxdiff(c_raw["blocks.0.hook_attn_out"], c_proc["blocks.0.hook_attn_out"]) <= 1e-5
    assert maxdiff(c_raw["blocks.1.hook_attn_out"], c_proc["blocks.1.hook_attn_out"]) <= 1e-5
    assert maxdiff(c_raw["blocks.0.attn.hook_z"], c_proc["blocks.0.attn.hook_z"]) > 1e-3  # b_V left z


def test_quantized_weights_are_dequantized_and_say_so(paths):
    raw = HookedTransformer.from_pretrained(paths["gpt2-q4"], keep_quantized=True)
    assert raw.cfg.quantization is not None
    with pytest.warns(UserWarning, match="dequantized"):
        proc = HookedTransformer.from_pretrained(paths["gpt2-q4"], keep_quantized=True, **ALL)
    assert proc.cfg.quantization is None
    assert not any("scales" in m for _, m in proc.named_modules())
    assert set(proc.cfg.processing) == set(PROCESSING_OPTIONS)
    assert maxdiff(logprobs(proc), logprobs(raw)) <= 1e-4


def test_canonical_checkpoint_records_processing(paths, tmp_path):
    from hooked_mlx.loading import save_canonical

    proc = load_processed(paths["gpt2"], **ALL)
    out = save_canonical(proc, tmp_path / "gpt2-processed", tokenizer_dir=paths["gpt2"])
    again = HookedTransformer.from_pretrained(out)
    assert again.cfg.processing == proc.cfg.processing
    assert maxdiff(again(TOKENS), proc(TOKENS)) == 0.0
    assert process_weights(again, **ALL) == {}  # never applied twice
    assert maxdiff(again(TOKENS), proc(TOKENS)) == 0.0


def test_unknown_option_is_rejected(paths):
    model = HookedTransformer.from_pretrained(paths["llama"])
    with pytest.raises(ValueError, match="fold_ln"):
        process_weights(model, fold_layernorm=True)
