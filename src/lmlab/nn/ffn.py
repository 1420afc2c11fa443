"""Position-wise feed-forward networks: plain (ReLU/GELU) and gated (SwiGLU, gated-GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import choices_error

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise choices_error("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


class FeedForward(nn.Module):
    """down(act(up(x))), or gated: down(act(gate(x)) * up(x)).

    Names follow the gated form: `gate` is the branch the activation sees (LLaMA w1, T5 wi_0), `up` the
    linear branch (LLaMA w3, T5 wi_1), `down` the output projection (w2, wo).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.act = get_activation(activation)
        self.gated = gated
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = self.act(self.gate(x)) * self.up(x)
        else:
            h = self.act(self.up(x))
        return self.down(self.drop(h))
