"""The keyword arguments of ``forward`` and ``generate`` that transformers callers pass, and
when a data-dependent check may run: what the model refuses rather than silently ignores."""

from __future__ import annotations

from typing import Any

import torch

# forward() keyword arguments transformers callers pass, with the values under which they change
# nothing here; any other value (or any other name) would be silently ignored, so it is refused.
FORWARD_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "use_cache": (None, False),
    "return_dict": (None, True),
    "past_key_values": (None,),
    "inputs_embeds": (None,),
    "position_ids": (None,),
    "token_type_ids": (None,),
    "cache_position": (None,),
    "head_mask": (None,),
    "logits_to_keep": (None, 0),  # transformers: 0 = keep every position
    "num_logits_to_keep": (None, 0),
}

# generate() keyword arguments of transformers' GenerationMixin that mean "nothing special" at
# these values; other values ask for behaviour (beams, penalties, scores) this decoder lacks.
GENERATE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_new_tokens": (None, 0),
    "min_length": (None, 0),
    "typical_p": (None, 1, 1.0),
    "min_p": (None,),
    "epsilon_cutoff": (None, 0, 0.0),
    "eta_cutoff": (None, 0, 0.0),
    "diversity_penalty": (None, 0, 0.0),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "return_dict_in_generate": (None, False),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "logits_processor": (None,),
    "stopping_criteria": (None,),
    "prefix_allowed_tokens_fn": (None,),
    "streamer": (None,),
    "assistant_model": (None,),
    "generation_config": (None,),
    "stop_strings": (None,),
    "synced_gpus": (None, False),
}
# Accepted with any value: they cannot change the tokens produced (no padding is ever added;
# the recurrent state is the cache, and using it or not gives the same tokens).
GENERATE_FREE = ("pad_token_id", "bos_token_id", "use_cache", "tokenizer")


def _is_neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    # identity/type-exact comparison: a tensor or list must not be compared with ==, and
    # True must not pass for 1 (num_beams=True is not a valid request either).
    for a in allowed:
        if value is a:
            return True
        if a is not None and not isinstance(a, bool) and type(value) in (int, float) and value == a:
            return True
    return False


def refuse_kwargs(where: str, kwargs: dict[str, Any], neutral: dict[str, tuple[Any, ...]],
                   accepted: str, free: tuple[str, ...] = ()) -> None:
    """One error naming every keyword argument that would otherwise be dropped on the floor."""
    bad = [k for k, v in kwargs.items() if k not in free and not (k in neutral and _is_neutral(v, neutral[k]))]
    if bad:
        parts = [f"{k}={_short(kwargs[k])} (" + (f"only {k}={neutral[k][-1]!r} is supported" if k in neutral
                                                   else "not an argument of this model") + ")" for k in bad]
        raise ValueError(f"{where}: unsupported argument(s) {', '.join(parts)}. {accepted}")


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Whether a data-dependent check (a host sync) may run now: not while torch.compile traces
    (it would break the graph) nor while a CUDA graph is captured (a sync is illegal there)."""
    if torch.compiler.is_compiling() or t.is_meta:  # meta: shape-only runs have no values
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())
