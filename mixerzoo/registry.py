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
_ENTRY_KEYS = {"class", "options", "summary", "reference", "init"}
# The initialisation rules an entry may name (``init:``), each the rule of one reference
# implementation; mixerzoo.models.init carries them out.
INIT_RULES = ("llama", "fla", "mamba_ssm", "fla_log_linear_mamba2")


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
    # the initialisation rule of the implementation this mixer reproduces (models/init.py);
    # None keeps whatever the constructor gives
    init: str | None = None

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
        init=check_init_rule(entry.get("init"), f"{source}: entry {name!r}"),
    )


def check_init_rule(value: Any, where: str) -> str | None:
    """An ``init`` rule as an entry or a saved layer names it: None (the constructor's init
    stands) or one of INIT_RULES."""
    if value is not None and value not in INIT_RULES:
        raise RegistryError(f"{where}: init rule must be one of {list(INIT_RULES)} or None, got {value!r}")
    return value


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
    """Name → MixerSpec, with collisions refused and 'did you mean' on unknown names.

    Sources are kept apart: the built-ins and entry points are read once; the files named by
    ``MIXERZOO_REGISTRY`` are re-read whenever the variable changes; ``register_mixer`` and
    ``load_registry`` add to the user layer. A source that fails (a missing file, a broken
    entry point) is reported by every lookup it could affect, and hides nothing else.
    """

    def __init__(self) -> None:
        self._builtin: dict[str, MixerSpec] | None = None
        self._entry_points: dict[str, MixerSpec] | None = None
        self._broken_entry_points: dict[str, str] = {}  # name -> the error message
        self._env_value: str | None = None
        self._env: dict[str, MixerSpec] = {}
        self._env_error: str | None = None  # the message of a bad MIXERZOO_REGISTRY
        self._user: dict[str, MixerSpec] = {}

    # --- sources ---------------------------------------------------------------------------
    def _load_static(self) -> None:
        if self._builtin is None:
            self._builtin = {s.name: s for s in read_registry_file(Path(__file__).with_name("registry.yaml"))}
        if self._entry_points is None:
            found: dict[str, MixerSpec] = {}
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    found[ep.name] = self._spec_from_entry_point(ep)
                except RegistryError as e:  # reported when that name is asked for
                    self._broken_entry_points[ep.name] = str(e)
            self._entry_points = found

    def _load_env(self) -> None:
        value = os.environ.get("MIXERZOO_REGISTRY", "")
        if value == self._env_value:
            return
        self._env_value, self._env, self._env_error = value, {}, None
        try:
            for part in filter(None, value.split(os.pathsep)):
                for spec in read_registry_file(part):
                    self._env[spec.name] = spec
        except RegistryError as e:
            self._env, self._env_error = {}, f"MIXERZOO_REGISTRY={value!r}: {e}"

    def _merged(self) -> dict[str, MixerSpec]:
        self._load_static()
        self._load_env()
        if self._env_error is not None:
            # a new exception each time: re-raising one object chains every caller onto its traceback
            raise RegistryError(self._env_error)
        merged: dict[str, MixerSpec] = {}
        for layer in (self._builtin, self._env, self._entry_points, self._user):
            for name, spec in layer.items():
                if name in merged and layer is not self._user:
                    raise RegistryError(
                        f"mixer {name!r} from {spec.source} collides with the one from "
                        f"{merged[name].source}; rename one of them"
                    )
                merged[name] = spec
        return merged

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

    # --- the user layer --------------------------------------------------------------------
    def add_all(self, specs: list[MixerSpec], overwrite: bool = False) -> None:
        """Add every spec or none (collisions are checked before anything is added)."""
        merged = self._merged()
        if not overwrite:
            for spec in specs:
                if spec.name in merged:
                    raise RegistryError(
                        f"mixer {spec.name!r} from {spec.source} collides with the one from "
                        f"{merged[spec.name].source}; choose another name (or pass overwrite=True)"
                    )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise RegistryError(f"duplicate mixer names in one registration: {names}")
        for spec in specs:
            self._user[spec.name] = spec

    def add(self, spec: MixerSpec, overwrite: bool = False) -> None:
        self.add_all([spec], overwrite)

    def load_file(self, path: str | os.PathLike, overwrite: bool = False) -> list[str]:
        specs = read_registry_file(path)
        self.add_all(specs, overwrite)
        return [s.name for s in specs]

    def remove(self, name: str) -> None:
        self._user.pop(name, None)

    # --- lookups -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._merged())

    def known(self) -> str:
        """The known names, for error messages."""
        try:
            return ", ".join(self._merged())
        except RegistryError:
            return ", ".join(self._builtin or {})

    def get(self, name: str) -> MixerSpec:
        merged = self._merged()
        if name in merged:
            return merged[name]
        if name in self._broken_entry_points:
            raise RegistryError(self._broken_entry_points[name])
        close = difflib.get_close_matches(str(name), merged, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown mixer {name!r}.{hint} Known mixers: {', '.join(merged)}. "
            "Add one with register_mixer(...), a registry YAML (MIXERZOO_REGISTRY) or an "
            f"entry point in group {ENTRY_POINT_GROUP!r}."
        )

    def find_class(self, name: str, class_path: str) -> type | None:
        """The registered class object for ``name`` if it is the one at ``class_path``.

        Lets a class defined where it cannot be re-imported (inside a function, in a
        notebook) be built from the config that names it.
        """
        try:
            spec = self._merged().get(name)
        except RegistryError:
            return None
        if spec is not None and not isinstance(spec.target, str) and spec.class_path == class_path:
            return spec.target
        return None


REGISTRY = Registry()


def _is_module_class(cls: type) -> bool:
    from torch import nn  # imported here: reading the registry does not need torch

    return issubclass(cls, nn.Module)


def register_mixer(
    name: str,
    cls: type | str,
    *,
    summary: str = "",
    reference: str = "",
    init: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> MixerSpec:
    """Add a mixer: ``cls`` is a class or ``"module:Class"``; ``options`` go to its constructor.

    ``init`` names the initialisation rule of the implementation the mixer reproduces (one of
    ``mixerzoo.models.init.INIT_RULES``); None keeps what its constructor gives.
    """
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"register_mixer: the name must be a non-empty string, got {name!r}")
    if isinstance(cls, str):
        if ":" not in cls and "." not in cls:
            raise RegistryError(f"register_mixer({name!r}): {cls!r} is not of the form 'package.module:Class'")
    elif not isinstance(cls, type):
        raise RegistryError(f"register_mixer({name!r}): cls must be a class or 'module:Class'")
    elif not _is_module_class(cls):
        raise RegistryError(f"register_mixer({name!r}): {cls.__qualname__} is not a torch.nn.Module subclass; "
                            f"a mixer is an nn.Module mapping [B, T, d_model] to [B, T, d_model]")
    spec = MixerSpec(name, cls, dict(options), summary, reference, source="register_mixer",
                     init=check_init_rule(init, f"register_mixer({name!r})"))
    REGISTRY.add(spec, overwrite=overwrite)
    return spec


def load_registry(path: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
    """Add every entry of a registry YAML file (all or none); returns the names added."""
    return REGISTRY.load_file(path, overwrite=overwrite)


def list_mixers() -> list[str]:
    return REGISTRY.names()


def get_mixer_spec(name: str) -> MixerSpec:
    return REGISTRY.get(name)


def resolve_mixer_class(name: str, spec: MixerSpec | None = None) -> type:
    """The class of a registered mixer; import failures name the known mixers too."""
    spec = spec or get_mixer_spec(name)
    try:
        return spec.resolve()
    except RegistryError as e:
        raise RegistryError(f"{e}. Known mixers: {REGISTRY.known()}") from e


def class_for_layer(name: str, class_path: str) -> type:
    """The mixer class a saved layer config names: the registered class object when ``name``
    is registered with that path (it may not be importable), else an import of the path."""
    found = REGISTRY.find_class(name, class_path)
    if found is not None:
        return found
    try:
        return import_class(class_path, f"mixer {name!r}")
    except RegistryError as e:
        raise RegistryError(f"{e}. Known mixers: {REGISTRY.known()}") from e


_OPTION_FREE_BASES = {"Mixer", "Module", "object"}


def accepted_options(cls: type) -> tuple[set[str], bool]:
    """``(named, open)``: the keyword options the constructor names (beyond d_model and
    layer_idx), and whether it also takes options it does not name.

    A ``**kwargs`` constructor that forwards to a base class's (LogLinearMamba2 → Mamba2)
    accepts that base's named options too; one whose next constructor is the plain mixer or
    module base keeps its ``**kwargs`` for itself and is open.
    """
    named: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is not cls and klass.__name__ in _OPTION_FREE_BASES:
            return named, True
        params = inspect.signature(klass.__init__).parameters
        named |= {
            n for n, p in params.items()
            if n not in ("self", "d_model", "layer_idx")
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return named, False
    return named, True


def check_options(name: str, cls: type, options: dict[str, Any]) -> None:
    """Raise a RegistryError naming the accepted options if any option is unknown."""
    named, open_ = accepted_options(cls)
    if open_:
        return
    unknown = sorted(set(options) - named)
    if unknown:
        raise RegistryError(
            f"mixer {name!r} ({cls.__name__}) got unknown option(s) {unknown}; "
            f"accepted: {sorted(named)}. Known mixers: {REGISTRY.known()}"
        )


def construct_mixer(cls: type, d_model: int, layer_idx: int, options: dict[str, Any], name: str | None = None):
    """``cls(d_model, layer_idx=i, **options)``, a constructor's TypeError turned into a
    RegistryError that names the mixer and the options it accepts."""
    try:
        mixer = cls(d_model, layer_idx=layer_idx, **options)
    except TypeError as e:
        named, _ = accepted_options(cls)
        raise RegistryError(
            f"mixer {name or cls.__name__!r} ({cls.__name__}) could not be built with options "
            f"{options}: {e}. Mixers are built as cls(d_model, layer_idx=i, **options); "
            f"options it names: {sorted(named)}"
        ) from e
    from torch import nn

    if not isinstance(mixer, nn.Module):
        raise RegistryError(
            f"mixer {name or cls.__name__!r} ({cls.__module__}.{cls.__name__}) built a "
            f"{type(mixer).__name__}, not a torch.nn.Module; a mixer is an nn.Module mapping "
            "[B, T, d_model] to [B, T, d_model] (subclass mixerzoo.mixers.base.Mixer)"
        )
    return mixer
