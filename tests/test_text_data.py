"""Text data for language modelling: inputs -> documents -> token cache -> packed windows,
and the tokenizers that go with them. Corpora are generated; nothing touches the network."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from mixerzoo.data import cache as text
from mixerzoo.data import (
    DataError,
    PackedSequences,
    TokenCorpus,
    iter_documents,
    tokenize_corpus,
    validation_mask,
)
from mixerzoo.data.tokenizers import (
    EOS,
    TokenizerError,
    byte_tokenizer,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
    train_bpe,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "ünïcödé", "日本語", "✓", "naïve", "x=1;", "\t"]
ODD_TEXT = "Grüße, 日本語 ✓ 🙂 \x00\x07 tab\t end\r\n"  # multi-byte, emoji, control bytes


def make_docs(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + "\n" * (i % 2)
            for i in range(n)]


def write_txt_folder(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):  # zero-padded: the sorted order is the document order
        (folder / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    return folder


def write_jsonl(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=7)
    return path


def byte_ids(doc: str) -> list[int]:
    return list(doc.encode("utf-8"))


def build(data, cache, tokenizer=None, **kwargs) -> TokenCorpus:
    return tokenize_corpus(data, tokenizer or byte_tokenizer(), cache, progress=False, **kwargs)


@pytest.fixture
def offline_hf(monkeypatch, tmp_path):
    """datasets without network and with its cache inside tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in [("HF_DATASETS_OFFLINE", True), ("HF_HUB_OFFLINE", True),
                        ("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))]:
        monkeypatch.setattr(datasets.config, name, value, raising=False)
    return datasets


@pytest.fixture
def count_builds(monkeypatch):
    """The folders tokenize_corpus really tokenised into."""
    calls = []
    real = text._build

    def counted(folder, *args):
        calls.append(folder)
        return real(folder, *args)

    monkeypatch.setattr(text, "_build", counted)
    return calls


# ---------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("kind", ["txt-folder", "jsonl", "parquet", "mixed-folder", "list"])
def test_inputs_give_the_same_documents(tmp_path, kind):
    docs = make_docs(23)
    if kind == "txt-folder":
        data = write_txt_folder(tmp_path / "c", docs)
    elif kind == "jsonl":
        data = write_jsonl(tmp_path / "c.jsonl", docs)
    elif kind == "parquet":
        data = write_parquet(tmp_path / "c.parquet", docs)
    elif kind == "mixed-folder":  # recursive, by relative path; hidden and other files skipped
        data = tmp_path / "c"
        write_txt_folder(data / "a", docs[:5])
        write_jsonl(data / "b.jsonl", docs[5:12])
        write_parquet((data / "c").mkdir() or data / "c" / "d.parquet", docs[12:])
        (data / "notes.csv").write_text("not,a,document")
        write_txt_folder(data / ".hidden", ["hidden"])
    else:
        data = [write_jsonl(tmp_path / "a.jsonl", docs[:10]),
                str(write_parquet(tmp_path / "b.parquet", docs[10:]))]
    assert list(iter_documents(data)) == docs


def test_text_is_read_exactly_and_empty_records_are_skipped(tmp_path):
    f = tmp_path / "book.log"  # any suffix, given directly, is read as text
    f.write_bytes("\ufeffpara one\r\n\r\npara two\n".encode())  # a BOM, Windows line ends
    assert list(iter_documents(f)) == ["para one\r\n\r\npara two\n"]  # one file, one document
    j = tmp_path / "c.jsonl"
    j.write_text('{"body": "a"}\n\n{"body": ""}\n{"body": null}\n{"body": "b"}\n')
    assert list(iter_documents(j, text_field="body")) == ["a", "b"]


def test_hf_dataset_from_a_local_folder(offline_hf, tmp_path, count_builds):
    docs = make_docs(9)
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs, field="content")
    spec = f"hf:{tmp_path / 'ds'}"
    assert list(iter_documents(spec, text_field="content")) == docs
    corpus = build(spec, tmp_path / "cache", text_field="content")
    (src,) = corpus.index["sources"]
    assert src["hf"] == str(tmp_path / "ds") and src["num_rows"] == 9 and src["fingerprint"]
    assert corpus.n_docs == 9
    assert build(spec, tmp_path / "cache", text_field="content").path == corpus.path
    assert len(count_builds) == 1  # the dataset's fingerprint is stable: the cache is reused
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs + ["one more"], field="content")
    assert build(spec, tmp_path / "cache", text_field="content").n_docs == 10
    assert len(count_builds) == 2  # a changed dataset is tokenised again


def test_hf_name_and_config_reach_load_dataset(offline_hf, monkeypatch):
    seen = []

    def fake_load(name, config=None, *, split):
        seen.append((name, config, split))
        return offline_hf.Dataset.from_dict({"text": ["one", "two"]})

    monkeypatch.setattr(offline_hf, "load_dataset", fake_load)
    assert list(iter_documents(["hf:org/set:sub", "hf:other"])) == ["one", "two"] * 2
    assert seen == [("org/set", "sub", "train"), ("other", None, "train")]


# -------------------------------------------------------------------------------- the cache


def test_tokens_are_documents_each_followed_by_eos(tmp_path):
    docs = make_docs(17) + [ODD_TEXT]
    corpus = build(write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "cache")
    expected = [t for d in docs for t in byte_ids(d) + [256]]
    assert corpus.tokens.tolist() == expected and corpus.eos_id == 256
    lengths = [len(byte_ids(d)) + 1 for d in docs]
    assert corpus.doc_offsets.tolist() == np.cumsum([0] + lengths).tolist()
    assert corpus.n_docs == len(docs) and corpus.n_tokens == len(expected)
    assert corpus.n_bytes == sum(len(d.encode()) for d in docs) == corpus.doc_bytes.sum()
    assert corpus.tokens.dtype == np.uint16 and not corpus.tokens.flags.writeable


def word_tokenizer(n_words: int):
    """A word-level tokenizer of n_words + 1 tokens ("w0".."w{n-1}", then EOS); w0 is unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)}
    vocab[EOS] = n_words
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="w0")


def test_more_than_65535_tokens_are_stored_as_uint32(tmp_path):
    tok = word_tokenizer(70_000)
    corpus = build(write_jsonl(tmp_path / "c.jsonl", ["w69999 w3", "w65536"]), tmp_path / "c", tok)
    assert corpus.tokens.dtype == np.uint32 and corpus.vocab_size == 70_001
    assert corpus.tokens.tolist() == [69999, 3, 70_000, 65536, 70_000]


def test_ids_past_the_vocabulary_are_refused_not_truncated(tmp_path):
    class Liar:  # claims 300 tokens (so uint16) while producing ids up to 69999
        def __init__(self):
            inner = word_tokenizer(70_000)
            self.backend_tokenizer, self.eos_token_id = inner.backend_tokenizer, 0

        def __len__(self):
            return 300

    with pytest.raises(TokenizerError, match="69999"):
        build(write_jsonl(tmp_path / "c.jsonl", ["w69999"]), tmp_path / "cache", Liar())
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_is_reused_until_a_source_changes(tmp_path, count_builds):
    data, cache = write_txt_folder(tmp_path / "c", make_docs(6)), tmp_path / "cache"
    first = build(data, cache)
    stamp = os.stat(first.path / "tokens.bin").st_mtime_ns
    again = build(data, cache)
    assert len(count_builds) == 1
    assert again.path == first.path and again.fingerprint == first.fingerprint
    # Touched but unchanged: hashed, reused, and the new mtime is remembered.
    f = data / "0002.txt"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert build(data, cache).path == first.path and len(count_builds) == 1
    recorded = {s["path"]: s["mtime_ns"] for s in TokenCorpus.open(first.path).index["sources"]}
    assert recorded[str(f)] == f.stat().st_mtime_ns
    assert os.stat(first.path / "tokens.bin").st_mtime_ns == stamp
    # Same size, other content: rebuilt under the same key.
    f.write_text(f.read_text()[::-1])
    changed = build(data, cache)
    assert len(count_builds) == 2
    assert changed.path == first.path and changed.fingerprint != first.fingerprint
    doc2 = changed.tokens[changed.doc_offsets[2]:changed.doc_offsets[3] - 1]
    assert bytes(doc2.astype(np.uint8)) == f.read_text().encode()
    # A new file in the folder: rebuilt too; another tokenizer: another cache beside it.
    (data / "9999.txt").write_text("new")
    assert build(data, cache).n_docs == 7 and len(count_builds) == 3
    other = build(data, cache, word_tokenizer(5))
    assert other.path != first.path and len(count_builds) == 4
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.path.name, other.path.name])


def test_unfinished_or_damaged_caches_are_never_used(tmp_path, count_builds, monkeypatch):
    data, cache = write_jsonl(tmp_path / "c.jsonl", make_docs(40)), tmp_path / "cache"
    good = build(data, cache)
    expected = good.tokens.tolist()
    (good.path / "index.json").unlink()  # as if killed before the index was written
    with pytest.raises(DataError, match="delete the folder"):
        TokenCorpus.open(good.path)
    assert build(data, cache).tokens.tolist() == expected
    with open(good.path / "tokens.bin", "r+b") as f:  # truncated tokens
        f.truncate(10)
    with pytest.raises(DataError, match="tokens.bin"):
        TokenCorpus.open(good.path)
    assert build(data, cache).tokens.tolist() == expected
    assert len(count_builds) == 3
    # Killed in the middle of tokenising: nothing appears under the final name, no temp is left.
    shutil.rmtree(cache)
    monkeypatch.setattr(text, "_BATCH_CHARS", 100)
    real = text._encoder

    def dies_on_third_batch(tokenizer):
        encode, calls = real(tokenizer), []

        def encode_or_die(docs):
            calls.append(docs)
            if len(calls) == 3:
                raise KeyboardInterrupt  # as if the process were stopped here
            return encode(docs)

        return encode_or_die

    monkeypatch.setattr(text, "_encoder", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(data, cache)
    assert list(cache.iterdir()) == []


def test_a_cache_published_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    data, cache = write_jsonl(tmp_path / "c.jsonl", make_docs(5)), tmp_path / "cache"
    reference = build(data, tmp_path / "elsewhere")
    real = text._build

    def racing(folder, *args):
        real(folder, *args)
        key = folder.name.split(".")[1]  # our temporary folder is .<key>.tmp-<random>
        shutil.copytree(reference.path, folder.parent / key)  # another rank publishes first

    monkeypatch.setattr(text, "_build", racing)
    corpus = build(data, cache)
    assert corpus.tokens.tolist() == reference.tokens.tolist()
    assert [p.name for p in cache.iterdir()] == [reference.path.name]  # ours was discarded


# ---------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return build(write_jsonl(root / "c.jsonl", make_docs(300, seed=1, max_words=12)), root / "c")


def split_stream(corpus, docs) -> np.ndarray:
    """The split's documents concatenated, the slow and obvious way."""
    offsets = corpus.doc_offsets
    return np.concatenate([corpus.tokens[offsets[d]:offsets[d + 1]] for d in docs])


def test_validation_is_held_out_by_document(corpus):
    L = 16
    train = PackedSequences(corpus, L, split="train", val_fraction=0.1, seed=3)
    val = PackedSequences(corpus, L, split="val", val_fraction=0.1, seed=3)
    assert set(train.docs).isdisjoint(val.docs)
    assert len(train.docs) + len(val.docs) == corpus.n_docs
    assert 0.05 < len(val.docs) / corpus.n_docs < 0.15 and list(val.docs) == sorted(val.docs)
    # Val windows are the val documents, concatenated in order, cut every L tokens.
    stream = split_stream(corpus, val.docs)
    assert val.n_tokens == len(stream) and len(val) == len(stream) // L
    windows = torch.from_numpy(stream[: len(val) * L].reshape(-1, L).astype(np.int64))
    assert torch.equal(val.batch(0, len(val)), windows)
    assert val.n_bytes + train.n_bytes == corpus.n_bytes
    # Train windows are the train documents' windows, each once per epoch, shuffled.
    stream = split_stream(corpus, train.docs)
    windows = stream[: len(train) * L].reshape(-1, L).astype(np.int64)
    got = train.batch(0, len(train)).numpy()
    assert sorted(map(tuple, got)) == sorted(map(tuple, windows))
    assert not np.array_equal(got, windows)
    # A seed decides the split; another seed, another split.
    val_docs = lambda seed: list(  # noqa: E731
        PackedSequences(corpus, L, split="val", val_fraction=0.1, seed=seed).docs)
    assert val_docs(3) == list(val.docs) and val_docs(4) != list(val.docs)
    # split_seed fixes the held-out documents apart from the seed, which still orders the stream
    fixed = lambda seed: PackedSequences(corpus, L, split="train", val_fraction=0.1, seed=seed, split_seed=3)  # noqa: E731
    assert list(fixed(4).docs) == list(train.docs) == list(fixed(9).docs)
    assert not torch.equal(fixed(4).batch(0, 8), fixed(9).batch(0, 8))
    assert fixed(4).describe()["split_seed"] == 3


def test_validation_mask_edge_cases():
    assert not validation_mask(50, 0.0, 0).any()
    assert validation_mask(2, 1e-12, 0).sum() == 1  # at least one val document ...
    assert validation_mask(50, 0.999999, 0).sum() == 49  # ... and at least one train document
    assert not validation_mask(1, 0.5, 0).any()  # a single document trains
    assert validation_mask(10_000, 0.25, 7).mean() == pytest.approx(0.25, abs=0.02)


def test_train_stream_resumes_and_reshuffles_every_epoch(corpus):
    make = lambda seed=5: PackedSequences(corpus, 32, split="train", seed=seed)  # noqa: E731
    a = make()
    n = len(a)
    full = a.batch(0, 3 * n)
    assert full.dtype == torch.long and full.shape == (3 * n, 32)
    assert torch.equal(make().batch(n - 3, 9), full[n - 3:n + 6])  # a fresh object, across epochs
    assert torch.equal(a.batch(7, 5), full[7:12])
    epochs = [full[e * n:(e + 1) * n] for e in range(3)]
    as_set = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert as_set(epochs[0]) == as_set(epochs[1]) == as_set(epochs[2])
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert [a.epoch_of(p) for p in (0, n - 1, n, 3 * n)] == [0, 0, 1, 3]
    assert not torch.equal(make(seed=6).batch(0, n), epochs[0])


@pytest.mark.parametrize("split", ["train", "val"])
def test_rank_slices_make_up_the_whole_batch(corpus, split):
    seqs = PackedSequences(corpus, 8, split=split, val_fraction=0.2)
    whole = seqs.batch(3, 12)
    parts = [seqs.batch(3, 12, rank=r, world_size=4) for r in range(4)]
    assert all(p.shape == (3, 8) for p in parts) and torch.equal(torch.cat(parts), whole)


# ----------------------------------------------------------------------------------- errors


def write_bad_inputs(root):
    (root / "empty_dir").mkdir()
    (root / "csv_only").mkdir()
    (root / "csv_only" / "a.csv").write_text("x")
    (root / "empty.txt").write_text("")
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (root / "nofield.jsonl").write_text('{"body": "x", "id": 1}\n')
    (root / "number.jsonl").write_text('{"text": 3}\n')
    (root / "fake.parquet").write_text("not parquet")
    write_parquet(root / "cols.parquet", ["a"], field="body")


BAD_INPUTS = [  # (id, a name in the folder of bad inputs or a literal, message pattern)
    ("missing", "nope.txt", r"nope\.txt.*does not exist"),
    ("empty-dir", "empty_dir", r"empty_dir.*no usable files"),
    ("csv-only", "csv_only", r"csv_only.*no usable files.*\.jsonl"),
    ("empty-corpus", "empty.txt", r"no non-empty document in .*empty\.txt"),
    ("not-json", "bad.jsonl", r"bad\.jsonl, line 2: not JSON"),
    ("no-field", "nofield.jsonl",
     r"nofield\.jsonl, line 1: no field 'text' \(keys present: 'body', 'id'\).*--text-field"),
    ("not-string", "number.jsonl", r"number\.jsonl, line 1.*int, not a string"),
    ("not-parquet", "fake.parquet", r"fake\.parquet is not a readable Parquet"),
    ("no-column", "cols.parquet",
     r"cols\.parquet has no column 'text' \(columns: body, id\).*--text-field"),
    ("hf-empty", "hf:", r"hf:NAME"),
    ("no-data", [], r"no data given"),
]


@pytest.mark.parametrize("name, pattern", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_data_errors_that_name_them(tmp_path, name, pattern):
    write_bad_inputs(tmp_path)
    data = tmp_path / name if isinstance(name, str) and not name.startswith("hf:") else name
    with pytest.raises(DataError, match=pattern):
        list(iter_documents(data))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=pattern):
        build(data, cache)
    assert not cache.exists() or not any(cache.iterdir())  # no cache, complete or not, is left


def test_unknown_hf_dataset_says_what_is_needed(offline_hf):
    with pytest.raises(DataError, match=r"hf:no-such/dataset-zz.*network"):
        list(iter_documents("hf:no-such/dataset-zz"))


def test_packing_errors(corpus):
    seqs = PackedSequences(corpus, 8, split="val")
    n_train = corpus.n_tokens - seqs.n_tokens
    cases = [
        (lambda: seqs.batch(0, 6, world_size=4), r"count=6 .*world_size=4"),
        (lambda: seqs.batch(0, 4, rank=4, world_size=4), r"rank=4 .*world_size=4"),
        (lambda: seqs.batch(len(seqs) - 1, 2), r"past the \d+ windows"),
        (lambda: seqs.batch(-1, 2), r"start must be"),
        (lambda: PackedSequences(corpus, 1), r"seq_len must be an int >= 2"),
        (lambda: PackedSequences(corpus, 8, split="test"), r"split must be 'train' or 'val'"),
        (lambda: PackedSequences(corpus, 8, val_fraction=1.0), r"val_fraction"),
        (lambda: PackedSequences(corpus, 8, split="val", val_fraction=0),
         r"val split has 0 tokens.*lower seq_len.*raise val_fraction"),
        (lambda: PackedSequences(corpus, 10**9), rf"train split has {n_train} tokens"),
    ]
    for fn, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            fn()


def test_token_corpus_open_rejects_a_foreign_folder(tmp_path):
    with pytest.raises(DataError, match=r"delete the folder"):
        TokenCorpus.open(tmp_path)


# ------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    ids = tok.encode(ODD_TEXT)
    assert ids == byte_ids(ODD_TEXT) and tok.decode(ids) == ODD_TEXT
    assert tok.eos_token_id == 256 and len(tok) == 257 and tok.convert_tokens_to_ids(EOS) == 256
    tok.save_pretrained(tmp_path / "tok")
    for loaded in (AutoTokenizer.from_pretrained(tmp_path / "tok"),
                   load_tokenizer(str(tmp_path / "tok"))):
        assert loaded.encode(ODD_TEXT) == ids and loaded.eos_token_id == 256
        # The copy saved with a checkpoint keys the same token caches.
        assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert load_tokenizer(None).encode("ab") == load_tokenizer("byte").encode("ab") == [97, 98]


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying a dead network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerError, match=r"'no/such-tok'.*tokenizer\.json.*'byte'"):
        load_tokenizer("no/such-tok")
    tok = word_tokenizer(4)
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(TokenizerError, match=r"no EOS"):
        load_tokenizer(str(tmp_path / "no_eos"))


def test_train_bpe_saves_a_loadable_tokenizer_for_any_text(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", make_docs(200, max_words=30), field="body")
    tok = train_bpe(data, 300, tmp_path / "tok", text_field="body", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "tok"]  # no temporary folder left beside
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) == 300 and loaded.eos_token == EOS
    for sample in [ODD_TEXT, "the cat sat", "never seen: ꙮ Ω \U0001F600"]:
        ids = loaded.encode(sample)
        assert loaded.decode(ids) == sample and max(ids) < 300
    sentence = "the cat sat on the mat"
    assert len(loaded.encode(sentence)) < len(byte_ids(sentence))  # it merged
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(data, 257, tmp_path / "tok2", text_field="body", progress=False)
    with pytest.raises(ValueError, match="not an empty folder"):
        train_bpe(data, 300, tmp_path / "tok", text_field="body", progress=False)
    with pytest.raises(DataError, match="no field 'text'"):
        train_bpe(data, 300, tmp_path / "tok3", progress=False)
    assert not (tmp_path / "tok3").exists()
    with pytest.warns(UserWarning, match="only"):  # a tiny corpus cannot fill a large vocabulary
        train_bpe(data, 5000, tmp_path / "tok4", text_field="body", progress=False)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return train_bpe(write_jsonl(root / "c.jsonl", make_docs(200)), 300, root / "tok",
                     progress=False)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_token_byte_lengths_add_up_to_the_text_bytes(which, bpe):
    tok = byte_tokenizer() if which == "byte" else bpe
    lengths = token_byte_lengths(tok)
    assert lengths.dtype == np.int64 and lengths.shape == (len(tok),)
    assert lengths[tok.eos_token_id] == 0
    for sample in [ODD_TEXT, " the  cat\n\nsat ", "日本語 ✓"]:
        assert lengths[tok.encode(sample)].sum() == len(sample.encode("utf-8"))
    if which == "bpe":
        assert lengths.max() > 1


def test_token_byte_lengths_fallback_and_fingerprints(bpe):
    words = word_tokenizer(12)  # not byte-level: lengths come from decoding each token
    assert token_byte_lengths(words).tolist() == [0] + [2] * 9 + [3, 3, 0]  # w0 is unk: special
    fp = tokenizer_fingerprint(bpe)
    bpe("x " * 50, truncation=True, max_length=3)  # leaves truncation set on the backend
    assert tokenizer_fingerprint(bpe) == fp
    assert len({fp, tokenizer_fingerprint(byte_tokenizer()), tokenizer_fingerprint(words)}) == 3
