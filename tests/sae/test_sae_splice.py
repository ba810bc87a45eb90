"""SAEs spliced into the forward (HookedSAETransformer): SAELens's hook points, the error term, latents that
run_with_hooks / run_with_cache / interventions reach, refusals, and the fast path once detached."""

from __future__ import annotations

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.patching import zero_ablate
from hooked_mlx.sae import SAE, HookedSAETransformer, SAEConfig
import mlx.core as mx
import numpy as np
import pytest
from tolerance import assert_close

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def model(stories_path):
    return HookedSAETransformer.from_pretrained(stories_path)


def _sae(d_in=64, hook=HOOK, arch="topk", seed=0):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=256, architecture=arch, k=8, hook_name=hook), key=mx.random.key(seed))
    sae.b_enc = 0.1 * mx.ones((256,))  # some latents fire on every token
    return sae


def test_error_term_leaves_the_output_exactly_unchanged_and_caches_latents(model):
    toks = model.to_tokens(["Once upon a time", "The cat sat on the mat"])
    sae = _sae()
    # caching every hook runs attention's manual path (the patterns are hooked): compare like with like
    base, base_cache = model.run_with_cache(toks)
    out, cache = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=True)
    assert mx.array_equal(out, base).item()
    assert mx.array_equal(model.run_with_saes(toks, saes=[sae], use_error_term=True), model(toks)).item()
    x = base_cache[HOOK]
    assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(x), 1e-6)
    assert_close(cache[f"{HOOK}.hook_sae_recons"], sae.decode(sae.encode(x)), 1e-6)
    assert_close(cache[f"{HOOK}.hook_sae_error"], x - sae.decode(sae.encode(x)), 1e-6)
    with model.saes([sae]):
        names = list(model.hook_dict)
        assert names.index(HOOK) < names.index(f"{HOOK}.hook_sae_input") < names.index(
            f"{HOOK}.hook_sae_acts_post") < names.index("blocks.3.hook_resid_pre")
    assert not model.acts_to_saes and not [n for n in model.hook_dict if "hook_sae" in n]  # detached after


def test_without_error_term_the_reconstruction_replaces_the_activation(model):
    toks = model.to_tokens("Once upon a time there was")
    sae = _sae()
    want = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: sae(a).astype(a.dtype))])
    assert_close(model.run_with_saes(toks, saes=[sae]), want, 1e-5)
    assert float(mx.abs(want - model(toks)).max()) > 1e-2


def test_patching_a_latent_with_the_error_term(model):
    toks = model.to_tokens("Once upon a time there was")
    sae = _sae()
    _, c = model.run_with_cache(toks, names_filter=HOOK)
    x = c[HOOK]
    f = sae.encode(x)
    latent = int(mx.argmax(f[0, -1]).item())
    assert float(f[0, -1, latent]) > 0
    with model.saes([sae], use_error_term=True):
        got = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_ablate(index=(slice(None), latent)))])
    f2 = f.at[..., latent].multiply(0.0)
    patched = x + (sae.decode(f2) - sae.decode(f))
    want = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: patched.astype(a.dtype))])
    assert_close(got, want, 1e-5)
    assert float(mx.abs(got - model(toks)).max()) > 0


def test_gradients_reach_latents(model):
    toks = model.to_tokens("Once upon a time there was")
    _, cache = model.run_with_cache_with_saes(toks, saes=[_sae()], use_error_term=True, incl_bwd=True,
                                              return_type="loss", names_filter=lambda n: "hook_sae_acts_post" in n)
    g = np.array(cache[f"{HOOK}.hook_sae_acts_post_grad"])
    assert g.shape == (1, toks.shape[1], 256) and np.abs(g).max() > 0


def test_refusals_and_context_nesting(model):
    with pytest.raises(ValueError, match="reads d_in = 32, but that hook carries 64"):
        model.add_sae(_sae(d_in=32))
    assert not model.acts_to_saes and not model.has_any_hooks
    with pytest.raises(ValueError, match="no hook_name"):
        model.add_sae(_sae(hook=""))
    a, b = _sae(seed=1), _sae(seed=2)
    model.add_sae(a)
    with model.saes([b]):
        assert model.acts_to_saes[HOOK] is b
    assert model.acts_to_saes[HOOK] is a  # restored
    model.reset_saes()
    assert not model.acts_to_saes and not model.has_any_hooks  # the compiled fast path again


def test_hook_z_sae_reads_flattened_heads(model):
    c = model.cfg
    name = "blocks.1.attn.hook_z"
    sae = _sae(d_in=c.n_heads * c.d_head, hook=name)
    toks = model.to_tokens("Once upon a time")
    _, cache = model.run_with_cache(toks, names_filter=name)
    z = cache[name]
    _, sc = model.run_with_cache_with_saes(toks, saes=[sae], use_error_term=True)
    assert mx.array_equal(model.run_with_saes(toks, saes=[sae], use_error_term=True), model(toks)).item()
    assert_close(sc[f"{name}.hook_sae_acts_post"], sae.encode(z.reshape(*z.shape[:2], -1)), 1e-6)


@pytest.mark.parametrize("arch, norm", [("gated", "none"), ("relu", "layer_norm"), ("topk", "constant_norm_rescale")])
def test_loaded_only_architectures_and_run_time_norms_splice(model, arch, norm):
    """Gated SAEs and SAELens's run-time normalisations splice like any SAE: exact with the error term, and
    without it the SAE's own output (normalised per token and mapped back) replaces the activation."""
    toks = model.to_tokens("Once upon a time there was")
    cfg = SAEConfig(d_in=64, d_sae=256, architecture=arch, k=8, hook_name=HOOK, normalize_activations=norm)
    sae = SAE(cfg, key=mx.random.key(3))
    if arch == "gated":
        sae.b_gate = 0.2 * mx.ones((256,))
        sae.r_mag = 0.1 * mx.random.normal((256,), key=mx.random.key(4))
    assert (model.run_with_saes(toks, saes=[sae], use_error_term=True) == model(toks)).all().item()
    want = model.run_with_hooks(toks, fwd_hooks=[(HOOK, lambda a, hook: sae(a).astype(a.dtype))])
    assert_close(model.run_with_saes(toks, saes=[sae]), want, 1e-5)
    assert float(mx.abs(want - model(toks)).max()) > 1e-2
    _, cache = model.run_with_cache_with_saes(toks, saes=[sae], names_filter=HOOK + ".hook_sae_acts_post")
    f = cache[HOOK + ".hook_sae_acts_post"]
    assert 0 < float(mx.mean((f > 0).astype(mx.float32))) < 1
