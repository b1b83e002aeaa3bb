"""``build_model``: registry name + size → a parameter-matched ``MixerZooForCausalLM``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import nn

from ..ops.fused import check_kernels, default_kernels
from ..registry import (
    RegistryError,
    check_options,
    class_for_layer,
    get_mixer_spec,
    resolve_mixer_class,
)
from .config import MixerZooConfig, check_int
from .init import check_init
from .options import check_option_types
from .sizes import (
    construct_on_meta,
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
    init: str | None = None


def _dims(size: str, d_model: Any, n_layers: Any) -> tuple[int, int]:
    """Width and depth: the given ones, validated, else the size's (None means "the size's")."""
    preset = get_size(size)
    check_int("d_model", d_model, optional=True)
    check_int("n_layers", n_layers, optional=True)
    return (preset.d_model if d_model is None else d_model), (preset.n_layers if n_layers is None else n_layers)


def _plan_layers(
    names: Sequence[str], d_model: int, n_layers: int, size: str, mixer_options: dict[str, Any] | None
) -> list[LayerPlan]:
    preset = get_size(size)
    plans = []
    for i in range(n_layers):
        name = names[i % len(names)]
        spec = get_mixer_spec(name)
        if "kernels" in spec.options and getattr(resolve_mixer_class(name, spec), "accepts_kernels", False):
            raise RegistryError(f"mixer {name!r}: its registry options set kernels={spec.options['kernels']!r}, "
                                "a model option: build_model(..., kernels='fused' | 'reference')")
        cls = resolve_mixer_class(name, spec)
        options = size_defaults(cls, preset, {**spec.options, **(mixer_options or {})})
        check_options(name, cls, options)
        check_option_types(name, cls, options)
        plans.append(LayerPlan(name, spec.class_path, options, mixer_param_count(cls, d_model, i, options, name),
                               spec.init))
    return plans


def param_target(size: str, d_model: int | None = None, n_layers: int | None = None) -> int:
    """Non-embedding parameters of the reference ``softmax`` model at this size."""
    d, n = _dims(size, d_model, n_layers)
    plans = _plan_layers(["softmax"], d, n, size, None)
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
    init: str = "reference",
    kernels: str | None = None,
) -> MixerZooConfig:
    """The config ``build_model`` would build (see there); cheap, allocates no weights."""
    if not isinstance(size, str):
        raise TypeError(f"size must be a size name (str), got {size!r}")
    if not isinstance(name, str) and not (isinstance(name, Sequence) and all(isinstance(n, str) for n in name)):
        raise TypeError(f"name must be a mixer name or a list of names (a hybrid), got {name!r}")
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("name must be a mixer name or a non-empty list of names (a hybrid)")
    if any(not n for n in names):
        raise ValueError(f"name: mixer names must be non-empty strings, got {names!r}")
    # All options are checked before anything is planned, so that an explicit 0 can never fall
    # through to a default (as `value or DEFAULT` would let it).
    d, n = _dims(size, d_model, n_layers)
    check_init(init)
    kernels = default_kernels() if kernels is None else check_kernels(kernels)
    check_int("vocab_size", vocab_size, optional=True)
    check_int("mlp_hidden", mlp_hidden, optional=True)
    for flag, value in (("match_params", match_params), ("tie_embeddings", tie_embeddings)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r} ({type(value).__name__})")
    if embedding_init_std is not None and (
        isinstance(embedding_init_std, bool) or not isinstance(embedding_init_std, (int, float))
        or not embedding_init_std > 0 or embedding_init_std == float("inf")
    ):
        raise ValueError(f"embedding_init_std must be a finite number > 0 or None, got {embedding_init_std!r}")
    if mixer_options is not None and (
        not isinstance(mixer_options, dict) or not all(isinstance(k, str) for k in mixer_options)
    ):
        raise TypeError(f"mixer_options must be a dict of option name -> value or None, got {mixer_options!r}")
    if mixer_options and "kernels" in mixer_options:
        raise ValueError(f"mixer_options: kernels={mixer_options['kernels']!r} is a model option, set for every "
                         "module at once: build_model(..., kernels='fused' | 'reference')")
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
        layers=[{"mixer": p.name, "class": p.class_path, "options": p.options, "init": p.init} for p in plans],
        d_model=d,
        vocab_size=DEFAULT_VOCAB if vocab_size is None else vocab_size,
        mlp_hidden=mlp_hidden,
        tie_embeddings=tie_embeddings,
        embedding_init_std=embedding_init_std,
        size=size,
        init=init,
        kernels=kernels,
    )


def build_model(name: str | Sequence[str], size: str = "tiny", **kwargs: Any):
    """A causal LM with mixer ``name`` (or a list of names repeated over the layers: a hybrid).

    Keyword options: ``vocab_size`` (default 32,000), ``d_model`` / ``n_layers`` (override the
    size's width / depth; the parameter target follows them), ``mixer_options`` (passed to
    every mixer), ``mlp_hidden`` (skip matching), ``match_params`` (default True),
    ``tie_embeddings`` (default True), ``embedding_init_std`` (default: 0.02, the
    initializer range), ``init`` (default ``"reference"``: every layer starts as the
    implementation its mixer reproduces; or one rule of :mod:`mixerzoo.models.init` for all),
    ``kernels`` (``"fused"`` or ``"reference"``: the small ops' implementation, see
    :mod:`mixerzoo.ops.fused`; default fused unless ``MIXERZOO_FUSED=0``).

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
    from ..registry import list_mixers
    target = param_target(size, kwargs.get("d_model"), kwargs.get("n_layers"))
    rows = []
    for name in list_mixers() if mixers is None else mixers:
        cfg = build_config(name, size, **kwargs)
        mixer_params, states = [], {2048: 0, 16384: 0}
        for i, layer in enumerate(cfg.layers):
            mixer = construct_on_meta(class_for_layer(name, layer["class"]), cfg.d_model, i, layer["options"], name)
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


def no_decay_names(model: "nn.Module") -> set[str]:
    """Parameters without weight decay: vectors (norm gains, biases, per-head scalars such as
    A_log, D, dt_bias, λ tables) and anything a mixer marks with ``_no_weight_decay``."""
    return {n for n, p in model.named_parameters() if p.dim() < 2 or getattr(p, "_no_weight_decay", False)}


def weight_decay_groups(model: "nn.Module", weight_decay: float,
                        no_decay: set[str] | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on matrices only (see :func:`no_decay_names`), for LM
    training and the synthetic sweeps alike. ``no_decay`` defaults to ``no_decay_names(model)``."""
    no_decay = no_decay_names(model) if no_decay is None else no_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0},
    ]
