"""The token cache: documents tokenised once into a memory-mapped folder.

    corpus = tokenize_corpus("corpus/", load_tokenizer("byte"), "cache/")  # tokenises once

The cache of :func:`tokenize_corpus` is a folder ``cache_dir/<key>/`` holding ``tokens.bin``
([n_tokens] uint16, or uint32 past 65535 tokens: each document's tokens, then EOS),
``doc_offsets.npy`` ([n_docs + 1] int64: where each document starts, then n_tokens),
``doc_bytes.npy`` ([n_docs] int64: UTF-8 bytes of each document) and ``index.json`` (what
was tokenised, with which tokenizer). It is built in a temporary folder and renamed into
place, so a folder under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from .sources import (
    DataError,
    _describe,
    _documents,
    _oneline,
    _resolve,
    _Source,
    _still_valid,
)
from .tokenizers import TokenizerError, tokenizer_fingerprint

FORMAT_VERSION = 1
_BATCH_CHARS = 1 << 18
_INDEX_KEYS = ("tokenizer", "vocab_size", "eos_id", "dtype", "n_tokens", "n_docs", "n_bytes",
               "text_field", "sources")



def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


def _reuse(folder: Path, sources: list[_Source]) -> TokenCorpus | None:
    """The cache in ``folder`` if it is complete and its sources are unchanged."""
    try:
        index = json.loads((folder / "index.json").read_text())
        fresh = _still_valid(index.get("sources", []), sources)
    except (OSError, ValueError, AttributeError):
        return None  # absent, half-copied or foreign: build it again
    if fresh is None:
        return None
    if fresh != index["sources"]:  # touched, unchanged files: record the new mtimes, hash once
        try:
            _write_json(folder / "index.json", {**index, "sources": fresh})
        except OSError:
            pass  # a read-only cache still serves
    try:
        return TokenCorpus.open(folder)
    except DataError:
        return None


def _encoder(tokenizer):
    """docs -> token ids of each, without special tokens and never truncated."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    # A private copy: transformers leaves per-call truncation settings on the shared one.
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    # encode_batch_fast (tokenizers >= 0.20) skips character offsets we do not use.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda docs: [e.ids for e in encode(docs, add_special_tokens=False)]


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _build(folder: Path, specs, sources, tokenizer, text_field: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    described = [_describe(s) for s in sources]  # before reading: a later edit shows next time
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    limit = min(vocab, np.iinfo(dtype).max + 1)  # ids past it would be corrupted by the cast
    encode = _encoder(tokenizer)
    offsets, doc_bytes = array("q", [0]), array("q")
    with open(folder / "tokens.bin", "wb") as f, \
            tqdm(desc="tokenising", unit="doc", disable=not progress) as bar:
        for docs in _batches(_documents(specs, sources, text_field)):
            ids = encode(docs)
            flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), np.int64)
            if flat.min() < 0 or flat.max() >= limit:
                raise TokenizerError(f"the tokenizer produced id {int(flat.max())} outside its "
                                     f"vocabulary of {vocab}: it is inconsistent, choose another")
            flat.astype(dtype).tofile(f)
            for x in ids:
                offsets.append(offsets[-1] + len(x) + 1)
            doc_bytes.extend(len(d.encode("utf-8")) for d in docs)
            bar.update(len(docs))
        os.fsync(f.fileno())
    np.save(folder / "doc_offsets.npy", np.frombuffer(offsets, np.int64))
    np.save(folder / "doc_bytes.npy", np.frombuffer(doc_bytes, np.int64))
    _write_json(folder / "index.json", {  # written last: a folder without it is unfinished
        "format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab, "eos_id": eos, "dtype": dtype.name, "n_tokens": offsets[-1],
        "n_docs": len(doc_bytes), "n_bytes": int(sum(doc_bytes)), "text_field": text_field,
        "sources": described})


def tokenize_corpus(data, tokenizer, cache_dir, *, text_field: str = "text",
                    progress: bool = True) -> TokenCorpus:
    """Tokenise every document of ``data`` once into ``cache_dir/<key>/`` and open it.

    The key hashes the inputs, ``text_field`` and the tokenizer; the cache is reused while
    the sources keep their content, rebuilt otherwise. Safe when several processes call it:
    each builds in its own temporary folder and the first complete one to arrive is kept.
    """

    if tokenizer.eos_token_id is None:
        raise TokenizerError("the tokenizer has no EOS token, which separates documents: "
                             "set its eos_token")
    specs, sources = _resolve(data)
    key = _short_hash({"format": FORMAT_VERSION, "inputs": specs, "text_field": text_field,
                       "tokenizer": tokenizer_fingerprint(tokenizer)})
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (corpus := _reuse(final, sources)) is not None:
        return corpus
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is shared by users of the data
        _build(tmp, specs, sources, tokenizer, text_field, progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process published meanwhile (keep theirs), or a stale cache is in the way.
            if (corpus := _reuse(final, sources)) is not None:
                return corpus
            stale = cache_dir / f".{key}.stale-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):  # another process moved it already
                os.rename(final, stale)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise  # else another process published meanwhile: theirs stays
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return TokenCorpus.open(final)


class TokenCorpus:
    """A tokenised corpus in a cache folder.

    ``tokens``: [n_tokens] read-only memmap; document ``d`` is
    ``tokens[doc_offsets[d]:doc_offsets[d + 1]]`` and ends with ``eos_id``. ``doc_offsets``:
    [n_docs + 1] int64; ``doc_bytes``: [n_docs] int64 UTF-8 bytes of each document's text.
    ``fingerprint`` names the content and the tokenizer, not where the files lie: store it in
    checkpoints to notice a changed data setup on resume.
    """

    def __init__(self, path: Path, index: dict, tokens: np.ndarray, doc_offsets: np.ndarray,
                 doc_bytes: np.ndarray):
        self.path, self.index = path, index
        self.tokens, self.doc_offsets, self.doc_bytes = tokens, doc_offsets, doc_bytes
        self.n_docs, self.n_tokens = index["n_docs"], index["n_tokens"]
        self.n_bytes = index["n_bytes"]
        self.vocab_size, self.eos_id = index["vocab_size"], index["eos_id"]
        content = [s.get("sha256") or [s.get("hf"), s.get("config"), s.get("fingerprint")]
                   for s in index["sources"]]
        self.fingerprint = _short_hash({"format": FORMAT_VERSION, "tokenizer": index["tokenizer"],
                                        "text_field": index["text_field"], "content": content})

    @classmethod
    def open(cls, path) -> TokenCorpus:
        """Open a cache folder written by :func:`tokenize_corpus`, checking that it is whole."""
        path = Path(path)

        def damaged(why: str) -> DataError:
            return DataError(f"token cache {str(path)!r} is incomplete or damaged ({why}): delete "
                             "the folder and run again to rebuild it")

        try:
            index = json.loads((path / "index.json").read_text())
            if index.get("format") != FORMAT_VERSION:
                raise damaged(f"format {index.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}")
            if missing := [k for k in _INDEX_KEYS if k not in index]:
                raise damaged(f"index.json lacks {', '.join(missing)}")
            dtype, n_tokens, n_docs = np.dtype(index["dtype"]), index["n_tokens"], index["n_docs"]
            if dtype not in (np.uint16, np.uint32) or n_tokens < 1 or n_docs < 1:
                raise damaged("index.json is inconsistent")
            size = (path / "tokens.bin").stat().st_size
            if size != n_tokens * dtype.itemsize:
                raise damaged(f"tokens.bin has {size} bytes, not {n_tokens * dtype.itemsize}")
            offsets = np.load(path / "doc_offsets.npy", allow_pickle=False)
            doc_bytes = np.load(path / "doc_bytes.npy", allow_pickle=False)
        except DataError:
            raise
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise damaged(_oneline(err)) from None
        if (offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,) or offsets[0] != 0
                or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 1)):
            raise damaged("doc_offsets.npy does not match index.json")
        if (doc_bytes.dtype != np.int64 or doc_bytes.shape != (n_docs,)
                or doc_bytes.sum() != index["n_bytes"]):
            raise damaged("doc_bytes.npy does not match index.json")
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n_tokens,))
        # Spot-check document ends (all of them would read the whole file of a large corpus).
        some = np.unique(np.linspace(0, n_docs - 1, min(n_docs, 1024)).astype(np.int64))
        ends = offsets[1:][some]
        if np.any(tokens[ends - 1] != index["eos_id"]):
            raise damaged("a document does not end with EOS")
        return cls(path, index, tokens, offsets, doc_bytes)

    def __repr__(self) -> str:
        return (f"TokenCorpus({str(self.path)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens}, "
                f"vocab_size={self.vocab_size})")


__all__ = ["TokenCorpus", "tokenize_corpus"]
