"""The steerable activation: ``a ← s·a + b`` on a sparse set of columns, per token.

It wraps a layer's weightless ``act_and_mul`` module (``SiluAndMul``, ``GeluAndMul``...),
whose output is exactly the input of ``down_proj``. For token t with row r = token_rows[t]
and steerable columns ``idx`` of this layer::

    out[t, idx] = out[t, idx] * scale[r] + bias[r]

Row 0 holds (1, 0), so unsteered tokens come out bit-identical (up to the sign of zero).
There is no data-dependent Python branch: under torch.compile the graph always gathers
and scatters, and the per-step content lives in the tensors.
"""

from __future__ import annotations

import torch
from torch import nn


class SteeredActivation(nn.Module):
    """Per-layer wrapper of an activation module. Each layer needs its own instance."""

    def __init__(
        self,
        inner: nn.Module,
        layer: int,
        columns: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        token_rows: torch.Tensor,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.layer = layer
        # Non-persistent buffers: never in a state dict, never touched by weight loading.
        self.register_buffer("columns", columns, persistent=False)  # [K] int64, local columns
        self.register_buffer("scale", scale, persistent=False)  # [rows, K] float32
        self.register_buffer("bias", bias, persistent=False)  # [rows, K] float32
        self.register_buffer("token_rows", token_rows, persistent=False)  # [max_tokens] int64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        rows = self.token_rows[: out.shape[0]]
        cols = out.index_select(1, self.columns)
        steered = cols.float() * self.scale.index_select(0, rows) + self.bias.index_select(0, rows)
        return out.index_copy_(1, self.columns, steered.to(out.dtype))  # in place: out is fresh

    def extra_repr(self) -> str:
        return f"layer={self.layer}, steerable={self.columns.numel()}, rows={self.scale.shape[0]}"


class MLPOutputOffset:
    """Mixin for a decoder layer's MLP: adds this token's row of ``offset`` to the output (CAA).

    The MLP's class becomes ``(MLPOutputOffset, StockMLP)`` (patch P4), so weight names and
    loading are untouched. Row 0 is all zeros: unsteered tokens come out bit-identical.
    Under tensor parallelism the output is already all-reduced, so each rank adds once.
    """

    cna_offset: torch.Tensor  # [rows, hidden] float32
    cna_token_rows: torch.Tensor  # [max_tokens] int64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # type: ignore[misc]
        rows = self.cna_token_rows[: out.shape[0]]
        return out + self.cna_offset.index_select(0, rows).to(out.dtype)
