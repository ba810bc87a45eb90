"""SAEConfig: defaults live in one place, bad values name field / value / allowed range; metric keys."""

from __future__ import annotations

import dataclasses

from hooked_mlx.sae import SAEConfig
from hooked_mlx.sae import metrics as M
from hooked_mlx.sae.config import ARCHITECTURES
import pytest


def test_defaults_are_the_dataclass_defaults():
    d = SAEConfig.defaults()
    cfg = SAEConfig()
    for f in dataclasses.fields(SAEConfig):
        assert getattr(cfg, f.name) == d[f.name]
    assert set(d) == set(SAEConfig.field_names())


def test_derived_values():
    d = SAEConfig.defaults()
    cfg = SAEConfig(d_in=64)
    assert cfg.resolved_d_sae == d["expansion_factor"] * 64
    assert cfg.resolved_aux_k == 32  # d_in / 2 (Gao / SAELens / dictionary_learning)
    assert cfg.resolved_decoder_unit_norm is True  # topk default architecture
    assert SAEConfig(architecture="relu").resolved_decoder_unit_norm is False
    assert SAEConfig(d_in=8, d_sae=100).resolved_d_sae == 100
    assert SAEConfig(training_tokens=10, train_batch_size_tokens=4, shuffle_buffer_tokens=4).total_steps == 3
    assert SAEConfig(hook_name="blocks.3.hook_resid_post").hook_layer == 3
    assert SAEConfig(hook_name="hook_embed").hook_layer is None


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("architecture", "matryoshka", "one of 'relu', 'topk', 'batchtopk', 'jumprelu', 'gated'"),
        ("k", 0, "an integer >= 1"),
        ("expansion_factor", -2, "an integer >= 1"),
        ("lr", 0.0, "a number in (0, 1.0]"),
        ("lr", float("nan"), "a finite number"),
        ("adam_beta2", 1.0, "a number in [0, 1)"),
        ("jumprelu_bandwidth", 0, "a number in (0, 1000.0]"),
        ("lr_schedule", "exp", "one of 'constant', 'cosine', 'linear'"),
        ("b_dec_init", "median", "one of 'geometric_median', 'mean', 'zeros'"),
        ("normalize_activations", "covariance_whitening", "one of 'none', 'expected_average_only_in', 'constant_norm_rescale', 'layer_norm'"),
        ("context_size", 1, "an integer >= 2"),
        ("ghost_grads", "yes", "True or False"),
        ("train_batch_size_tokens", 2.5, "an integer >= 1"),
    ],
)
def test_bad_values_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as e:
        SAEConfig(**{field: value})
    msg = str(e.value)
    assert f"SAEConfig.{field} = {value!r}" in msg
    assert allowed in msg


def test_cross_field_checks():
    with pytest.raises(ValueError, match="shuffle_buffer_tokens = 100 .*>= train_batch_size_tokens"):
        SAEConfig(shuffle_buffer_tokens=100, train_batch_size_tokens=200)
    with pytest.raises(ValueError, match="ghost_grads = True is invalid for architecture 'topk'"):
        SAEConfig(ghost_grads=True)
    with pytest.raises(ValueError, match=r"k = 65 is invalid: allowed 1 <= k <= d_sae \(64\)"):
        SAEConfig(d_in=8, d_sae=64, k=65)


def test_round_trip_and_unknown_keys():
    cfg = SAEConfig(architecture="jumprelu", d_in=16, hook_name="blocks.1.hook_resid_post", extra={"a": 1})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"Unknown SAEConfig keys \['bogus'\]"):
        SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_metric_keys_are_constants():
    assert M.L0 == "l0" and M.FVU == "fvu" and M.EXPLAINED_VARIANCE == "explained_variance"
    assert M.L0_SPARSITY == "l0_sparsity" and M.L1_MAGNITUDE == "l1_magnitude" and M.MSE == "mse"
    assert M.DEAD_FRACTION == "dead_fraction" and M.AUX_LOSS == "aux_loss"
    for keys in (M.TRAIN_KEYS, M.RECONSTRUCTION_KEYS, M.MODEL_KEYS):
        assert len(set(keys)) == len(keys)
        for k in keys:
            assert f"``{k}``" in M.__doc__ or k in M.__doc__  # every key is documented
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "gated"}


def test_architecture_records_state_what_the_code_branches_on():
    """One record per architecture (``architectures.py``); the facts the trainer, the SAE and the file writers read."""
    from hooked_mlx.sae.architectures import ARCHS, TOPK_FAMILY, TRAINABLE_ARCHITECTURES

    assert TRAINABLE_ARCHITECTURES == ("relu", "topk", "batchtopk", "jumprelu") and TOPK_FAMILY == ("topk", "batchtopk")
    facts = {n: (a.inference, a.selection, a.threshold, a.sparsity, a.saelens, a.saelens_transcoder, a.sparsify)
             for n, a in ARCHS.items()}
    assert facts == {
        "relu": ("relu", None, None, "l1", "standard", "", False),
        "topk": ("topk", "row", None, None, "topk", None, True),
        "batchtopk": ("threshold", "batch", "running", None, "jumprelu", None, False),
        "jumprelu": ("threshold", None, "learned", "l0", "jumprelu", "jumprelu_", False),
        "gated": ("gated", None, None, None, "gated", None, False),
    }
    for name in ARCHITECTURES:
        assert SAEConfig(architecture=name, d_in=8, d_sae=16, k=4).arch is ARCHS[name]


def test_every_field_has_help_and_a_cli_flag():
    import argparse

    from hooked_mlx.sae.cli import add_subcommands
    from hooked_mlx.sae.config import FIELD_HELP

    assert set(FIELD_HELP) == set(SAEConfig.field_names())
    p = argparse.ArgumentParser()
    add_subcommands(p.add_subparsers())
    text = p._subparsers._group_actions[0].choices["train-sae"].format_help()
    for name in SAEConfig.field_names():
        if name not in ("d_in", "hook_name", "extra", "d_out", "hook_name_out", "skip_connection"):
            assert "--" + name.replace("_", "-") in text
