"""Type checks of a mixer's integer options, read from its constructor's signature."""

from __future__ import annotations

import inspect
from typing import Any

from ..registry import RegistryError


def _int_options(cls: type) -> dict[str, bool]:
    """Constructor options of ``cls`` (and the bases its ``**kwargs`` forwards to) that take an
    integer: name -> whether None is allowed too.

    Mixers check their own options with ``isinstance(value, int)``, which lets ``True`` through
    as 1; the signature says what was meant, so it is read here rather than trusted to each mixer.
    An option is integer when its annotation is ``int`` (or ``int | None``), or, unannotated,
    when its default is an int.
    """
    found: dict[str, bool] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            break
        for n, prm in params.items():
            if n in ("self", "d_model", "layer_idx") or n in found:
                continue
            ann = prm.annotation
            ann = ann if isinstance(ann, str) else getattr(ann, "__name__", None) if ann is not prm.empty else None
            if ann is not None:
                parts = {a.strip() for a in ann.replace("Optional[", "").rstrip("]").split("|")}
                if "int" in parts and parts <= {"int", "None"}:
                    found[n] = "None" in parts or prm.default is None
            elif isinstance(prm.default, int) and not isinstance(prm.default, bool):
                found[n] = False
        if not any(prm.kind is inspect.Parameter.VAR_KEYWORD for prm in params.values()):
            break
    return found


def check_option_types(name: str, cls: type, options: dict[str, Any]) -> None:
    """Refuse a bool or non-integer value for an integer mixer option, naming it."""
    for opt, none_ok in _int_options(cls).items():
        if opt in options:
            value = options[opt]
            if value is None and none_ok:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise RegistryError(
                    f"mixer {name!r} ({cls.__name__}): option {opt} must be an integer"
                    f"{' or None' if none_ok else ''}, got {value!r} ({type(value).__name__})"
                )
