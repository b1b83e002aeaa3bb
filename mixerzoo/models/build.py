"""``build_model``: registry name + size → a parameter-matched ``MixerZooForCausalLM``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..registry import check_options, class_for_layer, construct_mixer, get_mixer_spec, resolve_mixer_class
from .config import MixerZooConfig
from .sizes import (
    get_size,
    mixer_param_count,
    non_embedding_params,
    size_defaults,
    softmax_mlp_width,
    solve_mlp_width,
)

DEFAULT_VOCAB = 32000  # GPT-NeoX / Llama-2 scale; a tokenizer's own size overrides it


@dataclass(frozen=True)
class LayerPlan:
    name: str
    class_path: str
    options: dict[str, Any]
    params: int


def _plan_layers(
    names: Sequence[str], d_model: int, n_layers: int, size: str, mixer_options: dict[str, Any] | None
) -> list[LayerPlan]:
    preset = get_size(size)
    plans = []
    for i in range(n_layers):
        name = names[i % len(names)]
        spec = get_mixer_spec(name)
        cls = resolve_mixer_class(name, spec)
        options = size_defaults(cls, preset, {**spec.options, **(mixer_options or {})})
        check_options(name, cls, options)
        plans.append(LayerPlan(name, spec.class_path, options, mixer_param_count(cls, d_model, i, options, name)))
    return plans


def param_target(size: str, d_model: int | None = None, n_layers: int | None = None) -> int:
    """Non-embedding parameters of the reference ``softmax`` model at this size."""
    preset = get_size(size)
    d = d_model or preset.d_model
    plans = _plan_layers(["softmax"], d, n_layers or preset.n_layers, size, None)
    return non_embedding_params([p.params for p in plans], d, softmax_mlp_width(d))


def build_config(
    name: str | Sequence[str],
    size: str = "tiny",
    *,
    vocab_size: int | None = None,
    d_model: int | None = None,
    n_layers: int | None = None,
    mixer_options: dict[str, Any] | None = None,
    mlp_hidden: int | None = None,
    match_params: bool = True,
    tie_embeddings: bool = True,
    embedding_init_std: float | None = None,
) -> MixerZooConfig:
    """The config ``build_model`` would build (see there); cheap, allocates no weights."""
    preset = get_size(size)
    if not isinstance(name, str) and not (isinstance(name, Sequence) and all(isinstance(n, str) for n in name)):
        raise TypeError(f"name must be a mixer name or a list of names (a hybrid), got {name!r}")
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("name must be a mixer name or a non-empty list of names (a hybrid)")
    d = d_model or preset.d_model
    n = n_layers or preset.n_layers
    if n % len(names):
        raise ValueError(f"a hybrid of {len(names)} mixers needs n_layers divisible by {len(names)}, got {n}")
    plans = _plan_layers(names, d, n, size, mixer_options)
    if mlp_hidden is None:
        if match_params:
            target = param_target(size, d, n)
            mlp_hidden = solve_mlp_width([p.params for p in plans], d, target, what=f"{names} at {size}")
        else:
            mlp_hidden = softmax_mlp_width(d)
    return MixerZooConfig(
        layers=[{"mixer": p.name, "class": p.class_path, "options": p.options} for p in plans],
        d_model=d,
        vocab_size=vocab_size or DEFAULT_VOCAB,
        mlp_hidden=mlp_hidden,
        tie_embeddings=tie_embeddings,
        embedding_init_std=embedding_init_std,
        size=size,
    )


def build_model(name: str | Sequence[str], size: str = "tiny", **kwargs: Any):
    """A causal LM with mixer ``name`` (or a list of names repeated over the layers: a hybrid).

    Keyword options: ``vocab_size`` (default 32,000), ``d_model`` / ``n_layers`` (override the
    size's width / depth; the parameter target follows them), ``mixer_options`` (passed to
    every mixer), ``mlp_hidden`` (skip matching), ``match_params`` (default True),
    ``tie_embeddings`` (default True), ``embedding_init_std`` (default: 0.02, the
    initializer range).

    >>> model = build_model("loglinear_adaptive", size="350m")   # doctest: +SKIP
    """
    from .hf import MixerZooForCausalLM

    return MixerZooForCausalLM(build_config(name, size, **kwargs))


def count_non_embedding(model) -> int:
    cfg = model.config
    return non_embedding_params(
        [sum(p.numel() for p in b.mixer.parameters()) for b in model.blocks], cfg.d_model, cfg.mlp_hidden
    )


def param_rows(size: str, mixers: Sequence[str] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """One row per mixer at ``size``: non-embedding params, deviation from target, state sizes."""
    import torch

    from ..registry import list_mixers
    target = param_target(size, kwargs.get("d_model"), kwargs.get("n_layers"))
    rows = []
    for name in mixers or list_mixers():
        cfg = build_config(name, size, **kwargs)
        mixer_params, states = [], {2048: 0, 16384: 0}
        with torch.device("meta"):
            for i, layer in enumerate(cfg.layers):
                mixer = construct_mixer(class_for_layer(name, layer["class"]), cfg.d_model, i, layer["options"], name)
                mixer_params.append(sum(p.numel() for p in mixer.parameters()))
                for t in states:
                    # a mixer without recurrent decoding has no state size to report
                    try:
                        states[t] = None if states[t] is None else states[t] + mixer.state_size(t)
                    except (AttributeError, NotImplementedError):
                        states[t] = None
        params = non_embedding_params(mixer_params, cfg.d_model, cfg.mlp_hidden)
        rows.append({
            "mixer": name,
            "params": params,
            "deviation": (params - target) / target,
            "mlp_hidden": cfg.mlp_hidden,
            "embedding": cfg.vocab_size * cfg.d_model,
            "state_2k": states[2048],
            "state_16k": states[16384],
        })
    return rows
