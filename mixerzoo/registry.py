"""The mixer registry: built-in YAML, user YAML files, ``register_mixer`` and entry points.

An entry names a class lazily as ``"module:Class"``; nothing is imported until a model is
built. Sources are consulted in this order, later ones unable to shadow earlier names:
built-ins (``registry.yaml``), files named by ``MIXERZOO_REGISTRY`` (``os.pathsep``-separated),
Python entry points in group ``mixerzoo.mixers``, then ``register_mixer`` / ``load_registry``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ENTRY_POINT_GROUP = "mixerzoo.mixers"
_ENTRY_KEYS = {"class", "options", "summary", "reference"}


class RegistryError(ValueError):
    """A registry entry or a request to the registry is wrong; the message says how to fix it."""


@dataclass(frozen=True)
class MixerSpec:
    """One registry entry: a mixer class (or its import path) and the options it is built with."""

    name: str
    target: str | type
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    reference: str = ""
    source: str = "builtin"

    @property
    def class_path(self) -> str:
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"

    def resolve(self) -> type:
        """Import and return the mixer class, with an error that names the entry on failure."""
        if not isinstance(self.target, str):
            return self.target
        return import_class(self.target, f"mixer {self.name!r} (from {self.source})")


def import_class(path: str, what: str = "class") -> type:
    """Import ``"package.module:Class"`` (``"package.module.Class"`` is accepted too)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"{what}: {path!r} is not of the form 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"{what}: cannot import module {module_name!r} ({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise RegistryError(f"{what}: {path!r} is not a class")
    return obj


def _spec_from_entry(name: str, entry: Any, source: str) -> MixerSpec:
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{source}: mixer names must be non-empty strings, got {name!r}")
    if isinstance(entry, str):  # shorthand: `name: module:Class`
        entry = {"class": entry}
    if not isinstance(entry, dict):
        raise RegistryError(f"{source}: entry {name!r} must be a mapping with a 'class' key")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise RegistryError(
            f"{source}: entry {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
        )
    target = entry.get("class")
    if not isinstance(target, str) or not target.strip():
        raise RegistryError(f"{source}: entry {name!r} needs 'class: package.module:Class'")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise RegistryError(f"{source}: entry {name!r}: 'options' must be a mapping")
    return MixerSpec(
        name=name,
        target=target.strip(),
        options=dict(options),
        summary=str(entry.get("summary", "")),
        reference=str(entry.get("reference", "")),
        source=source,
    )


def read_registry_file(path: str | os.PathLike) -> list[MixerSpec]:
    """Parse a registry YAML file into specs (validated, nothing imported)."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"registry file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RegistryError(f"registry file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return []
    if not isinstance(data, dict):
        raise RegistryError(f"registry file {str(path)!r} must map mixer names to entries")
    return [_spec_from_entry(name, entry, str(path)) for name, entry in data.items()]


class Registry:
    """Name → MixerSpec, with collisions refused and 'did you mean' on unknown names."""

    def __init__(self) -> None:
        self._specs: dict[str, MixerSpec] = {}
        self._loaded_defaults = False

    def _ensure_defaults(self) -> None:
        if self._loaded_defaults:
            return
        self._loaded_defaults = True
        for spec in read_registry_file(Path(__file__).with_name("registry.yaml")):
            self._add(spec, overwrite=False)
        for part in filter(None, os.environ.get("MIXERZOO_REGISTRY", "").split(os.pathsep)):
            for spec in read_registry_file(part):
                self._add(spec, overwrite=False)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            self._add(self._spec_from_entry_point(ep), overwrite=False)

    @staticmethod
    def _spec_from_entry_point(ep: metadata.EntryPoint) -> MixerSpec:
        source = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party package must not hide the built-ins
            raise RegistryError(f"{source}: failed to load ({e})") from e
        if isinstance(obj, MixerSpec):
            return obj
        if isinstance(obj, type):
            return MixerSpec(name=ep.name, target=obj, source=source)
        if isinstance(obj, dict):
            return _spec_from_entry(ep.name, obj, source)
        raise RegistryError(f"{source}: must point to a mixer class or a registry entry dict")

    def _add(self, spec: MixerSpec, overwrite: bool) -> None:
        if spec.name in self._specs and not overwrite:
            old = self._specs[spec.name]
            raise RegistryError(
                f"mixer {spec.name!r} from {spec.source} collides with the one from {old.source}; "
                "choose another name (or pass overwrite=True to register_mixer)"
            )
        self._specs[spec.name] = spec

    def add(self, spec: MixerSpec, overwrite: bool = False) -> None:
        self._ensure_defaults()
        self._add(spec, overwrite)

    def load_file(self, path: str | os.PathLike, overwrite: bool = False) -> list[str]:
        self._ensure_defaults()
        specs = read_registry_file(path)
        for spec in specs:
            self._add(spec, overwrite)
        return [s.name for s in specs]

    def names(self) -> list[str]:
        self._ensure_defaults()
        return list(self._specs)

    def get(self, name: str) -> MixerSpec:
        self._ensure_defaults()
        if name in self._specs:
            return self._specs[name]
        close = difflib.get_close_matches(str(name), self._specs, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown mixer {name!r}.{hint} Known mixers: {', '.join(self._specs)}. "
            "Add one with register_mixer(...), a registry YAML (MIXERZOO_REGISTRY) or an "
            f"entry point in group {ENTRY_POINT_GROUP!r}."
        )

    def remove(self, name: str) -> None:
        self._ensure_defaults()
        self._specs.pop(name, None)


REGISTRY = Registry()


def register_mixer(
    name: str,
    cls: type | str,
    *,
    summary: str = "",
    reference: str = "",
    overwrite: bool = False,
    **options: Any,
) -> MixerSpec:
    """Add a mixer: ``cls`` is a class or ``"module:Class"``; ``options`` go to its constructor."""
    if not isinstance(cls, (type, str)):
        raise RegistryError(f"register_mixer({name!r}): cls must be a class or 'module:Class'")
    spec = MixerSpec(name, cls, dict(options), summary, reference, source="register_mixer")
    REGISTRY.add(spec, overwrite=overwrite)
    return spec


def load_registry(path: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Add every entry of a registry YAML file; returns the names added."""
    return REGISTRY.load_file(path, overwrite=overwrite)


def list_mixers() -> list[str]:
    return REGISTRY.names()


def get_mixer_spec(name: str) -> MixerSpec:
    return REGISTRY.get(name)


def accepted_options(cls: type) -> set[str] | None:
    """Keyword options the constructor accepts beyond (d_model, layer_idx); None if it takes **kwargs."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n not in ("self", "d_model", "layer_idx")} - {
        n for n, p in params.items() if p.kind is inspect.Parameter.VAR_POSITIONAL
    }


def check_options(name: str, cls: type, options: dict[str, Any]) -> None:
    """Raise a RegistryError naming the accepted options if any option is unknown."""
    accepted = accepted_options(cls)
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise RegistryError(
            f"mixer {name!r} ({cls.__name__}) got unknown option(s) {unknown}; "
            f"accepted: {sorted(accepted)}"
        )
