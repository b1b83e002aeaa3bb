"""A mixer defined outside the package, as a user would write one (used by the registry tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo.mixers.base import Mixer


class CausalConvMixer(Mixer):
    """Depthwise causal convolution over time, then a projection: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, *, layer_idx: int = 0, kernel: int = 4):
        super().__init__(d_model, layer_idx)
        if kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, padding=kernel - 1)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        self._ran("torch")
        y = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.proj(F.silu(y))

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.d_model, self.kernel, device=device, dtype=dtype)

    def step(self, x_t, state):
        state = torch.cat([state[..., 1:], x_t[..., None]], dim=-1)
        y = (state * self.conv.weight[:, 0]).sum(-1) + self.conv.bias
        return self.proj(F.silu(y)), state

    def state_size(self, seq_len: int) -> int:
        return self.d_model * self.kernel
