"""The model configuration: one backbone, a mixer per layer, sizes that are comparable."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class MixerZooConfig(PretrainedConfig):
    """Configuration of a mixerzoo causal LM.

    ``layers`` holds one entry per layer, ``{"mixer": name, "class": "module:Class",
    "options": {...}}``, so that hybrids are a list rather than side channels and a saved model
    can be rebuilt from its class paths even where the registry name is unknown.
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
        # transformers reads these generic names (generation, device maps, lm-eval).
        kwargs.setdefault("hidden_size", d_model)
        kwargs.setdefault("num_hidden_layers", len(self.layers))
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def mixer(self) -> str:
        """The mixer name, or ``"hybrid(a,b,...)"`` when the layers differ."""
        names = list(dict.fromkeys(layer["mixer"] for layer in self.layers))
        return names[0] if len(names) == 1 else f"hybrid({','.join(names)})"
