"""A random Hugging Face Llama and its TransformerLens twin, for the anchor workers (run in an anchor's venv:
torch, transformers and transformer-lens; never imports hooked_mlx).

``build(cfg, out_dir, cls)``: a ``LlamaForCausalLM`` with random weights (seeded by ``torch.manual_seed`` before
the call), saved in Hugging Face's layout to ``out_dir``, and ``cls`` (``HookedTransformer`` or a subclass, e.g.
circuit-tracer's replacement model) built from a ``HookedTransformerConfig`` with those weights converted by TL's
``convert_llama_weights``, without weight processing (hooked_mlx loads the saved folder unprocessed too).
``cfg``: n_layers, d_model, n_heads, n_kv_heads, d_mlp, vocab. ``device``: the TransformerLens model's torch device.
"""

from __future__ import annotations


def build(cfg: dict, out_dir, cls=None, tokenizer=None, initializer_range: float = 0.08, device: str = "cpu"):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"], num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"], vocab_size=cfg["vocab"],
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        initializer_range=initializer_range, hidden_act="silu",
    )
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    hf.save_pretrained(out_dir, safe_serialization=True)
    tl_cfg = HookedTransformerConfig(
        d_model=cfg["d_model"], d_head=cfg["d_model"] // cfg["n_heads"], n_heads=cfg["n_heads"],
        d_mlp=cfg["d_mlp"], n_layers=cfg["n_layers"], n_ctx=256, eps=1e-5, d_vocab=cfg["vocab"], act_fn="silu",
        n_key_value_heads=cfg["n_kv_heads"], normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=cfg["d_model"] // cfg["n_heads"], rotary_base=10000.0,
        final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM", device=device, dtype=torch.float32,
    )
    model = (cls or HookedTransformer)(tl_cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_llama_weights(hf, tl_cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    return hf, model


def word_tokenizer(vocab: int, out_dir):
    """A word-level tokenizer ("w3" ... "w{vocab-1}", BOS "<s>" = 1), saved to ``out_dir`` and loaded back with
    ``AutoTokenizer`` (TransformerLens reads its ``name_or_path``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
