"""Tokenizers for language modelling: every one is a transformers ``PreTrainedTokenizerFast``.

The default, :func:`byte_tokenizer`, needs no files and no network: token ``b`` is the byte
``b`` (0..255) and token 256 is ``<|endoftext|>``, the document separator (EOS). It is a real
byte-level BPE with no merges, so it saves into a checkpoint with ``save_pretrained`` and loads
back with ``AutoTokenizer.from_pretrained`` like any other tokenizer.

:func:`load_tokenizer` picks the byte tokenizer or a saved one, :func:`train_bpe` trains a
byte-level BPE on your own text, :func:`token_byte_lengths` gives the bytes of each token (for
bits per byte) and :func:`tokenizer_fingerprint` identifies a tokenizer (for caches).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from .sources import iter_documents

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 bytes + EOS


@lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """The printable stand-in character of each byte used by byte-level BPE (GPT-2's scheme:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255), so that
    a vocabulary of strings can name every byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def byte_tokenizer():
    """A 257-token byte-level tokenizer (ids 0..255 are bytes, 256 is EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no splitting on spaces, so the text maps byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=1 << 30,
    )


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or cannot be used for language modelling."""


def load_tokenizer(spec: str | None = None):
    """The tokenizer named by ``spec``: ``None`` or ``"byte"`` -> :func:`byte_tokenizer`, else
    ``AutoTokenizer.from_pretrained(spec)`` (a local folder, or a hub name found online or in
    the local Hugging Face cache). It must have an EOS token: EOS separates documents."""
    if spec is None or spec == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(spec))
    except Exception as err:  # transformers raises OSError, ValueError, HTTP errors, ...
        why = " ".join(str(err).split())  # transformers' messages span several lines
        raise TokenizerError(
            f"cannot load tokenizer {str(spec)!r} ({type(err).__name__}: {why}). Give a local "
            "folder holding tokenizer.json / tokenizer_config.json (as written by `mixerzoo "
            "tokenizer train` or saved in a checkpoint), or 'byte' for the built-in byte "
            "tokenizer; a hub name only loads with network access or from the local cache"
        ) from err
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer {str(spec)!r} has no EOS token, which separates documents in the "
            "training stream: set eos_token in its tokenizer_config.json"
        )
    return tok


def train_bpe(
    data,
    vocab_size: int,
    out_dir,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    progress: bool = True,
):
    """Train a byte-level BPE of ``vocab_size`` tokens on the documents of ``data`` (anything
    :func:`mixerzoo.data.iter_documents` reads), save it to ``out_dir`` with
    ``save_pretrained`` and return it. EOS (``<|endoftext|>``) is a special token and also
    the BOS and pad token. ``out_dir`` must not exist or be empty."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast


    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= BYTE_VOCAB:
        raise ValueError(
            f"vocab_size must be an int > {BYTE_VOCAB} (256 bytes + EOS come first, merges "
            f"after), got {vocab_size!r}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"tokenizer output {str(out_dir)!r} exists and is not an empty folder: "
                         "delete it or choose another output folder")
    documents = iter_documents(data, text_field=text_field)  # bad input fails here, before training

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenisation (words, spaces, digits apart) without an invented leading space,
    # so that the token bytes of a text add up to the text's bytes.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        # All 256 bytes are in the vocabulary even if the corpus lacks some, so any text encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    if tok.get_vocab_size() < vocab_size:  # the model's embedding follows len(tokenizer)
        warnings.warn(f"the corpus allowed only {tok.get_vocab_size()} of {vocab_size} tokens "
                      f"(pairs seen fewer than min_frequency={min_frequency} times are not merged)",
                      stacklevel=2)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=1 << 30,
    )
    # Save beside the destination and rename, so that a crash never leaves a half tokenizer.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a tokenizer folder is meant to be shared
        wrapped.save_pretrained(str(tmp))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a folder otherwise
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return wrapped


def _backend_json(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _is_byte_level(config: dict | None) -> bool:
    """Whether the vocabulary strings name bytes through :func:`byte_to_unicode` (the decoder
    is ByteLevel, alone or in a sequence)."""
    dec = (config or {}).get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return any(p.get("type") == "ByteLevel" for p in parts)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """``[len(tokenizer)]`` int64: the UTF-8 byte length of every token, 0 for special tokens.

    Bits per byte of a text is ``sum(nll in nats) / ln 2 / sum(lengths[predicted tokens])``.
    Exact for byte-level BPE (each character of a vocabulary string is one byte); other
    tokenizers fall back to the length of each token decoded alone, which can miss the
    spaces that SentencePiece attaches to word starts.
    """
    n = len(tokenizer)
    lengths = np.zeros(n, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # not byte strings, even in BPE
    u2b = {ch: b for b, ch in byte_to_unicode().items()}
    byte_level = _is_byte_level(_backend_json(tokenizer))
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if i in special or piece is None:
            continue
        if byte_level and i not in added and all(ch in u2b for ch in piece):
            lengths[i] = len(piece)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def tokenizer_fingerprint(tokenizer) -> str:
    """A short sha256 of what decides token ids: the serialized tokenizer (less its
    truncation/padding settings, which transformers changes per call), its size and EOS."""
    spec = _backend_json(tokenizer)
    if spec is None:  # a Python-only tokenizer: its vocabulary stands for it
        spec = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}
    spec = {k: v for k, v in spec.items() if k not in ("truncation", "padding")}
    spec["len"], spec["eos_id"] = len(tokenizer), tokenizer.eos_token_id
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
