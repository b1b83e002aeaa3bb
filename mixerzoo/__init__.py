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
    """Import the LM, whose last lines register it with transformers' Auto classes. Never fails
    the import that called it: where the LM cannot be imported now (another thread importing it,
    a broken install), it says so, and the LM registers itself whenever it is imported."""
    if "mixerzoo.models.hf" in sys.modules:
        return  # imported or being imported: it registers itself
    try:
        from .models import hf  # noqa: F401
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"mixerzoo could not register with transformers' Auto classes now "
                      f"({type(e).__name__}: {e}); `import mixerzoo.models.hf` registers it", stacklevel=2)


class _AutoClassesHook(importlib.abc.MetaPathFinder):
    """Registers mixerzoo with transformers' Auto classes right after their module loads.

    It finds nothing itself: for transformers' auto-model module it asks the other finders for
    the real spec and wraps its loader, so that the registration follows the module's own code.
    It leaves ``sys.meta_path`` once that module has run.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTO_MODULE or getattr(self, "_looking", False):
            return None
        self._looking = True  # the lookup below must not come back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        real, hook = spec.loader, self

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                if hook in sys.meta_path:
                    sys.meta_path.remove(hook)
                _register_auto_classes()

        spec.loader = _Loader()
        return spec


if _AUTO_MODULE in sys.modules:
    _register_auto_classes()
elif not any(type(f).__name__ == "_AutoClassesHook" for f in sys.meta_path):
    sys.meta_path.insert(0, _AutoClassesHook())
