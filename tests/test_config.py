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


def test_config_json_unknown_keys_ignored_missing_keys_named(stories_path, tmp_path):
    """A config.json with keys hooked_mlx does not know loads as before; one that lacks a key the family needs
    fails with the file, the family and the key in the message."""
    import json
    import shutil

    from hooked_mlx import HookedTransformer

    for name in ("extra", "missing"):
        d = tmp_path / name
        shutil.copytree(stories_path, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["a_key_from_the_future"] = {"x": 1}
        if name == "missing":
            del cfg["hidden_size"]
        (d / "config.json").write_text(json.dumps(cfg))
    ref = HookedTransformer.from_pretrained(stories_path)
    assert HookedTransformer.from_pretrained(tmp_path / "extra").cfg == ref.cfg
    with pytest.raises(ValueError, match=r"config of .*missing \(llama\) cannot be read: .*'hidden_size'"):
        HookedTransformer.from_pretrained(tmp_path / "missing")
