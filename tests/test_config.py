"""HookedConfig's choice fields are Literal types, checked when a config is built."""

from __future__ import annotations

import typing

import hooked_mlx  # noqa: F401  (BLAS before mlx.core)
from hooked_mlx.config import HookedConfig
import pytest


def _cfg(**kw):
    return HookedConfig("llama", 2, 8, 2, 4, 16, 32, **kw)


@pytest.mark.parametrize("field,value,allowed", [
    ("normalization", "rmsnorm", "'rms'"), ("qk_norm", "per_head", "'head'"), ("positional", "alibi", "'rotary'"),
    ("dtype", "fp16", "'float16'"), ("layer_types", ["full_attention", "local"], "'sliding_attention'"),
])
def test_choice_fields_refuse_other_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"HookedConfig\.{field} = .* is not one of .*{allowed}"):
        _cfg(**{field: value})


def test_choice_fields_are_literals_and_defaults_pass():
    hints = typing.get_type_hints(HookedConfig)
    assert typing.get_origin(hints["normalization"]) is typing.Literal
    c = _cfg(qk_norm="full", positional="learned", layer_types=["sliding_attention", "full_attention"])
    assert HookedConfig.from_dict(c.to_dict()) == c
