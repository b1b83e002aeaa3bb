"""Packed training windows from a token cache, with the validation split held out by document.

    train = PackedSequences(corpus, seq_len=2048, split="train", seed=0)
    x = train.batch(step * 512, 512, rank=rank, world_size=world)         # [512 // world, 2048]
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import TokenCorpus
from .sources import DataError


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


__all__ = ["PackedSequences", "validation_mask"]
