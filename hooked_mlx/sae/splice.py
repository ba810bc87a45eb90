"""SAEs spliced into the forward pass: SAELens's ``HookedSAETransformer`` on hooked_mlx.

``HookedSAETransformer`` is a ``HookedTransformer`` that can run with SAEs attached at their hooks::

    model = HookedSAETransformer.from_pretrained("../shared/models/stories260K")
    logits = model.run_with_saes(tokens, saes=[sae])                     # the SAE's reconstruction replaces the activation
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])   # cache["blocks.2.hook_resid_post.hook_sae_acts_post"]
    with model.saes([sae], use_error_term=True):                         # output unchanged; latents hookable
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_post.hook_sae_acts_post", fn)])
    model.add_sae(sae); ...; model.reset_saes()

Each attached SAE adds SAELens's hook points under its hook name (``{hook}.hook_sae_input``, ``.hook_sae_acts_pre``,
``.hook_sae_acts_post``, ``.hook_sae_recons``, ``.hook_sae_error``, ``.hook_sae_output``), so ``run_with_hooks``,
``run_with_cache``, the interventions and the patching functions work on latents. With ``use_error_term=True``
the output is the activation itself plus (reconstruction - clean reconstruction) plus (error - clean error): exactly
the model's output when nothing is changed inside the SAE, and the changed reconstruction plus the error
otherwise. SAEs on attention ``hook_z`` ([B, P, H, d_head]) read the heads flattened (d_in = H * d_head), as
SAELens does. A transcoder (``cfg.hook_name_out``) replaces its output hook with its prediction from its input
hook, its hook points under the output hook. A model with no SAE attached runs its usual (compiled) path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import mlx.core as mx

from ..hooks import HookPoint
from ..model import HookedTransformer
from ..names import SAE_HOOKS, hook_order, hook_spec
from .sae import SAE


class SplicedSAE:
    """One SAE at one hook: its hook points, and the function that replaces the activation.

    A transcoder (``sae.cfg.is_transcoder``) is spliced at its output hook (``hook_name``, here the one it
    replaces); ``record`` runs at its input hook and keeps the activation it reads there (the input hook fires
    first in the forward pass)."""

    def __init__(self, sae: SAE, hook_name: str, use_error_term: bool, flatten_heads: bool,
                 input_hook: str | None = None):
        self.sae, self.hook_name, self.use_error_term, self.flatten_heads = sae, hook_name, use_error_term, flatten_heads
        self.input_hook = input_hook
        self._input: mx.array | None = None
        self.points = {}
        for local in SAE_HOOKS:
            hp = HookPoint()
            object.__setattr__(hp, "name", f"{hook_name}.{local}")
            self.points[local] = hp

    def record(self, act: mx.array, hook=None) -> mx.array:
        """At a transcoder's input hook: keep what it reads; the activation passes unchanged."""
        self._input = act
        return act

    def __call__(self, act: mx.array, hook=None) -> mx.array:
        shape, dtype = act.shape, act.dtype
        target = act.astype(mx.float32)
        if self.input_hook is not None:
            if self._input is None:
                raise RuntimeError(f"The transcoder at {self.hook_name!r} found no input: its input hook "
                                   f"{self.input_hook!r} did not run before it (a forward that starts past it?).")
            x, self._input = self._input.astype(mx.float32), None
        else:
            x = act.reshape(*shape[:-2], shape[-2] * shape[-1]) if self.flatten_heads else act
            x = x.astype(mx.float32)
            target = x
        sae, p = self.sae, self.points
        # each stage is recomputed only where a hook replaced its input, so that an unchanged SAE gives the
        # clean reconstruction itself (bit-for-bit: BLAS results may depend on buffer alignment)
        h = p["hook_sae_input"](x)
        pre0 = sae.encode_pre(x)
        pre = p["hook_sae_acts_pre"](pre0 if h is x else sae.encode_pre(h))
        post0 = sae.activation(pre0)
        post = p["hook_sae_acts_post"](post0 if pre is pre0 else sae.activation(pre))
        # (a skip transcoder's skip term reads the input: x for the clean output, h for the changed one)
        clean = sae.predict(post0, x)
        rec = p["hook_sae_recons"](clean if post is post0 else sae.predict(post, h))
        if self.use_error_term:
            clean_sg = mx.stop_gradient(clean)
            err0 = target - clean_sg
            err = p["hook_sae_error"](err0)
            # == the activation exactly when nothing inside the SAE changed; else the changed reconstruction
            # plus the error
            out = target + (rec - clean_sg) + (err - err0)
        else:
            out = rec
        out = p["hook_sae_output"](out)
        return out.reshape(shape).astype(dtype)


def _width(model: HookedTransformer, name: str) -> tuple[int | None, bool]:
    """(the width an SAE at ``name`` reads, whether attention heads are flattened into it)."""
    c = model.cfg
    axes = hook_spec(name).axes
    sizes = {"d_model": c.d_model, "d_mlp": c.d_mlp, "d_vocab": c.d_vocab}
    if axes[-1] == "d_head" and axes[-2] in ("head", "kv_head"):
        heads = c.n_heads if axes[-2] == "head" else c.n_key_value_heads
        return heads * c.d_head, True
    return sizes.get(axes[-1]), False


class HookedSAETransformer(HookedTransformer):
    """A ``HookedTransformer`` with SAELens's SAE-splicing API (``run_with_saes``, ``run_with_cache_with_saes``,
    ``saes``, ``add_sae``, ``reset_saes``)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        object.__setattr__(self, "_spliced", {})  # hook name -> SplicedSAE (outside the module tree)

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """The attached SAEs by hook name."""
        return {n: s.sae for n, s in self._spliced.items()}

    def add_sae(self, sae: SAE, use_error_term: bool = False, hook_name: str | None = None) -> str:
        """Attach ``sae`` at ``hook_name`` (default: its ``cfg.hook_name``), replacing one already there;
        returns the hook's full name. A transcoder reads ``cfg.hook_name`` and replaces ``cfg.hook_name_out``
        (``hook_name`` then names the output hook); its hook points live under the output hook."""
        transcoder = sae.cfg.is_transcoder
        name = hook_name or (sae.cfg.hook_name_out if transcoder else sae.cfg.hook_name)
        if not name:
            raise ValueError(f"This {'transcoder' if transcoder else 'SAE'} has no "
                             f"{'hook_name_out' if transcoder else 'hook_name'} (empty in sae.cfg): pass hook_name=... .")
        name = self.resolve_hook_names(name)[0]
        in_name = None
        if transcoder:
            if not sae.cfg.hook_name:
                raise ValueError("This transcoder has no input hook (sae.cfg.hook_name is empty); set it.")
            in_name = self.resolve_hook_names(sae.cfg.hook_name)[0]
            if not hook_order(in_name) < hook_order(name):
                raise ValueError(f"A transcoder reading {in_name!r} cannot write {name!r}: the output hook must "
                                 f"come later in the forward pass.")
            self._check_width(in_name, sae.d_in, "reads d_in")
            self._check_width(name, sae.d_out, "writes d_out")
            flatten = False
        else:
            flatten = self._check_width(name, sae.d_in, "reads d_in")
        if name in self._spliced:
            self._detach(name)
        splice = SplicedSAE(sae, name, use_error_term, flatten, input_hook=in_name)
        if in_name is not None:
            self.hook_dict[in_name].add_hook(splice.record, level=-1, is_permanent=True)  # after user hooks
        self.hook_dict[name].add_hook(splice, level=-1, is_permanent=True, prepend=True)  # before user hooks
        self._spliced[name] = splice
        self.hook_dict.update({hp.name: hp for hp in splice.points.values()})
        self._sort_hook_dict()
        return name

    def _check_width(self, name: str, width: int, what: str) -> bool:
        """Whether the hook's heads are flattened for the SAE; raises if the widths differ."""
        have, flatten = _width(self, name)
        if have is not None and have != width:
            raise ValueError(
                f"Cannot attach at {name!r}: the SAE {what} = {width}, but that hook carries {have} "
                f"features{' (heads flattened)' if flatten else ''}. Attach it at a hook of width {width}, or use "
                f"the SAE trained for this model and hook.")
        return flatten

    def _detach(self, name: str) -> None:
        splice = self._spliced.pop(name)
        hp = self.hook_dict[name]
        object.__setattr__(hp, "_hooks", [e for e in hp._hooks if e[0] is not splice])
        if splice.input_hook is not None:
            ip = self.hook_dict[splice.input_hook]
            object.__setattr__(ip, "_hooks", [e for e in ip._hooks if e[0] != splice.record])
        for p in splice.points.values():
            self.hook_dict.pop(p.name, None)

    def reset_saes(self, hook_names: Sequence[str] | None = None) -> None:
        """Detach the SAEs at ``hook_names`` (default: all)."""
        names = list(self._spliced) if hook_names is None else [self.resolve_hook_names(n)[0] for n in hook_names]
        for name in names:
            if name in self._spliced:
                self._detach(name)

    @contextlib.contextmanager
    def saes(self, saes: Iterable[SAE] = (), use_error_term: bool = False, reset_saes_end: bool = True):
        """Context: ``saes`` attached inside, detached on exit (SAEs attached before stay)."""
        before = dict(self._spliced)
        added = []
        try:
            for sae in saes:
                added.append(self.add_sae(sae, use_error_term=use_error_term))
            yield self
        finally:
            if reset_saes_end:
                for name in added:
                    if name in self._spliced:
                        self._detach(name)
                for name, splice in before.items():  # put back an SAE that one of these replaced
                    if name not in self._spliced:
                        self.add_sae(splice.sae, splice.use_error_term, name)

    def run_with_saes(self, *args, saes: Iterable[SAE] = (), use_error_term: bool = False, **kwargs):
        """Forward with ``saes`` spliced in for this call only."""
        with self.saes(saes, use_error_term=use_error_term):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(self, *args, saes: Iterable[SAE] = (), use_error_term: bool = False, **kwargs):
        """``run_with_cache`` with ``saes`` spliced in for this call only; the cache holds the SAE hooks too."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(*args, **kwargs)

    def run_with_hooks_with_saes(self, *args, saes: Iterable[SAE] = (), use_error_term: bool = False, **kwargs):
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_hooks(*args, **kwargs)
