"""Experiments as data: YAML files and ``--set key=value`` overrides that become a sweep.

One flat namespace of keys, so that a paper's setting is one command::

    mixerzoo synth mqar --set seq_len=128 num_kv_pairs=32 d_model=128 steps=20000
    mixerzoo synth --config exp.yaml --set seeds=3
    mixerzoo synth --preset mqar-width            # a file shipped in experiments/

A key is, in this order of lookup: an alias (``seq_len``/``seq_lens``, ``d_model``/``d_models``,
``steps``, ``lr``, ``seeds``: an int n means seeds 0..n-1, ``per_length``), a
:class:`SyntheticRunConfig` field, or a field of the task's config. Unknown keys fail with the
known ones listed. The keys ``name``, ``version``, ``description`` and ``expected_time`` only
describe a file; ``task`` names the task; ``base`` starts from a built-in sweep (``demo``,
``quick``, ``full``) whose values the file then changes.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mixerzoo.hints import unknown_names
from mixerzoo.tasks import get_task_class

from .config import SyntheticRunConfig
from .presets import PRESETS, preset

META_KEYS = ("name", "version", "description", "expected_time")
ALIASES = {"seq_len": "seq_lens", "d_model": "d_models", "steps": "max_steps", "lr": "learning_rates",
           "per_length": "task_overrides"}
_TUPLES = ("seq_lens", "d_models", "learning_rates", "seeds", "mixers", "eval_length_factors")
_HIDDEN = ("task",)  # set through the ``task`` key, never as a run field


class ExperimentError(ValueError):
    """A bad experiment file, key or value; the message names it and what is allowed."""


def experiment_files() -> dict[str, Path]:
    """The experiment files shipped with the package, by name (file stem)."""
    root = resources.files("mixerzoo.evals.synthetic") / "experiments"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Every name ``--preset`` takes: the built-in sweeps, then the shipped files."""
    return list(PRESETS) + sorted(experiment_files())


def read_experiment(path: str | Path) -> dict[str, Any]:
    """A YAML experiment file as a mapping (not yet checked against the fields)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: an experiment file is a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["seq_len=128", "mixers=[softmax, mamba2]"]`` to a mapping; values are YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE, e.g. seq_len=128")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ExperimentError(f"--set {item!r}: the value is not valid YAML") from None
    return out


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; such strings become floats."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _known_keys(task_cls: type) -> list[str]:
    run = [f.name for f in dataclasses.fields(SyntheticRunConfig) if f.name not in _HIDDEN]
    task = [f.name for f in dataclasses.fields(task_cls)]
    return sorted(set(META_KEYS) | {"task", "base"} | set(ALIASES) | set(run) | set(task))


def _as_tuple(key: str, value: Any) -> tuple:
    if key == "seeds" and isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ExperimentError(f"seeds={value}: give a number of seeds >= 1 or a list of seeds")
        return tuple(range(value))
    if key == "mixers" and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def build_experiment(*layers: dict[str, Any], task: str | None = None,
                     **run_overrides: Any) -> SyntheticRunConfig:
    """A sweep from layers of keys (a file, then ``--set`` items, ...; later layers win).

    ``task`` (a task name), when given, replaces the layers' ``task``; ``run_overrides`` are
    :class:`SyntheticRunConfig` fields applied last (the CLI's own flags)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key, value = ALIASES.get(key, key), _numbers(value)
            if key == "task_overrides" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    task_name = task or merged.pop("task", None) or "mqar"
    merged.pop("task", None)
    if not isinstance(task_name, str):
        raise ExperimentError(f"task must be a task name, got {task_name!r}")
    task_cls = get_task_class(task_name)  # unknown task: names the known ones
    run_fields = {f.name for f in dataclasses.fields(SyntheticRunConfig)} - set(_HIDDEN)
    task_fields = {f.name for f in dataclasses.fields(task_cls)}
    for key in META_KEYS:
        merged.pop(key, None)
    base = merged.pop("base", None)
    unknown = [k for k in merged if k not in run_fields and k not in task_fields]
    if unknown:
        raise ExperimentError(f"unknown experiment key(s) {unknown_names(unknown, _known_keys(task_cls))}; "
                              f"known for task {task_name!r}: {', '.join(_known_keys(task_cls))}")
    run: dict[str, Any] = {}
    task_options: dict[str, Any] = {}
    for key, value in merged.items():
        if key in run_fields:
            run[key] = _as_tuple(key, value) if key in _TUPLES else value
        else:
            task_options[key] = value
    if "task_overrides" in run:
        overrides = run["task_overrides"]
        if not isinstance(overrides, dict):
            raise ExperimentError(f"per_length must map sequence lengths to task fields, got {overrides!r}")
        run["task_overrides"] = {int(k): dict(v or {}) for k, v in overrides.items()}
    if "task_overrides" in run and "seq_lens" in run:
        # a file's per-length fields cover its own lengths; --set seq_len=... may sweep fewer
        run["task_overrides"] = {L: v for L, v in run["task_overrides"].items() if L in run["seq_lens"]}
    run.update(run_overrides)
    seq_lens = run.get("seq_lens")
    if seq_lens and "seq_len" not in task_options:
        task_options["seq_len"] = seq_lens[0]  # the task is built (and checked) at a swept length
    try:
        if base is not None:
            if base not in PRESETS:
                raise ExperimentError(f"base={base!r}: one of {', '.join(PRESETS)}")
            return preset(base, task=task_name, task_options=task_options, **run)
        from mixerzoo.tasks import build_task

        return SyntheticRunConfig(task=build_task(task_name, **task_options), **run)
    except (TypeError, ValueError) as e:
        if isinstance(e, ExperimentError):
            raise
        raise ExperimentError(str(e)) from e


def load_preset(name: str) -> dict[str, Any]:
    """The keys of a named preset: a shipped file, or ``{"base": name}`` for a built-in sweep."""
    files = experiment_files()
    if name in files:
        return read_experiment(files[name])
    if name in PRESETS:
        return {"base": name}
    raise ExperimentError(f"unknown preset {unknown_names([name], list_presets())}; known: {', '.join(list_presets())}")


def describe_presets() -> str:
    """One paragraph per shipped experiment file: name, version, description, expected time."""
    blocks = []
    for name in list_presets():
        if name in PRESETS:
            blocks.append(f"{name}: built-in sweep (see mixerzoo.evals.synthetic.preset)")
            continue
        data = load_preset(name)
        times = data.get("expected_time") or {}
        when = "; ".join(f"{k}: {v}" for k, v in times.items())
        blocks.append(f"{name} (version {data.get('version', '?')}): {' '.join(str(data.get('description', '')).split())}"
                      + (f"\n  expected time: {when}" if when else ""))
    return "\n".join(blocks)
