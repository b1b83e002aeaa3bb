"""``mixerzoo train`` flags, one per ``TrainConfig`` field, so the two never drift apart.

Precedence: the field defaults, then ``--config FILE.yaml`` (or, with ``--resume RUN``, the
run's saved config), then the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, TrainConfig, _Loader, saved_split_seed

_HELP = {
    "mixer": "registry name (mixerzoo list)",
    "size": "tiny, 125m, 350m, 760m, 1.3b",
    "data": "text file or folder, .jsonl, .parquet, or hf:NAME[:CONFIG]",
    "tokenizer": "HF tokenizer name or folder (default: byte-level, no files needed)",
    "mixer_options": "YAML/JSON mapping, e.g. '{backend: torch}'",
    "batch_size": "global sequences per optimizer step",
    "micro_batch_size": "sequences per forward on each rank (gradient accumulation makes up the rest)",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 (per block)",
    "precision": "auto, bf16 (autocast, fp32 weights), bf16-true (bf16 weights), fp32",
    "checkpoint_activations": "recompute each block in backward (less memory, ~1/3 more time)",
    "out": "run folder: checkpoints, metrics.jsonl, loss.png, train_config.json",
    "seed": "initialisation and the order of the training data",
    "split_seed": "which documents are held out for validation (keep it fixed across seeds)",
}


def _converter(tp: Any, name: str):
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if union else tp
    if typing.get_origin(base) is dict or base is dict:
        def parse_map(text: str) -> dict:
            value = yaml.safe_load(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: expected a mapping like '{{backend: torch}}'")
            return value
        return parse_map
    if typing.get_origin(base) is tuple:
        return lambda text: tuple(float(x) for x in text.split(","))
    if base in (int, float, str):
        def parse(text: str, base=base):
            if text.lower() == "none" and base is not str:
                return None
            return base(text)
        return parse
    return str


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="training options from a YAML file")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder exactly")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{_HELP.get(f.name, '')} (default: {default})".strip()
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=_converter(hints[f.name], f.name), default=argparse.SUPPRESS,
                           help=help_text)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's config and whether it resumes."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values: dict[str, Any] = {}
    if args.resume:
        from .checkpoint import latest_checkpoint, read_state

        ckpt = latest_checkpoint(Path(args.resume))
        if ckpt is None:
            raise ConfigError(f"--resume {args.resume}: no checkpoint there yet; start the run without --resume")
        values = dict(read_state(ckpt)["config"])
        values["split_seed"] = saved_split_seed(values)
        if "out" in given and Path(given["out"]).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} continues that run in place; drop --out {given['out']}")
        values["out"] = args.resume
    if args.config:
        values.update(_yaml_values(args.config))
    values.update(given)
    return TrainConfig.from_dict(values), bool(args.resume)


def _yaml_values(path: str) -> dict[str, Any]:
    cfg = TrainConfig.from_yaml(path)  # validates the keys
    raw = yaml.load(Path(path).read_text(), Loader=_Loader) or {}
    return {k: json.loads(json.dumps(cfg.to_dict()[k])) for k in raw}
