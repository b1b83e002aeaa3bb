"""Data for mixerzoo: synthetic recall tasks generated on the fly.

Every synthetic task is a typed, keyword-only config with the same small face::

    task = MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=8)
    inputs, labels = task.sample(32, seed=0, device="cuda")   # [B, T] long, [B, T] long
    stream = task.build(seed=0, device="cuda")                 # a seeded, endless source
    inputs, labels = stream.sample(32)

``labels`` hold ``IGNORE_INDEX`` (-100) wherever there is no loss, so
``F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` trains on the
answer positions only. They are already aligned with the logits (``labels[:, t]`` is the
target of ``logits[:, t]``): do not pass them as ``labels=`` to a Hugging Face causal LM,
which would shift them by one more token.

Batches are made with torch ops on the requested device from a ``torch.Generator`` seeded
there; a seed therefore reproduces a batch on one device type (CPU and CUDA draw different
streams from the same seed).

Tasks: ``mqar`` (:class:`~mixerzoo.tasks.mqar.MQARConfig`) and ``selective_copy``
(:class:`~mixerzoo.tasks.selective_copy.SelectiveCopyConfig`) are built in; more come from
``register_task(name, cls)`` or from Python entry points in group ``mixerzoo.tasks`` (a
package's ``[project.entry-points."mixerzoo.tasks"] my_task = "pkg.module:MyTaskConfig"``).
A task is one file: a :class:`SyntheticTask` dataclass with its ``name``, ``_generate`` and,
optionally, ``preset_fields`` (its defaults in the ``demo`` / ``quick`` / ``full`` sweeps).
The modules are imported only when a task is first used.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

import torch

IGNORE_INDEX = -100

# name -> "module:Class" or a class; paths are resolved lazily so that importing stays cheap.
_BUILTIN_TASKS = {
    "mqar": "mixerzoo.tasks.mqar:MQARConfig",
    "selective_copy": "mixerzoo.tasks.selective_copy:SelectiveCopyConfig",
}
_USER_TASKS: dict[str, Any] = {}
TASK_ENTRY_POINT_GROUP = "mixerzoo.tasks"
_EXPORTS = {
    "MQARConfig": "mixerzoo.tasks.mqar",
    "SelectiveCopyConfig": "mixerzoo.tasks.selective_copy",
}


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (tensors drawn on a device
    need a generator of the same device type)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


class SyntheticTask:
    """Base of the synthetic task configs (dataclasses that subclass it).

    Subclasses set ``name`` and implement ``_generate(batch_size, generator, device)``; they
    validate their fields in ``__post_init__``. Everything else is shared.
    """

    name: str = ""

    def _generate(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample(
        self,
        batch_size: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``(inputs [B, T] long, labels [B, T] long, -100 where no loss)``.

        Give either ``seed`` (a fresh generator on ``device``) or ``generator`` (drawn from and
        advanced; ``device`` defaults to the generator's).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if (seed is None) == (generator is None):
            raise ValueError("give exactly one of seed= or generator=")
        if generator is None:
            device = torch.device(device if device is not None else "cpu")
            generator = make_generator(seed, device)
        else:
            device = torch.device(device) if device is not None else generator.device
            if device.type != generator.device.type:
                raise ValueError(
                    f"generator lives on {generator.device}, batch requested on {device}: "
                    "make the generator on the same device type"
                )
        return self._generate(batch_size, generator, device)

    def build(self, seed: int, device: torch.device | str = "cpu") -> "TaskStream":
        """An endless, seeded source of batches of this task on ``device``."""
        return TaskStream(self, seed, device)

    @classmethod
    def preset_fields(cls, preset: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """The task's fields in a named sweep (``demo``, ``quick``, ``full``) and per-length
        overrides ``{seq_len: {field: value}}``; the class defaults unless a task says more."""
        return {}, {}

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, with its task name (for results files)."""
        return {"task": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> "SyntheticTask":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


class TaskStream:
    """Batches of one task drawn from one seeded generator, in a reproducible order."""

    def __init__(self, task: SyntheticTask, seed: int, device: torch.device | str = "cpu"):
        self.task = task
        self.seed = seed
        self.device = torch.device(device)
        self.generator = make_generator(seed, self.device)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.sample(batch_size, generator=self.generator, device=self.device)

    def batches(self, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``n`` batches (a fixed evaluation set when the stream is fresh)."""
        return [self.sample(batch_size) for _ in range(n)]


def _entry_point_tasks() -> dict[str, str]:
    from importlib import metadata

    return {ep.name: ep.value for ep in metadata.entry_points(group=TASK_ENTRY_POINT_GROUP)}


def _all_tasks() -> dict[str, Any]:
    # later layers win: built-ins, then installed packages, then register_task
    return {**_BUILTIN_TASKS, **_entry_point_tasks(), **_USER_TASKS}


def list_tasks() -> list[str]:
    return sorted(_all_tasks())


def register_task(name: str, cls: type | str, *, overwrite: bool = False) -> None:
    """Make a task available by name: ``cls`` a :class:`SyntheticTask` subclass or its
    ``"module:Class"`` path (imported when first used)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"task name must be an identifier such as 'my_task', got {name!r}")
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"task class path must look like 'package.module:Class', got {cls!r}")
    elif not (isinstance(cls, type) and issubclass(cls, SyntheticTask) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_task({name!r}, ...): the class must be a dataclass subclassing "
                        f"mixerzoo.tasks.SyntheticTask, got {cls!r}")
    if name in _all_tasks() and not overwrite:
        raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _USER_TASKS[name] = cls


def unregister_task(name: str) -> None:
    """Remove a task added with :func:`register_task` (built-ins stay)."""
    if name not in _USER_TASKS:
        raise ValueError(f"task {name!r} was not added with register_task")
    del _USER_TASKS[name]


def get_task_class(name: str) -> type[SyntheticTask]:
    """The config class of a task by name, with a suggestion on a misspelt name."""
    tasks = _all_tasks()
    if name not in tasks:
        close = difflib.get_close_matches(str(name), tasks, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Available: {', '.join(sorted(tasks))}")
    target = tasks[name]
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task {name!r}: cannot import {target!r} ({type(e).__name__}: {e})") from e
    if not (isinstance(cls, type) and issubclass(cls, SyntheticTask)):
        raise ValueError(f"task {name!r}: {target!r} is not a mixerzoo.tasks.SyntheticTask subclass")
    return cls


def build_task(name: str, **options: Any) -> SyntheticTask:
    """``build_task("mqar", seq_len=128)``: the task's config with these fields set; an unknown
    field is refused with the task's known fields."""
    cls = get_task_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in known]
    if unknown:
        from ..hints import unknown_names

        raise ValueError(f"task {name!r} has no field(s) {unknown_names(unknown, known)}; its fields: {', '.join(known)}")
    return cls(**options)


def __getattr__(attr: str) -> Any:
    if attr in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[attr]), attr)
    raise AttributeError(f"module 'mixerzoo.tasks' has no attribute {attr!r}")


__all__ = [
    "IGNORE_INDEX",
    "MQARConfig",
    "SelectiveCopyConfig",
    "SyntheticTask",
    "TaskStream",
    "build_task",
    "get_task_class",
    "list_tasks",
    "make_generator",
    "register_task",
    "unregister_task",
]
