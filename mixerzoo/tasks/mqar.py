"""Multi-query associative recall (MQAR), as defined by Zoology (Arora, Eyuboglu et al. 2023).

A sequence opens with ``num_kv_pairs`` key-value pairs; afterwards every key appears again
exactly once, and at that position the model must output the key's value. Keys are drawn
without replacement from the lower half of the vocabulary ``[1, V // 2)``, values without
replacement from the upper half ``[V // 2, V)``, so token 0 never is a key or a value. The
query region is split into slots two tokens apart; key ``i`` is placed in slot ``gap_i``,
i.e. at position ``2 K + 2 gap_i``. Gaps are drawn without replacement from a power law,

    p(gap = g) ∝ a · (g + 1)^(a − 1),   g = 0 .. S − 1,   S = (T − 2 K · passes) // 2,

which with Zoology's ``a = 0.01`` puts most queries close to the end of the context (the gap
between repeated bigrams in real text follows a power law; ``a = 1`` is uniform).

Drawn example, ``MQARConfig(vocab_size=12, seq_len=16, num_kv_pairs=2,
random_non_queries=False).sample(1, seed=0)`` on the CPU (K = 2, S = 6 slots)::

             key  val  key  val  qry                 qry
    inputs:      2    8    1    6    2    0    0    0    1    0    0    0    0    0    0    0
    labels:   -100 -100 -100 -100    8 -100 -100 -100    6 -100 -100 -100 -100 -100 -100 -100
    slot:                          0         1         2         3         4         5

Key 2 is queried in slot 0 (gap 0, position 4) and key 1 in slot 2 (position 8). A label
sits at the query position itself: it is the next-token target of a sequence one token
longer in which each query is followed by its value (Zoology builds ``T + 1`` tokens and
shifts), so a causal LM trained with the usual next-token loss on ``labels`` learns recall.
With ``random_non_queries=True`` (Zoology's default, kept here) every filler 0 is replaced by
a token drawn uniformly from the whole vocabulary, so the model cannot find queries by
spotting the only non-zero tokens.

``num_passes > 1`` repeats the key-value block (the "just read twice" variant of Zoology).
Unlike Zoology's generator, an odd ``seq_len`` is accepted (its last token is never a query)
and the vocabulary need not exceed ``seq_len``; only what the construction needs is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import einops
import torch

from mixerzoo.tasks import IGNORE_INDEX, SyntheticTask


@dataclass(kw_only=True)
class MQARConfig(SyntheticTask):
    """Multi-query associative recall; see the module docstring for the drawn example.

    Fields:
        vocab_size: tokens in the vocabulary; Zoology's 8192 makes the task hard for
            architectures that cannot store many distinct associations.
        seq_len: input length ``T`` the model sees.
        num_kv_pairs: key-value pairs ``K`` per sequence; each is queried once.
        power_a: exponent ``a`` of the power law over query gaps (Zoology: 0.01).
        random_non_queries: replace filler tokens with uniform random tokens (Zoology: True).
        num_passes: times the key-value block is repeated before the queries.
    """

    name: ClassVar[str] = "mqar"

    @classmethod
    def preset_fields(cls, preset: str):
        # Zoology's Figure 2 pairs length and kv pairs as (64, 4), (128, 8), (256, 16),
        # (512, 64) and fills with 0 (random_non_queries=False).
        zoology_kv = {64: 4, 128: 8, 256: 16, 512: 64}
        fields = dict(seq_len=64, num_kv_pairs=4, random_non_queries=False)
        if preset == "demo":
            # Measured on CPU (d_model 64, 2 layers, batch 64): with 64 tokens softmax
            # attention passes 99% in about 400 steps at lr 3e-3; with 128 it is still near
            # 80% at 600 steps, too slow for a demo of six mixers.
            return dict(fields, vocab_size=64), {}
        lengths = (64, 128, 256) if preset == "quick" else (64, 128, 256, 512)
        per_length = {L: {"num_kv_pairs": zoology_kv[L]} for L in lengths}
        return dict(fields, vocab_size=1024 if preset == "quick" else 8192), per_length

    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    random_non_queries: bool = True
    num_passes: int = 1

    def __post_init__(self) -> None:
        for field_name in ("vocab_size", "seq_len", "num_kv_pairs", "num_passes"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MQARConfig.{field_name} must be a positive int, got {value!r}")
        if not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(
                f"MQARConfig.power_a must be > 0 (1.0 is uniform), got {self.power_a!r}"
            )
        k, half = self.num_kv_pairs, self.vocab_size // 2
        if half - 1 < k or self.vocab_size - half < k:
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small for {k} distinct keys in [1, {half}) "
                f"and values in [{half}, {self.vocab_size}): use vocab_size >= {2 * k + 2}"
            )
        need = self.context_len + 2 * k
        if self.seq_len < need:
            raise ValueError(
                f"seq_len={self.seq_len} cannot hold {k} key-value pairs"
                f"{f' x {self.num_passes} passes' if self.num_passes > 1 else ''} plus {k} "
                f"query slots two tokens apart: use seq_len >= {need} or fewer kv pairs"
            )

    @property
    def context_len(self) -> int:
        """Tokens taken by the key-value block(s): ``2 K · num_passes``."""
        return 2 * self.num_kv_pairs * self.num_passes

    @property
    def num_slots(self) -> int:
        """Query slots ``S`` after the context; each key takes one, at most one key per slot."""
        return (self.seq_len - self.context_len) // 2

    def gap_probs(self) -> torch.Tensor:
        """``[S]`` float64: the power-law probability of each query gap ``g = 0 .. S-1``."""
        g = torch.arange(1, self.num_slots + 1, dtype=torch.float64)
        p = self.power_a * g ** (self.power_a - 1)
        return p / p.sum()

    def _generate(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, K, V = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size
        half = V // 2

        # A uniform random K-subset of a range, vectorised over the batch: the indices of the
        # K largest of iid uniforms (their order is a uniform random permutation too).
        def distinct(low: int, high: int) -> torch.Tensor:
            u = torch.rand(B, high - low, generator=generator, device=device)
            return u.topk(K, dim=1).indices + low  # [B, K]

        keys = distinct(1, half)
        values = distinct(half, V)
        kv = einops.rearrange(torch.stack([keys, values], dim=-1), "b k two -> b (k two)")
        kv = kv.repeat(1, self.num_passes)  # [B, 2K·passes]

        # Sampling without replacement proportional to p, as numpy's choice(replace=False, p=p).
        probs = self.gap_probs().to(device=device, dtype=torch.float32).expand(B, -1).contiguous()
        gaps = torch.multinomial(probs, K, replacement=False, generator=generator)  # [B, K]
        query_pos = self.context_len + 2 * gaps

        inputs = torch.zeros(B, T, dtype=torch.long, device=device)
        inputs[:, : self.context_len] = kv
        inputs.scatter_(1, query_pos, keys)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
        labels.scatter_(1, query_pos, values)

        if self.random_non_queries:
            noise = torch.randint(0, V, (B, T), generator=generator, device=device)
            inputs = torch.where(inputs == 0, noise, inputs)
        return inputs, labels
