"""The public API's jaxtyping annotations (hooked_mlx/shapes.py) are what the functions return: each annotated
function is called on stories260K / a small SAE and its result checked with ``isinstance`` against the
annotation its signature names (rank, named axes and dtype)."""

from __future__ import annotations

import typing

from hooked_mlx import ActivationCache, HookedTransformer
from hooked_mlx import patching as pt
from hooked_mlx.sae import SAE, SAEConfig
from hooked_mlx.shapes import (
    ComponentAttrs,
    Logits,
    Loss,
    PatchResult,
    ResidStack,
    Residual,
    SAEInput,
    SAELatents,
    SparseIndices,
    SparseValues,
)
import mlx.core as mx
import pytest


def _returns(fn) -> tuple:
    """The annotations a function's return type names (the members of a union, tuples flattened)."""
    hint = typing.get_type_hints(fn)["return"]
    out = []
    for t in typing.get_args(hint) or (hint,):
        out += list(typing.get_args(t)) if typing.get_origin(t) is tuple else [t]
    return tuple(out)


def test_forward_returns_its_annotations(stories):
    toks = stories.to_tokens(["Once upon a time", "The cat sat on"])
    names = _returns(HookedTransformer.forward)
    assert {Logits, Loss, Residual} <= set(names)
    assert isinstance(stories(toks), Logits)
    assert isinstance(stories(toks, return_type="loss"), Loss)
    assert isinstance(stories(toks, return_type="loss", loss_per_token=True), Loss)
    assert isinstance(stories(toks, stop_at_layer=2), Residual)
    assert not isinstance(stories(toks)[0], Logits)  # the check can fail: [pos, d_vocab] is not [batch, pos, d_vocab]
    assert not isinstance(toks, Logits)  # integer ids are not float logits


def test_cache_methods_return_their_annotations(stories):
    toks = stories.to_tokens(["Once upon a time", "The cat sat on"])
    _, cache = stories.run_with_cache(toks)
    for fn, call in [
        (ActivationCache.accumulated_resid, lambda: cache.accumulated_resid()),
        (ActivationCache.decompose_resid, lambda: cache.decompose_resid()),
        (ActivationCache.stack_head_results, lambda: cache.stack_head_results()),
        (ActivationCache.stack_neuron_results, lambda: cache.stack_neuron_results(1)),
        (ActivationCache.get_full_resid_decomposition, lambda: cache.get_full_resid_decomposition()),
    ]:
        assert ResidStack in _returns(fn), fn.__name__
        out = call()
        assert isinstance(out, ResidStack), (fn.__name__, out.shape)
    stack = cache.accumulated_resid(pos_slice=-1)  # [component, batch, d_model]
    assert ResidStack in _returns(ActivationCache.apply_ln_to_stack)
    assert isinstance(cache.apply_ln_to_stack(stack, -1, pos_slice=-1), ResidStack)
    assert ComponentAttrs in _returns(ActivationCache.logit_attrs)
    attrs = cache.logit_attrs(stack, toks[:, -1], pos_slice=-1)
    assert isinstance(attrs, ComponentAttrs), attrs.shape
    # a cache without the batch axis ([pos, d_model] per component): "*batch_pos" covers it
    _, one = stories.run_with_cache(toks[:1], remove_batch_dim=True)
    assert isinstance(one.accumulated_resid(), ResidStack)


def test_patching_returns_its_annotation(stories):
    clean = stories.to_tokens("Once upon a time there was a little girl")
    corrupt = mx.concatenate([clean[:, :3], mx.array([[42]], dtype=clean.dtype), clean[:, 4:]], axis=1)
    _, cache = stories.run_with_cache(clean)
    out = pt.get_act_patch_resid_pre(stories, corrupt, cache, lambda logits: logits[:, -1, 5].mean())
    assert PatchResult in _returns(pt.get_act_patch_resid_pre)
    assert isinstance(out, PatchResult) and out.shape == (stories.cfg.n_layers, clean.shape[1])


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_sae_returns_its_annotations(arch):
    sae = SAE(SAEConfig(architecture=arch, d_in=16, d_sae=48, k=4))
    x = mx.random.normal((3, 5, 16), key=mx.random.key(0))
    assert _returns(SAE.encode) == (SAELatents,) and _returns(SAE.decode) == (SAEInput,)
    f = sae.encode(x)
    assert isinstance(f, SAELatents) and f.shape == (3, 5, 48)
    assert isinstance(sae.decode(f), SAEInput) and isinstance(sae(x), SAEInput)
    assert _returns(SAE.encode_sparse) == (SparseValues, SparseIndices)
    if arch == "topk":
        vals, idx = sae.encode_sparse(x.reshape(-1, 16))
        assert isinstance(vals, SparseValues) and isinstance(idx, SparseIndices)
