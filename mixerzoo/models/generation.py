"""Decoding for the LM: a parallel prefill of the prompt, then one recurrent step per token.

:class:`RecurrentDecoding` is mixed into ``MixerZooForCausalLM``: ``init_state``, ``prefill``,
``step`` and ``generate`` (greedy or sampled, EOS, transformers' argument names) over each
mixer's recurrent state (KV cache for softmax, Fenwick levels for log-linear, SSM state for
Mamba-2). It uses the model's ``blocks``, ``embed``, ``_logits`` and input checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .arguments import GENERATE_FREE, GENERATE_NEUTRAL, refuse_kwargs
from .config import check_int


class RecurrentDecoding:
    """Decoding methods of the LM (a mixin: the model provides the modules and checks)."""

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
        self._check_values(input_ids)
        return self._prefill(input_ids, state)

    def _prefill(self, input_ids: torch.Tensor, state: list[Any] | None) -> tuple[torch.Tensor, list[Any]]:
        # generate() has validated the prompt already; not checking twice saves a host sync
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
        self._check_ids(token, "token", dims=1)
        if not isinstance(state, list) or len(state) != len(self.blocks):
            raise ValueError(f"state must be the list of {len(self.blocks)} per-layer states from init_state/"
                             f"prefill/step, got {type(state).__name__}"
                             + (f" of length {len(state)}" if isinstance(state, list) else ""))
        self._check_values(token, name="token")
        return self._step(token, state)

    def _step(self, token: torch.Tensor, state: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        # generate's inner loop: its tokens come from the model's own vocabulary, so the
        # per-step host sync of step()'s range check is not paid here
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
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled continuation of ``input_ids [B, T]``; returns ``[B, T + n]``.

        The prompt is consumed by one parallel prefill, then each new token costs one
        recurrent step per layer. Sequences that emit ``eos_token_id`` keep emitting it.

        ``max_new_tokens`` (default 20) or ``max_length`` (prompt included), not both;
        sampling (``do_sample=True``) takes ``temperature > 0``, ``top_k`` (an int >= 1; None
        disables it, 0 is refused rather than read as "disabled") and ``top_p`` in (0, 1]
        (1 disables it). transformers' other generation options are accepted only at their
        neutral values (``num_beams=1``, ``repetition_penalty=1.0``, ...); ``pad_token_id``,
        ``bos_token_id`` and ``use_cache`` are accepted and have no effect.
        """
        max_new_tokens, eos = self._generation_args(
            input_ids, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
            eos_token_id, generator, attention_mask, kwargs,
        )
        out = input_ids
        if max_new_tokens == 0:
            return out
        logits, state = self._prefill(input_ids, None)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = _choose(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if eos:
                token = torch.where(done, torch.full_like(token, eos[0]), token)
                done |= torch.isin(token, torch.tensor(eos, device=token.device))
            out = torch.cat([out, token[:, None]], dim=1)
            if (eos and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits, state = self._step(token, state)
        return out

    def _generation_args(self, input_ids, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
                         eos_token_id, generator, attention_mask, kwargs) -> tuple[int, list[int]]:
        """Every check of generate()'s arguments (once per call, before any compute); returns
        the number of new tokens and the list of EOS ids."""
        refuse_kwargs("MixerZooForCausalLM.generate", kwargs, GENERATE_NEUTRAL,
                       "Arguments: max_new_tokens or max_length, do_sample, temperature, top_k, top_p, "
                       "eos_token_id, generator, attention_mask (all ones); accepted without effect: "
                       f"{', '.join(GENERATE_FREE)}; beam search, penalties, scores and other "
                       "transformers generation options are not supported.", GENERATE_FREE)
        self._check_ids(input_ids)
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
        ):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        # ids in range and an all-ones mask: one host sync for the whole call
        self._check_values(input_ids, attention_mask=attention_mask)
        prompt = input_ids.shape[1]
        if max_new_tokens is not None and max_length is not None:
            raise ValueError(f"pass max_new_tokens or max_length, not both (got max_new_tokens={max_new_tokens!r}, "
                             f"max_length={max_length!r})")
        if max_length is not None:
            check_int("max_length", max_length, minimum=prompt)
            max_new_tokens = max_length - prompt
        elif max_new_tokens is None:
            max_new_tokens = 20
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise TypeError(f"temperature must be a finite number, got {temperature!r}")
        check_int("top_k", top_k, optional=True)
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {temperature!r}; "
                                 "use do_sample=False for greedy decoding")
        else:
            # transformers warns and ignores these under greedy decoding; a caller who set them
            # expected sampling, so the mismatch is an error
            ignored = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
                       if v is not None and not (k == "temperature" and v == 1.0)}
            if ignored:
                raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in ignored.items())} only apply when "
                                 "sampling: pass do_sample=True, or leave them unset for greedy decoding")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        eos = [eos_token_id] if eos_token_id is None or isinstance(eos_token_id, int) else eos_token_id
        if not isinstance(eos, (list, tuple)):
            raise TypeError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
        eos = [e for e in eos if e is not None] if eos_token_id is None else list(eos)
        vocab = self.embed.num_embeddings
        for e in eos:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab:
                raise ValueError(f"eos_token_id must be token ids in [0, {vocab}), got {eos_token_id!r}")
        return max_new_tokens, eos


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next token [B] from logits [B, V]: argmax, or a sample after temperature/top-k/top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:  # generate() has checked top_k >= 1 and 0 < top_p <= 1
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
