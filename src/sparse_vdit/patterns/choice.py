"""A per-head choice among a few candidate patterns, made on the device (SVG's decision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import VideoLayout
from .base import Pattern
from .table import DEFAULT_BLOCK, BlockTable, compile_layer


@dataclass(frozen=True, eq=False)
class HeadChoice:
    """Each (sample, head) takes ``candidates[selected[b, h]]``; ``selected`` stays on the device.

    A pattern source may return one instead of a tuple of patterns; the integration runs it with
    :func:`sparse_vdit.kernels.select_attention` on :meth:`table`: the Triton backend reads
    ``selected`` in the kernel (every candidate resident, no host sync); other backends copy it
    to the host once.
    """

    candidates: tuple[Pattern, ...]
    selected: torch.Tensor  # int32 [batch, heads], values < len(candidates)

    def __post_init__(self) -> None:
        if not self.candidates or not all(isinstance(p, Pattern) for p in self.candidates):
            raise TypeError("HeadChoice needs at least one candidate Pattern")
        if self.selected.dim() != 2 or self.selected.dtype != torch.int32:
            raise ValueError(f"HeadChoice.selected must be int32 [batch, heads], got {self.selected.dtype} "
                             f"{tuple(self.selected.shape)}")  # fmt: skip

    @property
    def num_heads(self) -> int:
        return self.selected.shape[1]

    def patterns(self, sample: int = 0) -> tuple[Pattern, ...]:
        """The chosen pattern of every head of one sample (reads ``selected``: a host sync)."""
        return tuple(self.candidates[i] for i in self.selected[sample].tolist())

    def table(self, layout: VideoLayout, block_size: int = DEFAULT_BLOCK, device: torch.device | str = "cpu") -> BlockTable:
        """The candidates compiled as one table at ``layout``, row ``m`` = ``candidates[m]`` (cached)."""
        return compile_layer(self.candidates, layout, block_size, device)
