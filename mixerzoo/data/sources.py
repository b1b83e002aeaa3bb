"""Where LM text comes from: files, folders, JSONL, Parquet and Hugging Face datasets -> documents.

Inputs (:func:`iter_documents`): a text file (one document), a ``.jsonl`` file (one document
per line, field ``text_field``), a ``.parquet`` file (column ``text_field``), a folder (its
text, JSONL and Parquet files, recursively, in sorted order), ``hf:NAME`` or
``hf:NAME:CONFIG`` (the train split of a Hugging Face dataset), or a list of these.
:func:`_describe` / :func:`_still_valid` fingerprint the sources for the token cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

KINDS = {".txt": "text", ".md": "text", ".rst": "text", ".text": "text",
         ".jsonl": "jsonl", ".json-lines": "jsonl", ".parquet": "parquet"}
# Documents are tokenised ~256K characters at a time: enough for the tokenizer to run a batch
# in parallel, little enough that its per-token bookkeeping stays at tens of MB.


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


__all__ = ["DataError", "iter_documents"]
