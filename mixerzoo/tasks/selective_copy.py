"""Selective copying, as in the Mamba paper (Gu & Dao 2023, section 3.1 and appendix E.1).

A region of ``seq_len - M`` tokens holds ``M = num_data_tokens`` data tokens at random
positions (kept in order) among noise tokens; then come ``M`` marker tokens, and at the
``j``-th marker the model must output the ``j``-th data token. Solving it needs content-aware
selection: which tokens to keep depends on what they are, not where they are. Vocabulary,
following the paper's construction (the S4 copying generator it builds on):

    0                   noise
    1 .. vocab_size-2   data tokens (drawn uniformly, repeats allowed)
    vocab_size - 1      marker

The paper's setting is ``vocab_size=16`` (noise included) and 16 data tokens.

Drawn example, ``SelectiveCopyConfig(vocab_size=6, seq_len=12, num_data_tokens=3)
.sample(1, seed=0)`` on the CPU (region of 9 tokens, marker = 5)::

                                                          --- markers ---
    inputs:      0    0    1    0    4    0    2    0    0    5    5    5
    labels:   -100 -100 -100 -100 -100 -100 -100 -100 -100    1    4    2

With ``selective=False`` the data tokens fill the start of the region instead (the classic
copying task, solvable by position alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mixerzoo.tasks import IGNORE_INDEX, SyntheticTask

NOISE_TOKEN = 0


@dataclass(kw_only=True)
class SelectiveCopyConfig(SyntheticTask):
    """Selective copying; see the module docstring for the layout and a drawn example.

    Fields:
        vocab_size: tokens including noise (0) and marker (``vocab_size - 1``); at least 3.
        seq_len: input length ``T`` = region (data among noise) + ``num_data_tokens`` markers.
        num_data_tokens: data tokens ``M`` to reproduce.
        selective: scatter the data tokens at random positions (False: at the region's start).
    """

    name: ClassVar[str] = "selective_copy"

    @classmethod
    def preset_fields(cls, preset: str):
        if preset == "demo":
            return dict(vocab_size=16, seq_len=64, num_data_tokens=8), {}
        return dict(vocab_size=16, num_data_tokens=16), {}

    vocab_size: int = 16
    seq_len: int = 256
    num_data_tokens: int = 16
    selective: bool = True

    def __post_init__(self) -> None:
        for field_name in ("vocab_size", "seq_len", "num_data_tokens"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"SelectiveCopyConfig.{field_name} must be a positive int, got {value!r}"
                )
        if self.vocab_size < 3:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no data tokens besides noise (0) and "
                f"marker ({self.vocab_size - 1}): use vocab_size >= 3"
            )
        if self.seq_len < 2 * self.num_data_tokens:
            raise ValueError(
                f"seq_len={self.seq_len} cannot hold a region with {self.num_data_tokens} data "
                f"tokens plus {self.num_data_tokens} markers: use seq_len >= "
                f"{2 * self.num_data_tokens}"
            )

    @property
    def noise_token(self) -> int:
        return NOISE_TOKEN

    @property
    def marker_token(self) -> int:
        return self.vocab_size - 1

    @property
    def region_len(self) -> int:
        """Tokens before the markers: data tokens among noise."""
        return self.seq_len - self.num_data_tokens

    def _generate(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, M, R = batch_size, self.num_data_tokens, self.region_len
        data = torch.randint(1, self.vocab_size - 1, (B, M), generator=generator, device=device)
        if self.selective:
            # A uniform random M-subset of the region per row, sorted so that reading the
            # region left to right meets the data tokens in the order they must be copied.
            u = torch.rand(B, R, generator=generator, device=device)
            positions = u.topk(M, dim=1).indices.sort(dim=1).values
        else:
            positions = torch.arange(M, device=device).expand(B, M)

        inputs = torch.full((B, self.seq_len), NOISE_TOKEN, dtype=torch.long, device=device)
        inputs.scatter_(1, positions, data)
        inputs[:, R:] = self.marker_token
        labels = torch.full((B, self.seq_len), IGNORE_INDEX, dtype=torch.long, device=device)
        labels[:, R:] = data
        return inputs, labels
