"""Generation: KV cache = no cache, stories260K golden continuation, hooks while generating, batches."""

from __future__ import annotations

from hooked_mlx import HookedTransformer
from hooked_mlx.generate import sample_logits
import mlx.core as mx
import pytest
from mlx_fixtures import TINY_LLAMA, build_mlx_lm_checkpoint

GOLDEN_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396,
              267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261,
              370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267,
              414, 270, 333, 415, 426, 13, 438, 310]


@pytest.mark.parametrize("use_cache", [True, False])
def test_stories_golden_continuation(stories, use_cache):
    n = 64 if use_cache else 24
    out = stories.generate(mx.array([[1]]), n, do_sample=False, stop_at_eos=False, use_past_kv_cache=use_cache)
    assert out[0].tolist() == GOLDEN_IDS[: n + 1]
    text = stories.generate("Once upon a time", 8, do_sample=False)
    assert text == stories.to_string(GOLDEN_IDS[:13]) and text.endswith("Once upon a time, there was a little girl")


def test_cache_equals_no_cache_on_qwen3(tmp_path):
    cfg = {**TINY_LLAMA, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False}
    _, path = build_mlx_lm_checkpoint(tmp_path / "q3", cfg, seed=2)
    m = HookedTransformer.from_pretrained(path)
    prompt = mx.array([[1, 40, 41, 300, 7]])
    a = m.generate(prompt, 12, do_sample=False, stop_at_eos=False, use_past_kv_cache=True)
    b = m.generate(prompt, 12, do_sample=False, stop_at_eos=False, use_past_kv_cache=False)
    assert a.tolist() == b.tolist()
    # and the cached greedy tokens are the argmax of a full forward
    logits = m(a[:, :-1])
    assert mx.argmax(logits[0, 4:], axis=-1).tolist() == a[0, 5:].tolist()


def test_left_padded_batch_generates_like_single_prompts(stories):
    texts = ["Once upon a time", "The dog ran to the", "Lily"]
    batch = stories.generate(texts, 10, do_sample=False, stop_at_eos=False)
    singles = [stories.generate(t, 10, do_sample=False, stop_at_eos=False) for t in texts]
    assert batch == singles
    nocache = stories.generate(texts, 10, do_sample=False, stop_at_eos=False, use_past_kv_cache=False)
    assert nocache == singles


def test_steering_hook_changes_output_and_fires_each_step(stories):
    prompt = "Once upon a time"
    base = stories.generate(prompt, 12, do_sample=False, stop_at_eos=False, return_type="tokens")
    direction = stories.W_U[:, stories.to_single_token(" Tim")]
    calls = []

    def steer(act, hook):
        calls.append(act.shape[1])
        return act + 8.0 * direction.astype(act.dtype)

    steered = stories.generate(prompt, 12, do_sample=False, stop_at_eos=False, return_type="tokens",
                               fwd_hooks=[("blocks.3.hook_resid_post", steer)])
    assert steered.tolist() != base.tolist()
    assert calls == [base.shape[1] - 12] + [1] * 11  # prompt once, then one new position per step
    assert not stories.has_any_hooks
    # the same hook attached with the hooks() context works too, and the result is reproducible
    with stories.hooks([("blocks.3.hook_resid_post", steer)]):
        again = stories.generate(prompt, 12, do_sample=False, stop_at_eos=False, return_type="tokens")
    assert again.tolist() == steered.tolist()


def test_sampling_controls(stories):
    a = stories.generate("Once upon a time", 10, seed=3, temperature=1.0, return_type="tokens")
    b = stories.generate("Once upon a time", 10, seed=3, temperature=1.0, return_type="tokens")
    assert a.tolist() == b.tolist()
    greedy = stories.generate("Once upon a time", 10, do_sample=False, return_type="tokens")
    tiny_p = stories.generate("Once upon a time", 10, seed=4, top_p=1e-6, return_type="tokens")
    top1 = stories.generate("Once upon a time", 10, seed=5, top_k=1, return_type="tokens")
    assert tiny_p.tolist() == greedy.tolist() == top1.tolist()
    logits = mx.array([[0.0, 1.0, 5.0, 2.0]])
    assert sample_logits(logits, temperature=0).tolist() == [2]
    draws = {int(sample_logits(logits, top_k=2, key=mx.random.key(i))[0]) for i in range(40)}
    assert draws == {2, 3}
    # an EOS token stops a row, which then repeats it; generation ends when every row is done
    comma = 432  # the golden continuation of [BOS] reaches "," at step 5, "Once upon a time" at step 1
    out = stories.generate(mx.array([[0, 0, 0, 0, 1], [1, 403, 407, 261, 378]]), 20, do_sample=False,
                           eos_token_id=comma, attention_mask=mx.array([[0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]),
                           return_type="tokens")
    assert out[0, 5:].tolist() == GOLDEN_IDS[1:5] + [comma]
    assert out[1, 5:].tolist() == [comma] * 5
