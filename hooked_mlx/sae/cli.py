"""``hooked-mlx train-sae``, ``hooked-mlx train-transcoders`` and ``hooked-mlx harvest`` (``add_subcommands``).

Every ``SAEConfig`` field is a flag of ``train-sae`` (``--expansion-factor``, ``--lr`` ...), generated from
the dataclass, so defaults and help live in one place; ``--arch``, ``--expansion`` and ``--tokens`` are
short aliases of ``--architecture``, ``--expansion-factor`` and ``--training-tokens``, and the model may
be given as the first argument. Examples::

    hooked-mlx train-sae ../shared/models/stories260K --hook blocks.2.hook_resid_post --arch topk --k 32 \\
        --expansion 16 --data stories.txt --tokens 1000000 --out sae/ [--resume]
    hooked-mlx harvest --model ../shared/models/stories260K --hook blocks.2.hook_resid_post \\
        --data stories.txt --tokens 1000000 --out acts/
    hooked-mlx train-sae --data acts/ --architecture topk --k 16 --expansion-factor 16 --out sae/
    hooked-mlx train-sae --model ../shared/models/stories260K --hook blocks.1.hook_resid_post \\
        --hook blocks.3.hook_resid_post --data stories.txt --training-tokens 2000000 --out saes/ \\
        --checkpoint-dir ckpt/ --checkpoint-every-steps 100 --export saelens
    hooked-mlx train-transcoders ../shared/models/stories260K --hook blocks.1.ln2.hook_normalized \
        --skip-connection --arch relu --data stories.txt --tokens 1000000 --out tc/ --export saelens

``train-transcoders`` takes the same flags plus ``--hook-out`` (the hook each ``--hook`` predicts; default: the
block's ``hook_mlp_out`` for an MLP input) and ``--skip-connection``.

Data-parallel (one process per rank; see hooked_mlx/sae/distributed.py)::

    mlx.launch --backend ring -n 2 -- hooked-mlx train-sae ...        # CPU processes (NCCL on CUDA GPUs)
    mlx.launch --backend ring -n 2 -- hooked-mlx harvest ...          # disjoint per-rank shards
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from .architectures import ARCHS, TRAINABLE_ARCHITECTURES
from .config import (
    B_DEC_INITS,
    DTYPES,
    FIELD_HELP,
    GRAD_REDUCE_DTYPES,
    KERNELS,
    LR_SCHEDULES,
    NORMALIZATIONS,
    RUN_TIME_NORMS,
    SAEConfig,
)

#: SAEConfig fields without a generated flag (set from the data; train-transcoders has --hook-out and --skip-connection)
_SKIP = {"d_in", "hook_name", "extra", "d_out", "hook_name_out", "skip_connection"}
#: short aliases of SAEConfig flags (the form of the train-sae examples)
_ALIASES = {"architecture": "--arch", "expansion_factor": "--expansion", "training_tokens": "--tokens"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    defaults = SAEConfig.defaults()
    hints = typing.get_type_hints(SAEConfig)
    # (the trainer's choices: a gated SAE or a run-time normalisation comes only from a loaded file)
    choices = {"architecture": list(TRAINABLE_ARCHITECTURES), "lr_schedule": list(LR_SCHEDULES), "b_dec_init":
               list(B_DEC_INITS), "normalize_activations": [n for n in NORMALIZATIONS if n not in RUN_TIME_NORMS],
               "dtype": list(DTYPES),
               "kernels": list(KERNELS), "grad_reduce_dtype": list(GRAD_REDUCE_DTYPES)}
    g = p.add_argument_group("SAEConfig fields (defaults from hooked_mlx.sae.SAEConfig)")
    for f in dataclasses.fields(SAEConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag] + ([_ALIASES[f.name]] if f.name in _ALIASES else [])
        default = defaults[f.name]
        text = f"{FIELD_HELP[f.name]} (default: {default!r})"
        t = hints[f.name]
        if f.name == "decoder_unit_norm":
            g.add_argument(*flags, choices=["auto", "true", "false"], default=None, help=text)
        elif t is bool:
            g.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name in choices:
            g.add_argument(*flags, choices=choices[f.name], default=None, help=text)
        else:
            typ = int if t is int else float if t is float else str
            g.add_argument(*flags, type=typ, default=None, help=text)


def config_from_args(args, hook: str) -> SAEConfig:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SAEConfig):
        if f.name in _SKIP:
            continue
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "decoder_unit_norm":
            v = None if v == "auto" else v == "true"
        values[f.name] = v
    return SAEConfig(hook_name=hook, **values)


def _transcoder_pairs(args) -> list[tuple[str, str]]:
    """train-transcoders: (input hook, output hook) pairs from --hook / --hook-out (each output defaults to the
    hook_mlp_out of the block whose MLP input the input hook is)."""
    from .files import transcoder_output_hook

    ins = _expand_hooks(args.hook)
    outs = _expand_hooks(args.hook_out) if args.hook_out else [transcoder_output_hook(h) for h in ins]
    if len(outs) != len(ins):
        raise ValueError(f"train-transcoders pairs each --hook with a --hook-out: got {len(ins)} --hook and "
                         f"{len(outs)} --hook-out.")
    missing = [h for h, o in zip(ins, outs) if not o]
    if missing:
        raise ValueError(f"No output hook for {missing}: pass --hook-out (by default an MLP input, such as "
                         f"blocks.L.ln2.hook_normalized, writes blocks.L.hook_mlp_out).")
    return list(zip(ins, outs))


def _configs(args, hooks: list[str]) -> list[SAEConfig]:
    """One config per --hook (train-transcoders: per pair, with its output hook and skip connection)."""
    if not args.transcoders:
        return [config_from_args(args, h) for h in hooks]
    return [config_from_args(args, h).replace(hook_name_out=o, skip_connection=args.skip_connection,
                                               apply_b_dec_to_input=False) for h, o in _transcoder_pairs(args)]


def _source_hooks(args, hooks: list[str]) -> list[str]:
    """The hooks the activation source must yield: the inputs, and train-transcoders' outputs."""
    if not args.transcoders:
        return hooks
    return list(dict.fromkeys(h for pair in _transcoder_pairs(args) for h in pair))


def _expand_hooks(hooks: list[str]) -> list[str]:
    from ..names import get_act_name

    return [get_act_name(h) for h in hooks]


def _load_model(path: str | None):
    if not path:
        return None
    from ..model import HookedTransformer

    return HookedTransformer.from_pretrained(path)


def _resolve_model_arg(args) -> None:
    """MODEL may be the first argument or --model (not two different ones)."""
    pos = getattr(args, "model_pos", None)
    if pos and args.model and pos != args.model:
        raise ValueError(f"Two models given: {pos!r} (first argument) and --model {args.model!r}; give one.")
    args.model = args.model or pos


def _existing_path(p: str | None) -> str | None:
    return p if p and os.path.exists(p) else None


def _check_train_outputs(args, checkpoint_dir: str) -> None:
    """train-sae's output rules, checked up front: OUT is new or empty, or holds only what train-sae writes
    there and --resume continues, or --overwrite is given; OUT is not the model or the data; the checkpoint
    folder is continued (--resume) or replaced (--overwrite), never silently."""
    from ..outputs import check_output_dir
    from .files import NATIVE_CONFIG, NATIVE_WEIGHTS
    from .training import check_checkpoint_path

    own = {NATIVE_CONFIG, NATIVE_WEIGHTS, "saelens", "sparsify"}
    hooks = set(_expand_hooks(args.hook)) if args.hook else set()
    if os.path.normpath(checkpoint_dir) == os.path.normpath(os.path.join(args.out, "checkpoint")):
        own.add("checkpoint")

    def ours(name: str) -> bool:
        return args.resume and (name in own or name in hooks)

    check_output_dir(args.out, sources=[_existing_path(args.model), _existing_path(args.data)],
                     overwrite=args.overwrite, what="train-sae --out", allowed=ours)
    check_checkpoint_path(checkpoint_dir, args.resume, args.overwrite)


def cmd_train_sae(args) -> int:
    import numpy as np

    from .distributed import world
    from .evals import evaluate_model, evaluate_reconstruction
    from .files import export_saelens, export_sparsify, save_sae
    from .store import ActivationStore, ShardSource, is_harvest_dir, open_corpus
    from .training import train_saes

    _resolve_model_arg(args)
    checkpoint_dir = args.checkpoint_dir or os.path.join(args.out, "checkpoint")
    _check_train_outputs(args, checkpoint_dir)  # before any model loading or training
    harvested = is_harvest_dir(args.data)
    model = None
    if args.transcoders:  # what cannot be written, refused before any training
        if not args.hook:
            raise ValueError("--hook is required: the transcoder's input (e.g. --hook blocks.2.ln2.hook_normalized).")
        arch = args.architecture or SAEConfig.defaults()["architecture"]
        if "saelens" in args.export and ARCHS[arch].saelens_transcoder is None:
            raise ValueError(f"--export saelens: SAELens has no {arch} transcoder (it has relu and jumprelu ones, "
                             f"with or without a skip connection). Use --arch relu / jumprelu or drop the export.")
        if "sparsify" in args.export:
            raise ValueError("--export sparsify: sparsify files hold SAEs, not transcoders; use --export saelens.")
    if harvested:
        hooks = _expand_hooks(args.hook) if args.hook else None
        probe = ShardSource(args.data, batch_size=1, hook_names=_source_hooks(args, hooks) if hooks else None)
        hooks = hooks or probe.hook_names
        cfgs = _configs(args, hooks)
        source: ShardSource | ActivationStore = ShardSource(args.data, cfgs[0].train_batch_size_tokens,
                                                            seed=cfgs[0].seed, hook_names=_source_hooks(args, hooks))
        model_name = probe.manifest.get("model_name", "")
        cfgs = [c.replace(model_name=c.model_name or model_name,
                          context_size=probe.manifest.get("context_size", c.context_size)) for c in cfgs]
    else:
        if not args.model:
            raise ValueError("MODEL (first argument) or --model is required unless --data is a folder written by "
                             "`hooked-mlx harvest`.")
        if not args.hook:
            raise ValueError("--hook is required (e.g. --hook blocks.2.hook_resid_post); list names with "
                             "`hooked-mlx hooks MODEL`.")
        hooks = _expand_hooks(args.hook)
        model = _load_model(args.model)
        cfgs = _configs(args, hooks)
        cfgs = [c.replace(model_name=c.model_name or args.model) for c in cfgs]
        source = ActivationStore(model, _source_hooks(args, hooks), args.data, cfgs[0], text_field=args.text_field)
    result = train_saes(cfgs, source, checkpoint_path=checkpoint_dir, resume=args.resume,
                        progress=not args.quiet, overwrite=args.overwrite)
    if not world().is_main:
        return 0  # rank 0 saves, evaluates and reports (the parameters are identical on every rank)
    report = {}
    for hook, sae in result.items():
        folder = args.out if len(result) == 1 else os.path.join(args.out, hook)
        # OUT was checked before training: it held nothing but this command's own files (or --overwrite)
        save_sae(sae, folder, overwrite=True)
        if "saelens" in args.export:
            export_saelens(sae, os.path.join(folder, "saelens"), overwrite=True)
        if "sparsify" in args.export:
            export_sparsify(sae, os.path.join(folder, "sparsify"), hookpoint=None, overwrite=True)
        entry = {"path": folder}
        if args.eval_data:
            # held-out documents: reconstruction on their activations, and the SAE spliced into the model
            if model is None:
                if not args.model:
                    raise ValueError("--eval-data needs --model (the model the SAE reads from).")
                model = _load_model(args.model)
            docs = list(open_corpus(args.eval_data, args.text_field)())[: args.eval_docs]
            out_hook = sae.cfg.hook_name_out if sae.cfg.is_transcoder else hook
            store = ActivationStore(model, list(dict.fromkeys([hook, out_hook])), docs, sae.cfg,
                                    text_field=args.text_field)
            chunks = list(store.iter_activations(65536))
            acts = np.concatenate([a[hook] for a in chunks])
            targets = np.concatenate([a[out_hook] for a in chunks]) if sae.cfg.is_transcoder else None
            entry["eval"] = {**evaluate_reconstruction(sae, acts, targets=targets), **evaluate_model(model, sae, docs)}
            entry["eval_tokens"] = int(acts.shape[0])
        elif args.eval_batches:
            batches = [source.next_batch() for _ in range(args.eval_batches)]
            tgt_batches = [b[sae.cfg.hook_name_out] for b in batches] if sae.cfg.is_transcoder else None
            entry["eval"] = evaluate_reconstruction(sae, [b[hook] for b in batches], targets=tgt_batches)
        report[hook] = entry
    print(json.dumps(report, indent=2))
    return 0


def cmd_harvest(args) -> int:
    from ..outputs import check_output_dir
    from .distributed import world
    from .store import harvest

    check_output_dir(args.out, sources=[_existing_path(args.model), _existing_path(args.data)],
                     overwrite=args.overwrite, what="harvest --out")  # before the model loads
    model = _load_model(args.model)
    hooks = _expand_hooks(args.hook)
    cfg = SAEConfig(context_size=args.context_size, store_batch_size_prompts=args.batch_prompts,
                    prepend_bos=args.prepend_bos, packing=args.packing, model_name=args.model)
    man = harvest(model, hooks, args.data, args.out, args.tokens, cfg=cfg, shard_tokens=args.shard_tokens,
                  text_field=args.text_field, progress=not args.quiet, dtype=args.dtype, overwrite=args.overwrite)
    if not world().is_main:
        return 0
    print(f"wrote {man['n_tokens']:,} tokens of {', '.join(hooks)} in {len(man['shards'])} shard(s) to {args.out}")
    return 0


def add_subcommands(subparsers) -> None:
    """Register ``train-sae`` and ``harvest`` on an argparse subparsers object."""
    _add_train_parser(subparsers, "train-sae", "train sparse autoencoders on a model's activations", False)
    _add_train_parser(subparsers, "train-transcoders", "train transcoders: predict one hook's activations (an MLP's "
                      "output) from another's (its input)", True)
    _add_harvest_parser(subparsers)


def _add_train_parser(subparsers, name: str, help_text: str, transcoders: bool) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="model folder / hub id (same as --model)")
    p.add_argument("--model", help="model folder / hub id (not needed when --data is a harvest folder)")
    p.add_argument("--hook", action="append", default=[],
                   help="hook name (repeat for several SAEs trained from one forward); shorthands like resid_post2")
    p.add_argument("--data", required=True,
                   help="corpus: .txt (blank-line separated documents) / .jsonl / hf:NAME[:SPLIT], or a harvest folder")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / datasets rows")
    p.add_argument("--out", required=True, help="output folder (one subfolder per hook when there are several)")
    p.add_argument("--export", nargs="*", default=[], choices=["saelens", "sparsify"],
                   help="also write these formats inside the output folder")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder for atomic training checkpoints (default: OUT/checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out (and replace a checkpoint there), replacing only the "
                        "files train-sae writes")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="without --eval-data: batches of further training-source activations to evaluate on (0: none)")
    p.add_argument("--eval-data", default=None,
                   help="held-out corpus (.txt / .jsonl): report FVU, L0 ... on its activations and CE loss recovered "
                        "/ KL with the SAE spliced into the model")
    p.add_argument("--eval-docs", type=int, default=32, help="documents of --eval-data to use")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if transcoders:
        p.add_argument("--hook-out", action="append", default=[],
                       help="the hook each transcoder predicts, in the order of --hook (default: the block's "
                            "hook_mlp_out for an MLP-input hook such as blocks.L.ln2.hook_normalized)")
        p.add_argument("--skip-connection", action="store_true", help="add a trained linear skip term x @ W_skip.T")
    add_config_flags(p)
    p.set_defaults(func=cmd_train_sae, transcoders=transcoders)


def _add_harvest_parser(subparsers) -> None:
    d = SAEConfig.defaults()
    h = subparsers.add_parser("harvest", help="run a model once and write hook activations to safetensors shards")
    h.add_argument("--model", required=True)
    h.add_argument("--hook", action="append", required=True, help="hook name (repeatable)")
    h.add_argument("--data", required=True, help="corpus: .txt / .jsonl / hf:NAME[:SPLIT]")
    h.add_argument("--text-field", default="text")
    h.add_argument("--out", required=True, help="output folder")
    h.add_argument("--tokens", type=int, default=None,
                   help="number of activation rows (tokens) to write (default: the whole corpus once)")
    h.add_argument("--shard-tokens", type=int, default=262144, help="rows per shard file")
    h.add_argument("--context-size", type=int, default=d["context_size"])
    h.add_argument("--batch-prompts", type=int, default=d["store_batch_size_prompts"])
    h.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=d["prepend_bos"])
    h.add_argument("--packing", action=argparse.BooleanOptionalAction, default=d["packing"])
    h.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    h.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out, replacing only same-named shards and the manifest")
    h.add_argument("--quiet", action="store_true")
    h.set_defaults(func=cmd_harvest)


def main(argv=None) -> int:  # standalone use: python -m hooked_mlx.sae.cli
    from .. import _blas

    _blas.load_blas()
    parser = argparse.ArgumentParser(prog="hooked-mlx-sae")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_subcommands(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
