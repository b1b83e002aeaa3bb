"""mixerzoo: a zoo of sequence mixers behind one model API.

>>> from mixerzoo import build_model
>>> model = build_model("loglinear_adaptive", size="350m")   # doctest: +SKIP

Heavy modules (transformers, the mixers) are imported on first use, so ``import mixerzoo``
and ``mixerzoo list`` stay fast. ``import mixerzoo`` still makes transformers' Auto classes
know the ``mixerzoo`` architecture: the registration runs when transformers' auto-model module
is imported (at once, if it already is), so ``AutoModelForCausalLM.from_pretrained(ckpt)``
works after a bare ``import mixerzoo``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

from .registry import list_mixers, load_registry, register_mixer

__version__ = "0.1.0"
__all__ = ["build_model", "build_config", "list_mixers", "load_registry", "register_mixer", "load_model"]


def build_model(name, size: str = "tiny", **kwargs: Any):
    from .models.build import build_model as _build

    return _build(name, size, **kwargs)


def build_config(name, size: str = "tiny", **kwargs: Any):
    from .models.build import build_config as _build

    return _build(name, size, **kwargs)


def load_model(path: str, **kwargs: Any):
    """Load a saved mixerzoo model directory (``save_pretrained`` output)."""
    from .models.io import load_model as _load

    return _load(path, **kwargs)


# --- transformers' Auto classes ---------------------------------------------------------------
_AUTO_MODULE = "transformers.models.auto.modeling_auto"


def _register_auto_classes() -> None:
    from .models import hf  # noqa: F401  (its last lines register the config and the LM)


class _AutoClassesHook(importlib.abc.MetaPathFinder):
    """Registers mixerzoo with transformers' Auto classes right after their module loads.

    It finds nothing itself: for transformers' auto-model module it asks the other finders for
    the real spec and wraps its loader, so that the registration follows the module's own code.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                _register_auto_classes()

        spec.loader = _Loader()
        return spec


if _AUTO_MODULE in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _AutoClassesHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoClassesHook())
