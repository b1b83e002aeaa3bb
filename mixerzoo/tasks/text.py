"""Text for language modelling: files -> documents -> a token cache -> packed windows.

    corpus = tokenize_corpus("corpus/", load_tokenizer("byte"), "cache/")  # tokenises once
    train = PackedSequences(corpus, seq_len=2048, split="train", seed=0)
    x = train.batch(step * 512, 512, rank=rank, world_size=world)         # [512 // world, 2048]

Inputs (:func:`iter_documents`): a text file (one document), a ``.jsonl`` file (one document
per line, field ``text_field``), a ``.parquet`` file (column ``text_field``), a folder (its
text, JSONL and Parquet files, recursively, in sorted order), ``hf:NAME`` or
``hf:NAME:CONFIG`` (the train split of a Hugging Face dataset), or a list of these.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .tokenizer import TokenizerError

FORMAT_VERSION = 1
KINDS = {".txt": "text", ".md": "text", ".rst": "text", ".text": "text",
         ".jsonl": "jsonl", ".json-lines": "jsonl", ".parquet": "parquet"}
# Documents are tokenised ~256K characters at a time: enough for the tokenizer to run a batch
# in parallel, little enough that its per-token bookkeeping stays at tens of MB.
_BATCH_CHARS = 1 << 18
_INDEX_KEYS = ("tokenizer", "vocab_size", "eos_id", "dtype", "n_tokens", "n_docs", "n_bytes",
               "text_field", "sources")


class DataError(ValueError):
    """Unusable training data or a damaged token cache; the message names the file and the fix."""


@dataclass(eq=False)
class _Source:
    kind: str  # "text" | "jsonl" | "parquet" | "hf"
    path: Path | None = None
    name: str = ""  # hf only
    config: str | None = None
    dataset: Any = None  # hf only: loaded once, on first use


def _resolve(data) -> tuple[list[str], list[_Source]]:
    """(the inputs as given, made absolute: they key the cache; the files and datasets in them)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise DataError("no data given: pass a file, a folder, hf:NAME or a list of these")
    specs, sources = [], []
    for item in items:
        if isinstance(item, str) and item.startswith("hf:"):
            name, _, config = item[3:].partition(":")
            if not name:
                raise DataError(f"data {item!r}: name a Hugging Face dataset as hf:NAME or "
                                "hf:NAME:CONFIG")
            specs.append(item)
            sources.append(_Source("hf", name=name, config=config or None))
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"data must be paths, hf:NAME strings or a list of them, got {item!r}")
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(f"data path {str(path)!r} does not exist: give a text, JSONL or "
                            "Parquet file, a folder of them, or hf:NAME")
        path = path.resolve()
        specs.append(str(path))
        if not path.is_dir():
            # A file named directly is text unless its suffix says otherwise.
            sources.append(_Source(KINDS.get(path.suffix.lower(), "text"), path))
            continue
        # Hidden entries (.git, unfinished caches) are skipped; sorting fixes the order.
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in KINDS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"folder {str(path)!r} has no usable files (searched recursively for "
                            f"{', '.join(KINDS)})")
        sources += [_Source(KINDS[p.suffix.lower()], p) for p in files]
    return specs, sources


def _as_text(value, where: str) -> str:
    if value is None:
        return ""  # a null (common in Parquet) is an empty document: skipped
    if not isinstance(value, str):
        raise DataError(f"{where}: the text is a {type(value).__name__}, not a string")
    return value


def _oneline(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _text_docs(src: _Source, field: str) -> Iterator[str]:
    try:  # newline="": the text as the file holds it, \r\n included; a BOM is not text
        with open(src.path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{src.path} is not UTF-8 text ({err}): convert it or leave it "
                        "out") from None
    yield text


def _jsonl_docs(src: _Source, field: str) -> Iterator[str]:
    with open(src.path, encoding="utf-8-sig") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{src.path}, line {lineno}: not JSON ({err.msg}); each "
                                    "line of a JSONL file must be one JSON object") from None
                if not isinstance(record, dict) or field not in record:
                    keys = (", ".join(map(repr, record)) or "none") if isinstance(record, dict) \
                        else f"none, it is a JSON {type(record).__name__}"
                    raise DataError(f"{src.path}, line {lineno}: no field {field!r} (keys "
                                    f"present: {keys}); name the text field with --text-field")
                yield _as_text(record[field], f"{src.path}, line {lineno}, field {field!r}")
        except UnicodeDecodeError as err:
            raise DataError(f"{src.path}, after line {lineno}: not UTF-8 ({err})") from None


def _parquet_docs(src: _Source, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {src.path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as err:
        raise DataError(f"{src.path} is not a readable Parquet file ({_oneline(err)})") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise DataError(f"{src.path} has no column {field!r} (columns: {', '.join(columns)}); "
                        "name the text column with --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):  # never all of it at once
        for value in batch.column(0).to_pylist():
            yield _as_text(value, f"{src.path}, column {field!r}")


def _hf_dataset(src: _Source):
    if src.dataset is None:
        spec = f"hf:{src.name}" + (f":{src.config}" if src.config else "")
        try:
            import datasets
        except ImportError:
            raise DataError(f"{spec} needs the datasets package: pip install datasets") from None
        try:
            src.dataset = datasets.load_dataset(src.name, src.config, split="train")
        except Exception as err:
            raise DataError(
                f"cannot load the train split of {spec} ({_oneline(err)}). A hub dataset needs "
                "its exact name and network access (or a copy in the local datasets cache); a "
                "local dataset is named by its folder"
            ) from None
    return src.dataset


def _hf_docs(src: _Source, field: str) -> Iterator[str]:
    ds = _hf_dataset(src)
    if field not in ds.column_names:
        raise DataError(f"hf:{src.name} has no column {field!r} (columns: "
                        f"{', '.join(ds.column_names)}); name the text column with --text-field")
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        for value in batch[field]:
            yield _as_text(value, f"hf:{src.name}, column {field!r}")


_READERS = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs, "hf": _hf_docs}


def _documents(specs: list[str], sources: list[_Source], field: str) -> Iterator[str]:
    n = 0
    for src in sources:
        for doc in _READERS[src.kind](src, field):
            if doc:  # an empty document would add nothing but an EOS
                n += 1
                yield doc
    if n == 0:
        raise DataError(f"no non-empty document in {', '.join(specs)} (text field {field!r})")


def iter_documents(data, *, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of ``data`` in order (see the module docstring for the inputs).
    A missing path or an empty folder fails at the call; bad records fail when reached."""
    specs, sources = _resolve(data)
    return _documents(specs, sources, text_field)


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _describe(src: _Source, *, content: bool = True) -> dict:
    if src.kind == "hf":
        ds = _hf_dataset(src)
        return {"hf": src.name, "config": src.config, "num_rows": len(ds),
                "fingerprint": getattr(ds, "_fingerprint", None)}  # datasets' id of its content
    st = src.path.stat()
    return {"path": str(src.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": _sha256(src.path) if content else None}


def _still_valid(recorded: list, sources: list[_Source]) -> list | None:
    """The recorded sources with fresh mtimes if every source still has the recorded content,
    else None. A file whose size and mtime match is not read; one only touched is hashed."""
    if len(recorded) != len(sources):
        return None
    fresh = []
    for rec, src in zip(recorded, sources):
        if src.kind == "hf":
            if _describe(src) != rec:
                return None
        else:
            st = src.path.stat()
            if rec.get("path") != str(src.path) or rec.get("size") != st.st_size:
                return None
            if rec.get("mtime_ns") != st.st_mtime_ns:
                if _sha256(src.path) != rec.get("sha256"):
                    return None
                rec = {**rec, "mtime_ns": st.st_mtime_ns}
        fresh.append(rec)
    return fresh


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

    from .tokenizer import tokenizer_fingerprint

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
    from .tokenizer import tokenizer_fingerprint

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


def _unit_hash(seed: int, idx: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) for each (seed, idx): splitmix64, the same on every machine."""

    def mix(x):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    with np.errstate(over="ignore"):  # the wrap-around is the point
        h = mix(mix(np.array([seed], np.uint64)) + idx.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def validation_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """[n_docs] bool: which documents are held out. Document d is iff its seeded hash is below
    ``val_fraction``, except that with ``val_fraction > 0`` and two or more documents both
    splits get at least one (a single document always trains)."""
    if n_docs < 2 or val_fraction == 0:
        return np.zeros(n_docs, bool)
    u = _unit_hash(seed, np.arange(n_docs))
    mask = u < val_fraction
    if not mask.any():
        mask[np.argmin(u)] = True
    if mask.all():
        mask[np.argmax(u)] = False
    return mask


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise DataError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class PackedSequences:
    """A split of a corpus cut into windows of ``seq_len`` tokens.

    The split's documents (validation held out by document, see :func:`validation_mask`) are
    concatenated in order, EOS after each, and cut into ``len(self)`` non-overlapping windows;
    a window may span documents, the tail shorter than a window is dropped. ``"val"`` serves
    the windows in order. ``"train"`` is an endless stream: epoch ``e`` visits every window
    once, in the order of a permutation seeded by ``(seed, e)``. Sample ``p`` of the stream is
    a pure function of the arguments, so a run resumed at position ``p`` sees the same data.
    ``split_seed`` picks the held-out documents (None: ``seed``); runs that differ only in
    ``seed`` but share ``split_seed`` are validated on the same documents.

    Example (``seq_len=4``, documents ``[a b EOS]``, ``[c d e EOS]``, ``[f EOS]``, all train):
    the split is ``a b EOS c | d e EOS f | EOS`` -> 2 windows, the last ``EOS`` dropped.
    """

    def __init__(self, corpus: TokenCorpus, seq_len: int, *, split: str = "train",
                 val_fraction: float = 0.01, seed: int = 0, split_seed: int | None = None):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        self.seq_len = _check_int("seq_len", seq_len, 2)  # one token predicts nothing
        self.seed = _check_int("seed", seed, 0)
        self.split_seed = self.seed if split_seed is None else _check_int("split_seed", split_seed, 0)
        if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        self.corpus, self.split, self.val_fraction = corpus, split, float(val_fraction)
        held_out = validation_mask(corpus.n_docs, self.val_fraction, self.split_seed)
        self.docs = np.flatnonzero(held_out if split == "val" else ~held_out)  # [n_split_docs]
        starts = corpus.doc_offsets[self.docs]
        lengths = corpus.doc_offsets[self.docs + 1] - starts
        # _starts[i]: where the split's document i begins in the concatenated split; a split
        # position q inside it lies at q + _shift[i] in the corpus.
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # [n_split_docs + 1]
        self._shift = starts - self._starts[:-1]  # [n_split_docs]
        self.n_tokens = int(self._starts[-1])
        self.n_bytes = int(corpus.doc_bytes[self.docs].sum())
        self._len = self.n_tokens // self.seq_len
        if self._len == 0:
            fix = "raise val_fraction" if split == "val" else "lower val_fraction"
            raise DataError(
                f"the {split} split has {self.n_tokens} tokens in {len(self.docs)} of "
                f"{corpus.n_docs} documents, fewer than one window of seq_len={self.seq_len}: "
                f"lower seq_len, add data or {fix}")
        self._perms: dict[int, np.ndarray] = {}  # the last few epochs' orders

    def __len__(self) -> int:
        return self._len

    def epoch_of(self, position: int) -> int:
        """The epoch that stream position ``position`` falls in."""
        return _check_int("position", position, 0) // self._len

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self._len)
        return self._perms[epoch]

    def batch(self, start: int, count: int, *, rank: int = 0,
              world_size: int = 1) -> torch.Tensor:
        """``[count // world_size, seq_len]`` long: rank ``rank``'s contiguous share of stream
        positions ``[start, start + count)`` (train: running on across epochs; val: window
        indices, which must exist). All ranks together read the world_size=1 batch."""
        start, count = _check_int("start", start, 0), _check_int("count", count, 1)
        world_size = _check_int("world_size", world_size, 1)
        if _check_int("rank", rank, 0) >= world_size:
            raise DataError(f"rank={rank} must be below world_size={world_size}")
        if count % world_size:
            raise DataError(f"count={count} is not a multiple of world_size={world_size}: every "
                            "rank takes count // world_size samples")
        if self.split == "val" and start + count > self._len:
            raise DataError(f"val positions [{start}, {start + count}) run past the {self._len} "
                            "windows of the val split")
        per = count // world_size
        pos = np.arange(start + rank * per, start + (rank + 1) * per, dtype=np.int64)  # [b]
        windows = pos.copy()
        if self.split == "train":
            epochs, within = np.divmod(pos, self._len)
            for e in np.unique(epochs):
                windows[epochs == e] = self._order(int(e))[within[epochs == e]]
        q = windows[:, None] * self.seq_len + np.arange(self.seq_len)  # [b, seq_len] in split
        doc = np.searchsorted(self._starts, q, side="right") - 1  # [b, seq_len] split's doc
        tokens = self.corpus.tokens[q + self._shift[doc]]  # [b, seq_len] gathered from the memmap
        return torch.from_numpy(np.array(tokens, dtype=np.int64))

    def describe(self) -> dict:
        """What decides the stream, for checkpoints: a resume with other values reads other
        data."""
        return {"data": self.corpus.fingerprint, "seq_len": self.seq_len, "split": self.split,
                "val_fraction": self.val_fraction, "seed": self.seed, "split_seed": self.split_seed}

    def __repr__(self) -> str:
        return (f"PackedSequences({self.split}, seq_len={self.seq_len}, windows={self._len}, "
                f"docs={len(self.docs)}, tokens={self.n_tokens})")


__all__ = ["DataError", "PackedSequences", "TokenCorpus", "iter_documents", "tokenize_corpus",
           "validation_mask"]
