"""The training configuration: one typed, keyword-only dataclass, also read from YAML.

Unknown keys are refused with the known ones listed (a misspelt option silently ignored for a
whole run is the failure this guards against). ``mixerzoo train`` builds one flag per field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..hints import unknown_names

PRECISIONS = ("auto", "bf16", "bf16-true", "fp32")


class ConfigError(ValueError):
    """A training option is wrong; the message names the option, its value and what is allowed."""


# Fields that define the model and the data stream: a resumed run must keep them, otherwise it
# would continue from weights or a data position that mean something else.
IDENTITY_FIELDS = (
    "mixer", "size", "mixer_options", "vocab_size", "tie_embeddings", "data", "text_field", "tokenizer",
    "seq_len", "batch_size", "val_fraction", "seed", "split_seed", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "betas", "eps", "steps",
)


def saved_split_seed(saved: dict[str, Any]) -> int:
    """The split seed of a saved run's config: runs saved before ``split_seed`` existed held
    out their validation documents by ``seed``."""
    return saved.get("split_seed", saved.get("seed", 0))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; here it is the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one ``mixerzoo train`` run needs. Defaults train a ``tiny`` model on a CPU.

    ``batch_size`` is the global number of sequences per optimizer step; each rank runs
    ``micro_batch_size`` sequences per forward and accumulates gradients over
    ``batch_size / (micro_batch_size · world_size)`` micro-steps.
    """

    # --- model ---
    mixer: str = "loglinear_adaptive"
    size: str = "tiny"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None  # None: the tokenizer's size
    tie_embeddings: bool = True
    # --- data ---
    data: str | None = None  # text file/folder, .jsonl, .parquet, or hf:NAME[:CONFIG]
    text_field: str = "text"
    tokenizer: str | None = None  # None: the byte-level tokenizer; else an HF name or folder
    data_cache: str | None = None  # token cache folder (default: ~/.cache/mixerzoo/tokens)
    val_fraction: float = 0.01  # share of documents held out for validation
    # which documents are held out: fixed apart from ``seed``, so that runs of several seeds
    # are validated on the same documents and their losses compare
    split_seed: int = 0
    seq_len: int = 512
    # --- optimisation ---
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: batch_size / world_size (no accumulation)
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 0
    # --- execution ---
    device: str | None = None  # None: cuda:LOCAL_RANK if available, else cpu
    # auto: bf16 on GPU, fp32 on CPU. bf16: fp32 weights and optimizer, bf16 autocast;
    # bf16-true: bf16 weights, optimizer state and activations (less memory, less precision).
    precision: str = "auto"
    compile: bool = False
    checkpoint_activations: bool = False  # recompute each block in backward: memory for time
    fsdp: bool = False
    # --- output ---
    out: str | None = None
    log_every: int = 10
    val_every: int = 200
    val_batches: int = 20  # validation set: the first val_batches · batch_size held-out sequences
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self._coerce()
        self.mixer_options = dict(self.mixer_options or {})
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise ConfigError(f"betas={self.betas!r}: must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        self._check()

    def _coerce(self) -> None:
        """Check every field's type (an int is taken where a float is expected)."""
        import types
        import typing

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, tp = getattr(self, f.name), hints[f.name]
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            allowed = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
            if v is None and union and type(None) in typing.get_args(tp):
                continue
            if float in allowed and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f.name, float(v))
                continue
            ok = any(isinstance(v, typing.get_origin(a) or a) for a in allowed)
            if bool not in allowed and isinstance(v, bool):
                ok = False
            if not ok:
                names = " or ".join(getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in allowed)
                raise ConfigError(f"{f.name}={v!r}: must be of type {names}, got {type(v).__name__}")

    def _check(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {allowed}")

        for name in ("seq_len", "batch_size", "steps", "log_every", "val_every", "save_every",
                     "keep_checkpoints", "val_batches"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "must be an integer >= 1")
        need(self.seq_len >= 2, "seq_len", "must be >= 2 (one input and one target token)")
        for name in ("warmup_steps", "seed", "split_seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be an integer >= 0")
        if self.micro_batch_size is not None:
            v = self.micro_batch_size
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, "micro_batch_size",
                 "must be an integer >= 1, or None")
        if self.vocab_size is not None:
            need(isinstance(self.vocab_size, int) and self.vocab_size >= 2, "vocab_size", "must be an integer >= 2")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
        need(0 <= self.val_fraction < 1, "val_fraction", "must lie in [0, 1)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(isinstance(self.mixer, str) and bool(self.mixer), "mixer", "must be a mixer name (see `mixerzoo list`)")
        need(isinstance(self.mixer_options, dict), "mixer_options", "must be a mapping of option names to values")

    # --- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
        known = cls.field_names()
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown_names(unknown, known)}; "
                              f"known options: {', '.join(known)}")
        try:
            return cls(**values)
        except TypeError as e:  # a value of the wrong kind, e.g. a list for an int
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def identity_changes(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{field: (saved, now)}`` for identity fields that differ from a saved run's config."""
        now = json.loads(json.dumps(self.to_dict()))
        saved = {**saved, "split_seed": saved_split_seed(saved)}
        return {k: (saved.get(k), now[k]) for k in IDENTITY_FIELDS if saved.get(k) != now[k]}
