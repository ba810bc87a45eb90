"""Activation sources: streaming from stories260K (BOS / pad excluded, several hooks from one forward,
fixed-size shuffle buffer, exact resume), harvest + memory-mapped shards, corpora formats."""

from __future__ import annotations

import json

from hooked_mlx.sae import ActivationStore, SAEConfig, ShardSource, harvest, open_corpus
from hooked_mlx.sae.store import ContextBuilder, stop_layer_for
import mlx.core as mx
import numpy as np
import pytest
from sae_fixtures import HOOK
from tolerance import assert_close

DOCS = ["Once upon a time, there was a little girl.", "Tom had a red ball. He liked it.", "The sun was hot."]


def test_contexts_pack_with_bos_and_mask_special_tokens(stories):
    tok = stories.tokenizer
    b = ContextBuilder(open_corpus(DOCS), tok, 8, bos=1, pad=2, cycle=False)
    toks, mask = b.next_block(100)
    stream = []
    for d in DOCS:
        stream += [1] + tok.encode(d, add_special_tokens=False)
    body = [t for t in stream if t != 1]
    assert (toks[:, 0] == 1).all()  # every context starts with BOS
    got = [t for row, m in zip(toks.tolist(), mask.tolist()) for t, keep in zip(row, m) if keep]
    assert got == body  # every real token exactly once, in order; BOS and pads masked out
    assert not mask[toks == 1].any()
    unpacked = ContextBuilder(open_corpus(DOCS), tok, 6, bos=1, pad=2, packing=False, cycle=False)
    t2, m2 = unpacked.next_block(10)
    assert t2.shape == (3, 6)
    assert m2.sum(1).tolist() == [min(len(tok.encode(d, add_special_tokens=False)), 5) for d in DOCS]


def test_store_rows_are_the_hook_activations_at_real_tokens(stories):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    cfg = SAEConfig(context_size=16, store_batch_size_prompts=4, train_batch_size_tokens=8, shuffle_buffer_tokens=8)
    store = ActivationStore(stories, hooks, DOCS, cfg)
    assert store.stop_at_layer == 2
    assert store.d_in(hooks[0]) == 64 and store.d_in(hooks[1]) == 64
    b = ContextBuilder(open_corpus(DOCS), stories.tokenizer, 16, bos=1, pad=stories.pad_token_id, cycle=False)
    toks, mask = b.next_block(4)
    _, cache = stories.run_with_cache(mx.array(toks), names_filter=hooks)
    rows = list(store.iter_activations(10_000))
    for h in hooks:
        got = np.concatenate([r[h] for r in rows])
        ref = np.array(cache[h]).reshape(-1, 64)[mask.reshape(-1)]
        assert_close(got, ref, tol=1e-5)
    assert store.tokens_processed == int(mask.sum())


def test_shuffle_buffer_is_fixed_size_and_resume_is_exact(stories, corpus_docs):
    cfg = SAEConfig(context_size=32, store_batch_size_prompts=8, train_batch_size_tokens=64,
                    shuffle_buffer_tokens=512, seed=3)
    hooks = [HOOK, "blocks.0.hook_resid_post"]
    store = ActivationStore(stories, hooks, corpus_docs[:40], cfg)
    first = [store.next_batch() for _ in range(5)]
    assert all(b[HOOK].shape == (64, 64) for b in first)
    shapes = {h: v.shape for h, v in store.buffers.items()}
    assert shapes == {h: (512, 64) for h in hooks}
    arrays, meta = store.state_dict()
    json.dumps(meta)  # the metadata is JSON
    after = [store.next_batch() for _ in range(6)]
    assert {h: v.shape for h, v in store.buffers.items()} == shapes  # memory stays flat
    other = ActivationStore(stories, hooks, corpus_docs[:40], cfg)
    other.load_state_dict(arrays, meta)
    again = [other.next_batch() for _ in range(6)]
    for a, b in zip(after, again):
        for h in hooks:
            assert np.array_equal(np.array(a[h]), np.array(b[h]))
    # batches are shuffled across contexts: consecutive rows do not come from consecutive positions
    fresh = ActivationStore(stories, hooks, corpus_docs[:40], cfg.replace(shuffle_buffer_tokens=64))
    ordered = np.concatenate([r[HOOK] for r in fresh.iter_activations(64)][:1])
    assert not np.array_equal(np.array(first[0][HOOK]), ordered[:64])


def test_harvest_and_memory_mapped_shards(stories, tmp_path):
    cfg = SAEConfig(context_size=16, store_batch_size_prompts=2)
    hooks = [HOOK, "blocks.0.hook_attn_out"]
    man = harvest(stories, hooks, DOCS * 6, str(tmp_path), 150, cfg=cfg, shard_tokens=64, progress=False)
    assert man["n_tokens"] == 150 and [s["n_tokens"] for s in man["shards"]] == [64, 64, 22]
    assert man["d_in"] == {HOOK: 64, "blocks.0.hook_attn_out": 64}
    src = ShardSource(str(tmp_path), batch_size=50, seed=0)
    assert all(isinstance(s, np.memmap) for s in src.segments[HOOK])
    store = ActivationStore(stories, hooks, DOCS * 6, cfg)
    ref = np.concatenate([r[HOOK] for r in store.iter_activations(1000)])[:150]
    np.testing.assert_array_equal(np.concatenate(src.segments[HOOK]), ref)
    seen = np.concatenate([np.array(src.next_batch()[HOOK]) for _ in range(3)])  # one epoch
    np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(ref, axis=0))
    half = harvest(stories, HOOK, DOCS * 6, str(tmp_path / "f16"), 100, cfg=cfg, progress=False, dtype="float16")
    assert half["dtype"] == "float16"
    h16 = ShardSource(str(tmp_path / "f16"), batch_size=100, seed=0)
    assert h16.segments[HOOK][0].dtype == np.float16
    np.testing.assert_allclose(np.concatenate(h16.segments[HOOK]).astype(np.float32), ref[:100], rtol=2e-3, atol=2e-3)
    assert np.array(h16.next_batch()[HOOK]).dtype == np.float32
    with pytest.raises(ValueError, match="were not harvested"):
        ShardSource(str(tmp_path), 10, hook_names=["blocks.4.hook_resid_post"])
    with pytest.raises(FileNotFoundError, match="hooked-mlx harvest"):
        ShardSource(str(tmp_path / "nope"), 10)


def test_corpus_formats_and_errors(tmp_path, stories):
    (tmp_path / "a.txt").write_text("first doc\nsame doc\n\nsecond doc\n")
    assert list(open_corpus(str(tmp_path / "a.txt"))()) == ["first doc\nsame doc", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n')
    assert list(open_corpus(str(tmp_path / "b.jsonl"))()) == ["x y", "z"]
    corpus = open_corpus(str(tmp_path / "b.jsonl"))  # iterable as well, from the start every time
    assert list(corpus) == list(corpus) == ["x y", "z"]
    assert [d for d in open_corpus(["p", "q"])] == ["p", "q"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="has no 'text' field"):
        list(open_corpus(str(tmp_path / "c.jsonl"))())
    with pytest.raises(FileNotFoundError):
        open_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(TypeError, match="Unsupported corpus"):
        open_corpus(42)
    with pytest.raises(ValueError, match="Unknown hook name 'blocks.2.hook_resid_pots'"):
        ActivationStore(stories, "blocks.2.hook_resid_pots", DOCS)
    assert stop_layer_for(stories, ["blocks.4.hook_resid_post"]) is None
    assert stop_layer_for(stories, ["hook_embed"]) == 1


def test_datasets_objects_and_missing_package(monkeypatch):
    class FakeDataset:  # stands in for datasets.Dataset (rows are dicts)
        def __iter__(self):
            return iter([{"text": "a b"}, {"text": "c"}])

    FakeDataset.__module__ = "datasets.arrow_dataset"
    assert list(open_corpus(FakeDataset())()) == ["a b", "c"]
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        open_corpus("hf:roneneldan/TinyStories")


def test_streaming_training_resumes_exactly(stories, corpus_docs, tmp_path):
    from hooked_mlx.sae import train_saes
    from mlx.utils import tree_flatten

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cfgs = [SAEConfig(architecture=a, hook_name=h, d_sae=128, k=8, train_batch_size_tokens=128,
                      shuffle_buffer_tokens=384, context_size=32, store_batch_size_prompts=4, training_tokens=12 * 128,
                      checkpoint_every_steps=4, log_every_steps=2, norm_estimation_tokens=256)
            for a, h in zip(("topk", "batchtopk"), hooks)]

    def store():
        return ActivationStore(stories, hooks, corpus_docs[:30], cfgs[0])

    full = train_saes(cfgs, store(), progress=False)

    class Stop(Exception):
        pass

    def stop(step, mets):
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train_saes(cfgs, store(), checkpoint_path=str(tmp_path), callback=stop, progress=False)
    resumed = train_saes(cfgs, store(), checkpoint_path=str(tmp_path), resume=True, progress=False)
    for h in hooks:
        for (k, a), (_, b) in zip(tree_flatten(full[h].parameters()), tree_flatten(resumed[h].parameters())):
            assert np.array_equal(np.array(a), np.array(b)), (h, k)
