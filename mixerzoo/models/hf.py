"""The LM: ``MixerZooForCausalLM`` (a transformers ``PreTrainedModel``) over the backbone.

``save_pretrained`` / ``from_pretrained`` (safetensors) and ``AutoModelForCausalLM`` work as
for any transformers model (the Auto registration is the last lines of this file);
``generate`` and the recurrent decoding methods come from :mod:`mixerzoo.models.generation`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..registry import accepted_options, check_options, class_for_layer, construct_mixer
from .arguments import FORWARD_NEUTRAL, refuse_kwargs, value_checks_allowed
from .backbone import Block, RMSNorm
from .config import CheckpointError, MixerZooConfig
from .generation import RecurrentDecoding
from .options import check_option_types


def _build_mixer(layer: dict[str, Any], d_model: int, layer_idx: int, kernels: str) -> nn.Module:
    name = layer.get("mixer", "?")
    cls = class_for_layer(name, layer["class"])
    options = dict(layer.get("options") or {})
    check_options(name, cls, options)
    check_option_types(name, cls, options)
    if getattr(cls, "accepts_kernels", False) and "kernels" in accepted_options(cls)[0]:
        options["kernels"] = kernels  # the model's choice, for every mixer that has such ops
    return construct_mixer(cls, d_model, layer_idx, options, name)


class MixerZooForCausalLM(RecurrentDecoding, PreTrainedModel):
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
    # transformers' Trainer passes num_items_in_batch to a forward that takes **kwargs unless
    # told not to; our loss is a plain mean, so that argument must never be sent (it is refused).
    accepts_loss_kwargs = False

    def __init__(self, config: MixerZooConfig):
        super().__init__(config)
        if not config.layers:
            raise ValueError("MixerZooConfig.layers is empty: build models with build_model(...)")
        d, kernels = config.d_model, config.kernels
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(
            Block(_build_mixer(layer, d, i, kernels), d, config.mlp_hidden, config.norm_eps, kernels)
            for i, layer in enumerate(config.layers)
        )
        self.norm = RMSNorm(d, config.norm_eps, kernels)
        # A tied head reuses the embedding matrix directly, so there is no second parameter
        # for save/load to tie back together.
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """transformers' loader, except that a checkpoint whose weights do not match its config
        (missing, unexpected or mismatched tensors) is an error instead of a model with freshly
        random weights and a logged warning. Used by ``AutoModelForCausalLM`` too."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        bad = {k: sorted(map(str, v)) for k, v in info.items()
               if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in bad.items())
            raise CheckpointError(f"{pretrained_model_name_or_path}: checkpoint weights do not match its config "
                                  f"({detail}); refusing to fill them with random values")
        return (model, info) if want_info else model

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's forward during backward (memory for about a third more time)."""
        self.gradient_checkpointing = bool(enabled)

    # --- weights -------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """The reference initialisation of ``config.init`` (see :mod:`mixerzoo.models.init`).

        transformers calls this once after construction and again after loading a checkpoint,
        when the loaded tensors are flagged and left alone. It replaces transformers'
        per-module walk, which skips modules without parameters of their own (the SwiGLU MLP,
        the attention block) in models defined outside transformers.
        """
        from .init import init_model

        init_model(self)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' hook for single new modules (e.g. resize_token_embeddings)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # --- forward ---------------------------------------------------------------------------
    def _head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), self._head_weight())

    def _check_ids(self, input_ids: Any, name: str = "input_ids", dims: int = 2) -> None:
        """Metadata only (no sync): a tensor of integer ids with ``dims`` dimensions, T > 0."""
        shape = "[B, T]" if dims == 2 else "[B]"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{name} must be an integer tensor {shape}, got {type(input_ids).__name__}")
        if input_ids.dim() != dims or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor {shape}, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"{name} has no tokens (shape {tuple(input_ids.shape)})")

    def _check_values(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, name: str = "input_ids") -> None:
        """Token ids within the vocabulary, labels within it or -100, no padding in the mask.

        The embedding would otherwise fail with "index out of range in self" on CPU, a
        device-side assert on GPU, and a fused loss might read out of bounds unnoticed. All
        statistics travel in one small tensor, so this is one host sync per call; it is skipped
        while torch.compile traces or a CUDA graph is captured (see value_checks_allowed). A
        CUDA training step (grad enabled, no mask) checks on the device instead, without a sync.
        """
        if not value_checks_allowed(input_ids):
            return
        vocab = self.embed.num_embeddings
        if input_ids.is_cuda and torch.is_grad_enabled() and attention_mask is None:
            # a training step: no host sync per step; the device checks and fails the run later
            # with this message if an id is out of range (the trainer's data cannot be: its
            # vocabulary covers the tokenizer's)
            ok = (input_ids >= 0).all() & (input_ids < vocab).all()
            if labels is not None:
                ok = ok & ((labels == -100) | ((labels >= 0) & (labels < vocab))).all()
                ok = ok & (labels[:, 1:] != -100).any()
            torch._assert_async(ok, f"input_ids or labels hold token ids outside [0, {vocab}), "
                                    f"or every label is -100")
            return
        stats = [input_ids.min(), input_ids.max()]
        if labels is not None:
            real = labels != -100
            stats += [torch.where(real, labels, 0).min(), torch.where(real, labels, 0).max(), real[:, 1:].any()]
        if attention_mask is not None:
            stats.append((attention_mask == 1).all())
        values = torch.stack([v.to(torch.int64) for v in stats]).tolist()
        if attention_mask is not None and not values[-1]:
            raise ValueError("padded batches (attention_mask with values other than 1) are not supported; "
                             "batch sequences of equal length or run them one by one")
        if labels is not None and not values[4]:
            # the mean over zero targets would come back as nan
            raise ValueError("labels: every target (labels[:, 1:]) is -100 (ignored), so there is no loss "
                             "to average; leave at least one target or call without labels")
        for what, t, lo, hi, extra in ((name, input_ids, *values[:2], ""),
                                       *((("labels", labels, *values[2:4], " (or -100, ignored)"),)
                                         if labels is not None else ())):
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                if what == "labels":
                    bad = int(labels[(labels != -100) & ((labels < 0) | (labels >= vocab))][0])
                where = tuple((t == bad).nonzero()[0].tolist())
                raise ValueError(f"{what} holds token id {bad} at position {where}, outside the vocabulary "
                                 f"of {vocab} tokens (ids must be in [0, {vocab}){extra})")

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> CausalLMOutput:
        # All validation of this surface is here, before any compute. attention_mask is
        # accepted for API compatibility (HF collators send all-ones masks); left padding is not
        # supported by recurrent mixers, so a mask with zeros is refused rather than ignored.
        if kwargs:
            refuse_kwargs("MixerZooForCausalLM.forward", kwargs, FORWARD_NEUTRAL,
                           "Arguments: input_ids, labels, attention_mask (all ones), return_logits; "
                           "transformers' cache/hidden-state/embedding options only at their defaults.")
        self._check_ids(input_ids)
        if not isinstance(return_logits, bool):
            raise TypeError(f"return_logits must be True or False, got {return_logits!r}")
        if labels is not None:
            # int64 only: cross-entropy refuses int32 targets deep inside with a message naming neither
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
                got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise TypeError(f"labels must be an int64 tensor [B, T] (the input ids, -100 ignored), got {got}")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
            if input_ids.shape[1] < 2:
                # position t predicts token t + 1: with one token there is no target, and the
                # mean over zero targets would come back as nan
                raise ValueError(f"labels: next-token loss needs T >= 2 tokens per sequence, got input_ids "
                                 f"of shape {tuple(input_ids.shape)}")
        if labels is None and not return_logits:
            raise ValueError("return_logits=False only makes sense with labels (the loss is all that is returned)")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must be a tensor of the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {got}")
        self._check_values(input_ids, labels, attention_mask)
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
        if self.config.kernels != "fused":
            logits = F.linear(h, self._head_weight())
            return F.cross_entropy(logits.float(), targets, ignore_index=-100)
        return linear_cross_entropy(h, self._head_weight(), targets, ignore_index=-100)

    # --- introspection -----------------------------------------------------------------------
    def backends(self) -> dict[str, str | None]:
        """What each layer's sequence op ran last ("torch", "triton", "sdpa", ...; None before a
        forward). What the small ops run is :attr:`kernels` (and ``print(model)``, per module)."""
        return {f"layer{i}.{type(b.mixer).__name__}": getattr(b.mixer, "last_backend", None)
                for i, b in enumerate(self.blocks)}

    def with_kernels(self, kernels: str) -> "MixerZooForCausalLM":
        """A twin of this model, the same weights on the same device, whose small ops run
        ``kernels`` ("fused" or "reference"): how the fused ops are checked against their
        reference through whole models."""
        import copy

        from ..ops.fused import check_kernels

        config = copy.deepcopy(self.config)
        config.kernels = check_kernels(kernels)
        weight = self.embed.weight
        with torch.random.fork_rng(devices=[]):  # building initialises: leave the caller's RNG alone
            twin = type(self)(config)
        twin = twin.to(device=weight.device, dtype=weight.dtype)
        twin.load_state_dict(self.state_dict())
        twin.gradient_checkpointing = self.gradient_checkpointing
        return twin.train(self.training)

    @property
    def kernels(self) -> str:
        """``"fused"`` (norms, SwiGLU, short conv, rotary and the loss as fused ops) or
        ``"reference"`` (the plain torch code), fixed when the model was built."""
        return self.config.kernels

    def state_size(self, seq_len: int) -> int:
        """Elements of recurrent state per sequence after ``seq_len`` tokens, all layers."""
        for i, b in enumerate(self.blocks):
            if not hasattr(b.mixer, "state_size"):
                raise NotImplementedError(f"layer {i}'s mixer {type(b.mixer).__name__} has no state_size")
        return sum(b.mixer.state_size(seq_len) for b in self.blocks)


AutoConfig.register("mixerzoo", MixerZooConfig, exist_ok=True)
AutoModelForCausalLM.register(MixerZooConfig, MixerZooForCausalLM, exist_ok=True)
