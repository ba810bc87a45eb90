"""Regenerate tests/data/circuit_tracer_0.5.0/: a tiny random Llama, per-layer transcoders in circuit-tracer's own
file layout, and the attribution graph that circuit-tracer 0.5.0 computes for one prompt.

Run it with a Python that has ``circuit-tracer==0.5.0`` (TransformerLens 2.16.1, torch CPU), not hooked_mlx's::

    python3 -m venv /work/ctvenv && /work/ctvenv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0 \
        transformer-lens==2.16.1
    /work/ctvenv/bin/python tests/make_circuit_tracer_fixture.py            # the committed fixture
    /work/ctvenv/bin/python tests/make_circuit_tracer_fixture.py --out DIR  # elsewhere (the live test)

What it writes (float32 throughout):

* ``model/``: a Hugging Face ``LlamaForCausalLM`` with random weights (3 layers, d_model 32, GQA 4/2 heads,
  untied embeddings) and a word-level tokenizer (``w3`` ... ``w63``, BOS ``<s>``);
* ``transcoders/``: circuit-tracer's transcoder-set layout: ``config.yaml`` (``model_kind: transcoder_set``,
  ``feature_input_hook: ln2.hook_normalized``, ``feature_output_hook: hook_mlp_out``) and ``layer_{i}.safetensors``
  as circuit-tracer's ``load_relu_transcoder`` reads them: W_enc [F, d], W_dec [F, d], b_enc, b_dec, W_skip [d, d]
  (skip transcoders); layer 1 is a JumpReLU (``activation_function.threshold``). Every layer has a skip term:
  circuit-tracer 0.5.0 takes the set's skip flag from layer 0 (``TranscoderSet.skip_connection``), and with it
  off, the other layers' skip terms stay in its error vectors but not in its gradients;
* ``clt/``: a JumpReLU cross-layer transcoder (40 features per layer) in circuit-tracer's CLT layout
  (``W_enc_{l}.safetensors``, ``W_dec_{l}.safetensors``, ``config.yaml`` with ``model_kind: cross_layer_transcoder``),
  reading ``hook_resid_mid``;
* ``expected.safetensors`` (the transcoder set) and ``expected_clt.safetensors`` (the CLT): the prompt's tokens,
  TransformerLens's logits, and circuit-tracer's graph: ``adjacency`` [n, n], ``active_features`` [n_f, 3] (layer,
  position, feature), ``activation_values``, ``logit_targets``, ``logit_probabilities``, ``selected_features``.

The TransformerLens model is built from the same Hugging Face weights with TL's ``convert_llama_weights`` and no
weight processing (``fold_ln=False``, as circuit-tracer loads models), and the transcoders with circuit-tracer's
``load_transcoder_set``; ``attribute`` runs with every feature node (``max_feature_nodes=None``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

CFG = dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab=64, d_transcoder=48)
PROMPT = [1, 17, 5, 42, 9, 33, 28, 11, 60, 7]  # BOS first, as circuit-tracer expects (its position 0 is ignored)
MAX_N_LOGITS, DESIRED_LOGIT_PROB = 5, 0.95
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "circuit_tracer_0.5.0")


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CFG["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_transcoders(folder: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, F = CFG["d_model"], CFG["d_transcoder"]
    os.makedirs(folder)
    names = []
    for layer in range(CFG["n_layers"]):
        t = {
            "W_enc": torch.randn(F, d, generator=g) / d**0.5,
            "W_dec": torch.randn(F, d, generator=g) * 0.3 / F**0.5,
            "b_enc": torch.randn(F, generator=g) * 0.3 - 0.2,
            "b_dec": torch.randn(d, generator=g) * 0.05,
        }
        # skip transcoders (circuit-tracer takes the whole set's skip flag from layer 0: every layer has one)
        t["W_skip"] = torch.randn(d, d, generator=g) * 0.3 / d**0.5
        if layer == 1:  # a JumpReLU
            t["activation_function.threshold"] = torch.rand(F, generator=g) * 0.3
        name = f"layer_{layer}.safetensors"
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(folder, name))
        names.append(name)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                "feature_output_hook: hook_mlp_out\nscan: hooked-mlx-test\ntranscoders:\n")
        for name in names:
            f.write(f"  - {name}\n")


def build(out: str):
    import torch
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = CFG
    hf_cfg = LlamaConfig(hidden_size=c["d_model"], intermediate_size=c["d_mlp"], num_hidden_layers=c["n_layers"],
                         num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"], vocab_size=c["vocab"],
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         initializer_range=0.15, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # norm weights away from 1, so that folding or not folding them matters
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    tokenizer().save_pretrained(os.path.join(out, "model"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))  # (TransformerLens reads its name_or_path)

    tl_cfg = HookedTransformerConfig(
        d_model=c["d_model"], d_head=c["d_model"] // c["n_heads"], n_heads=c["n_heads"], d_mlp=c["d_mlp"],
        n_layers=c["n_layers"], n_ctx=128, eps=1e-5, d_vocab=c["vocab"], act_fn="silu",
        n_key_value_heads=c["n_kv_heads"], normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=c["d_model"] // c["n_heads"], rotary_base=10000.0, final_rms=True,
        gated_mlp=True, original_architecture="LlamaForCausalLM", device="cpu", dtype=torch.float32)
    tc_dir = os.path.join(out, "transcoders")
    write_transcoders(tc_dir, seed=1)
    tcs = load_transcoder_set({i: os.path.join(tc_dir, f"layer_{i}.safetensors") for i in range(c["n_layers"])},
                              scan="hooked-mlx-test", feature_input_hook="ln2.hook_normalized",
                              feature_output_hook="hook_mlp_out", device=torch.device("cpu"), dtype=torch.float32,
                              lazy_encoder=False, lazy_decoder=False)
    clt_dir = os.path.join(out, "clt")
    write_clt(clt_dir, seed=2)
    clt = load_clt(clt_dir, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out",
                   scan="hooked-mlx-test", device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    models = []
    for replacement in (tcs, clt):
        model = TransformerLensReplacementModel(tl_cfg, tokenizer=tok)
        model.load_and_process_state_dict(convert_llama_weights(hf, tl_cfg), fold_ln=False,
                                          center_writing_weights=False, center_unembed=False, fold_value_biases=False,
                                          refactor_factored_attn_matrices=False)
        model._configure_replacement_model(replacement)
        model.eval()
        models.append(model)
    return models


def write_clt(folder: str, seed: int) -> None:
    """A JumpReLU cross-layer transcoder in circuit-tracer's layout (``load_clt``): ``W_enc_{l}.safetensors``
    (W_enc_l [F, d], b_enc_l, b_dec_l, threshold_l) and ``W_dec_{l}.safetensors`` (W_dec_l [F, L-l, d]), with a
    config.yaml (``model_kind: cross_layer_transcoder``, reading ``hook_resid_mid``)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, F, L = CFG["d_model"], 40, CFG["n_layers"]
    os.makedirs(folder)
    for layer in range(L):
        save_file({f"W_enc_{layer}": torch.randn(F, d, generator=g) / d**0.5,
                   f"b_enc_{layer}": torch.randn(F, generator=g) * 0.3,
                   f"b_dec_{layer}": torch.randn(d, generator=g) * 0.05,
                   f"threshold_{layer}": torch.rand(F, generator=g) * 0.4},
                  os.path.join(folder, f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": torch.randn(F, L - layer, d, generator=g) * 0.3 / F**0.5},
                  os.path.join(folder, f"W_dec_{layer}.safetensors"))
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
                "feature_output_hook: hook_mlp_out\nscan: hooked-mlx-test\n")


def main(argv=None) -> None:
    import circuit_tracer
    import torch
    from circuit_tracer import attribute
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        if args.out != OUT:
            sys.exit(f"{args.out} exists; give a new folder.")
        shutil.rmtree(args.out)  # (this script's own fixture folder only)
    os.makedirs(args.out)
    tokens = torch.tensor(PROMPT)
    for model, name in zip(build(args.out), ("expected.safetensors", "expected_clt.safetensors")):
        with torch.no_grad():
            logits = model(tokens[None])[0]
        graph = attribute(tokens, model, max_n_logits=MAX_N_LOGITS, desired_logit_prob=DESIRED_LOGIT_PROB,
                          batch_size=64, max_feature_nodes=None)
        save_file({
            "tokens": tokens.to(torch.int64),
            "logits": logits.float().contiguous(),
            "adjacency": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.to(torch.int64).contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "logit_targets": torch.tensor([int(t.vocab_idx) if hasattr(t, "vocab_idx") else int(t)
                                           for t in graph.logit_targets], dtype=torch.int64),
            "logit_probabilities": graph.logit_probabilities.float().contiguous(),
            "selected_features": graph.selected_features.to(torch.int64).contiguous(),
        }, os.path.join(args.out, name))
        n = graph.adjacency_matrix.shape[0]
        print(f"wrote {name}: {len(graph.active_features)} features, {n} nodes, "
              f"{int((graph.adjacency_matrix != 0).sum())} non-zero edges")
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump({"circuit_tracer": getattr(circuit_tracer, "__version__", "0.5.0"), "torch": torch.__version__,
                   "max_n_logits": MAX_N_LOGITS, "desired_logit_prob": DESIRED_LOGIT_PROB}, f, indent=1)


if __name__ == "__main__":
    main()
