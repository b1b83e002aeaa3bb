"""The transformers face of the backbone: ``MixerZooForCausalLM`` (a ``PreTrainedModel``).

``save_pretrained`` / ``from_pretrained`` (safetensors) and ``AutoModelForCausalLM`` work as
for any transformers model; ``generate`` is our own, stepping each mixer's recurrent state
(KV cache for softmax, Fenwick levels for log-linear, SSM state for Mamba-2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..ops.fused import fused_enabled
from ..registry import check_options, class_for_layer, construct_mixer
from .backbone import Block, RMSNorm, SwiGLU
from .config import MixerZooConfig


def _build_mixer(layer: dict[str, Any], d_model: int, layer_idx: int) -> nn.Module:
    name = layer.get("mixer", "?")
    cls = class_for_layer(name, layer["class"])
    options = dict(layer.get("options") or {})
    check_options(name, cls, options)
    return construct_mixer(cls, d_model, layer_idx, options, name)


class MixerZooForCausalLM(PreTrainedModel):
    """Causal LM: token embedding → blocks (one mixer each) → final RMSNorm → LM head.

    ``forward(input_ids [B, T], labels=None) -> CausalLMOutput(loss, logits [B, T, V])``;
    labels are the inputs themselves (shifted inside, -100 ignored), as in transformers.
    ``return_logits=False`` with labels computes the loss chunk by chunk without ever holding
    the ``[B, T, V]`` logits (they come back as None): what training uses.
    ``set_activation_checkpointing(True)`` recomputes each block in backward instead of
    keeping its activations (transformers' ``gradient_checkpointing_enable`` does the same).
    """

    config_class = MixerZooConfig
    base_model_prefix = "mixerzoo"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True

    def __init__(self, config: MixerZooConfig):
        super().__init__(config)
        if not config.layers:
            raise ValueError("MixerZooConfig.layers is empty: build models with build_model(...)")
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(
            Block(_build_mixer(layer, d, i), d, config.mlp_hidden, config.norm_eps)
            for i, layer in enumerate(config.layers)
        )
        self.norm = RMSNorm(d, config.norm_eps)
        # A tied head reuses the embedding matrix directly, so there is no second parameter
        # for save/load to tie back together.
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's forward during backward (memory for about a third more time)."""
        self.gradient_checkpointing = bool(enabled)

    # --- weights -------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        # Only the backbone's own modules: each mixer initialises itself (Mamba-2's dt and A,
        # the λ MLP's zero output layer) and must not be overwritten here.
        std = self.config.initializer_range
        if module is self.embed:
            nn.init.normal_(module.weight, std=self.config.embedding_init_std or std)
        elif module is self.lm_head:
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, SwiGLU):
            nn.init.normal_(module.gate_up.weight, std=std)
            # GPT-2's residual scaling: each block adds to the stream twice.
            nn.init.normal_(module.down.weight, std=std / math.sqrt(2 * len(self.config.layers)))
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # --- forward ---------------------------------------------------------------------------
    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self._head_weight())

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (T = 0)")

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> CausalLMOutput:
        # attention_mask is accepted for API compatibility; left padding is not supported by
        # recurrent mixers, so a mask with zeros is refused rather than silently ignored.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches (attention_mask with zeros) are not supported; "
                             "batch sequences of equal length or run them one by one")
        self._check_ids(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        if labels is None and not return_logits:
            raise ValueError("return_logits=False only makes sense with labels (the loss is all that is returned)")
        h = self.embed(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        if not return_logits:
            return CausalLMOutput(loss=self._chunked_loss(h, labels), logits=None)
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def _chunked_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of h ``[B, T, d]`` without the full logits."""
        from ..ops.cross_entropy import linear_cross_entropy

        h = self.norm(h)[:, :-1].flatten(0, 1)
        targets = labels[:, 1:].flatten()
        if not fused_enabled():
            logits = F.linear(h, self._head_weight())
            return F.cross_entropy(logits.float(), targets, ignore_index=-100)
        return linear_cross_entropy(h, self._head_weight(), targets, ignore_index=-100)

    # --- recurrent decoding ------------------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> list[Any]:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        for i, blk in enumerate(self.blocks):
            if not all(hasattr(blk.mixer, m) for m in ("init_state", "step", "prefill")):
                raise NotImplementedError(
                    f"layer {i}'s mixer {type(blk.mixer).__name__} does not support recurrent "
                    "decoding (init_state/step/prefill; subclass mixerzoo.mixers.base.Mixer)"
                )
        return [blk.mixer.init_state(batch, device, dtype) for blk in self.blocks]

    def prefill(self, input_ids: torch.Tensor, state: list[Any] | None = None) -> tuple[torch.Tensor, list[Any]]:
        """Run ``input_ids [B, T]`` from ``state``; returns last-position logits [B, V] and the state."""
        self._check_ids(input_ids)
        if state is None:
            state = self.init_state(input_ids.shape[0])
        h = self.embed(input_ids)
        new_state = []
        for blk, s in zip(self.blocks, state):
            h, s = blk.prefill(h, s)
            new_state.append(s)
        return self._logits(h[:, -1]), new_state

    def step(self, token: torch.Tensor, state: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One token per sequence, ``token [B]``; returns logits [B, V] and the new state."""
        h = self.embed(token)
        new_state = []
        for blk, s in zip(self.blocks, state):
            h, s = blk.step(h, s)
            new_state.append(s)
        return self._logits(h), new_state

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Greedy or sampled continuation of ``input_ids [B, T]``; returns ``[B, T + n]``.

        The prompt is consumed by one parallel prefill, then each new token costs one
        recurrent step per layer. Sequences that emit ``eos_token_id`` keep emitting it.
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("generate does not support padded prompts; pass equal-length prompts")
        if max_new_tokens is None:
            if max_length is not None and max_length < input_ids.shape[1]:
                raise ValueError(f"max_length={max_length} is shorter than the prompt ({input_ids.shape[1]} tokens)")
            max_new_tokens = (max_length - input_ids.shape[1]) if max_length is not None else 20
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        out = input_ids
        if max_new_tokens == 0:
            return out
        logits, state = self.prefill(input_ids)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = _choose(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if eos:
                token = torch.where(done, torch.full_like(token, eos[0]), token)
                done |= torch.isin(token, torch.tensor(eos, device=token.device))
            out = torch.cat([out, token[:, None]], dim=1)
            if (eos and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits, state = self.step(token, state)
        return out

    # --- introspection -----------------------------------------------------------------------
    def backends(self) -> dict[str, str | None]:
        """What each layer's mixer ran last ("torch", "triton", "sdpa", ...; None before a forward)."""
        return {f"layer{i}.{type(b.mixer).__name__}": getattr(b.mixer, "last_backend", None)
                for i, b in enumerate(self.blocks)}

    def state_size(self, seq_len: int) -> int:
        """Elements of recurrent state per sequence after ``seq_len`` tokens, all layers."""
        for i, b in enumerate(self.blocks):
            if not hasattr(b.mixer, "state_size"):
                raise NotImplementedError(f"layer {i}'s mixer {type(b.mixer).__name__} has no state_size")
        return sum(b.mixer.state_size(seq_len) for b in self.blocks)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next token [B] from logits [B, V]: argmax, or a sample after temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


AutoConfig.register("mixerzoo", MixerZooConfig, exist_ok=True)
AutoModelForCausalLM.register(MixerZooConfig, MixerZooForCausalLM, exist_ok=True)
