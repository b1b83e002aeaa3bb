"""The model configuration: one backbone, a mixer per layer, sizes that are comparable."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..ops.fused import check_kernels
from ..registry import check_init_rule
from .init import check_init


class CheckpointError(RuntimeError):
    """A saved model cannot be loaded as it is; the message says which file and why."""


# Fields without which a saved config cannot describe the model it came from: the constructor's
# defaults for them exist for code that builds a config by hand, never for filling a file's gaps.
REQUIRED_FIELDS = ("layers", "d_model", "vocab_size", "mlp_hidden")


def check_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False, where: str = "") -> None:
    """Raise unless ``value`` is an int (not a bool) >= ``minimum`` (or None when ``optional``).

    bool is refused although it is an int subclass: ``True`` as a width or count is a slip,
    not a request for 1.
    """
    if optional and value is None:
        return
    prefix = f"{where}: " if where else ""
    allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{prefix}{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{prefix}{name} must be {allowed}, got {value!r}")


def check_layers(layers: Any, where: str = "") -> None:
    """``layers`` must be a non-empty list of ``{"mixer": str, "class": str, "options": dict}``."""
    prefix = f"{where}: " if where else ""
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{prefix}layers must be a non-empty list of layer entries "
                         f"({{'mixer', 'class', 'options'}}), got {layers!r}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ValueError(f"{prefix}layers[{i}] must be a mapping, got {layer!r}")
        for key in ("mixer", "class"):
            if not isinstance(layer.get(key), str) or not layer[key]:
                raise ValueError(f"{prefix}layers[{i}] needs a non-empty string {key!r}, got {layer.get(key)!r}")
        if not isinstance(layer.get("options", {}) or {}, dict):
            raise ValueError(f"{prefix}layers[{i}]['options'] must be a mapping, got {layer['options']!r}")
        check_init_rule(layer.get("init"), f"{prefix}layers[{i}]")


class MixerZooConfig(PretrainedConfig):
    """Configuration of a mixerzoo causal LM.

    ``layers`` holds one entry per layer, ``{"mixer": name, "class": "module:Class",
    "options": {...}, "init": rule}``, so that hybrids are a list rather than side channels and
    a saved model can be rebuilt from its class paths even where the registry name is unknown.
    ``init`` says how a fresh model is initialised: ``"reference"`` (each layer by the rule of
    the implementation it reproduces) or one rule for all (:mod:`mixerzoo.models.init`).
    ``kernels`` says which implementation of the small ops every module runs (``"fused"`` or
    ``"reference"``, :mod:`mixerzoo.ops.fused`).
    """

    model_type = "mixerzoo"

    def __init__(
        self,
        layers: list[dict[str, Any]] | None = None,
        d_model: int = 64,
        vocab_size: int = 32000,
        mlp_hidden: int = 0,
        tie_embeddings: bool = True,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        embedding_init_std: float | None = None,
        size: str | None = None,
        init: str = "reference",
        kernels: str = "fused",
        **kwargs: Any,
    ):
        self.layers = [dict(layer) for layer in (layers or [])]
        self.d_model = d_model
        self.vocab_size = vocab_size
        self.mlp_hidden = mlp_hidden
        self.tie_embeddings = tie_embeddings
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        # None: initializer_range. Tiny models learning recall tasks in few steps need token
        # identities that stand out in the residual stream (std 1, untied head) — see evals.
        self.embedding_init_std = embedding_init_std
        self.size = size
        self.init = check_init(init)
        # "fused" | "reference": the implementation of the small ops, fixed when the model is
        # built (configs saved before the field existed ran the fused ops by default)
        self.kernels = check_kernels(kernels)
        # transformers reads these generic names (generation, device maps, lm-eval).
        kwargs.setdefault("hidden_size", d_model)
        kwargs.setdefault("num_hidden_layers", len(self.layers))
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A config read from a file (``from_pretrained``, ``AutoConfig``): every field that
        shapes the model must be there and valid, since a constructor default filled in for a
        missing one would build a different model than the one saved."""
        where = f"config {kwargs.get('name_or_path') or config_dict.get('_name_or_path') or ''}".strip()
        try:
            cls._check_loaded(config_dict, kwargs, where)
        except (TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from e
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def _check_loaded(cls, config_dict: dict[str, Any], kwargs: dict[str, Any], where: str) -> None:
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"{where}: model_type is {model_type!r}, not {cls.model_type!r}; this config "
                             "describes another architecture (load it with the library that wrote it)")
        missing = [f for f in REQUIRED_FIELDS if f not in config_dict and f not in kwargs]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {missing}; a mixerzoo config.json "
                             f"needs {list(REQUIRED_FIELDS)} (save it with save_pretrained)")
        merged = {**config_dict, **{k: v for k, v in kwargs.items() if k in REQUIRED_FIELDS}}
        check_layers(merged["layers"], where)
        check_int("d_model", merged["d_model"], where=where)
        check_int("vocab_size", merged["vocab_size"], where=where)
        check_int("mlp_hidden", merged["mlp_hidden"], where=where)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def mixer(self) -> str:
        """The mixer name, or ``"hybrid(a,b,...)"`` when the layers differ."""
        names = list(dict.fromkeys(layer["mixer"] for layer in self.layers))
        return names[0] if len(names) == 1 else f"hybrid({','.join(names)})"
