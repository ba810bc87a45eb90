"""Regenerate tests/sae/data/stories_samples.txt: stories sampled from stories260K itself (offline corpus).

    python tests/sae/make_corpus.py [n_docs] [max_new_tokens]

Sampling uses ``model.generate`` (KV cache, temperature 1, seeded) when the model has it, else a plain
loop over ``model(tokens)`` logits.
"""

import os
import sys

import hooked_mlx  # noqa: F401  (loads the CPU BLAS before mlx.core)

# isort: split
from hooked_mlx import HookedTransformer
import mlx.core as mx

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "..", "shared", "models", "stories260K")


def sample(model, n: int, max_new: int, temperature: float = 1.0, seed: int = 0) -> list[list[int]]:
    eos = 2
    if hasattr(model, "generate"):
        toks = model.generate([""] * n, max_new_tokens=max_new, return_type="tokens", seed=seed, prepend_bos=True,
                              temperature=temperature)
        out = []
        for row in toks.tolist():
            row = row[1:]
            out.append(row[: row.index(eos)] if eos in row else row)
        return out
    key = mx.random.key(seed)
    bos = model.cfg.bos_token_id
    eos = 2
    toks = mx.full((n, 1), bos, dtype=mx.int32)
    done = mx.zeros((n,), dtype=mx.bool_)
    for _ in range(max_new):
        key, sub = mx.random.split(key)
        logits = model(toks)[:, -1].astype(mx.float32)
        nxt = mx.random.categorical(logits / temperature, key=sub).astype(mx.int32)
        nxt = mx.where(done, eos, nxt)
        done = done | (nxt == eos)
        toks = mx.concatenate([toks, nxt[:, None]], axis=1)
        mx.eval(toks, done)
        if bool(done.all()):
            break
    out = []
    for row in toks.tolist():
        row = row[1:]
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 160
    model = HookedTransformer.from_pretrained(MODEL)
    docs = []
    for i in range(0, n, 100):
        for ids in sample(model, min(100, n - i), max_new, seed=i):
            text = model.tokenizer.decode(ids).strip()
            if text:
                docs.append(" ".join(text.split()))
    path = os.path.join(HERE, "data", "stories_samples.txt")
    with open(path, "w") as fh:
        fh.write("\n\n".join(docs) + "\n")
    print(f"wrote {len(docs)} documents to {path}")


if __name__ == "__main__":
    main()
