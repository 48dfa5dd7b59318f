"""Plain-torch block-sparse attention: the oracle every other backend is checked against."""

from __future__ import annotations

import torch

from ..block_table import num_blocks
from .registry import API_DTYPES, Backend

BACKEND = Backend("reference", (*API_DTYPES, torch.float64), None, needs_cuda=False, token_major_in_place=False, auto_rank=3, backward=True,
                  note="plain torch on any device: the oracle")


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Always available (plain torch on any device), with the reason shown by ``sparse-vdit check``."""
    return True, "plain torch"


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float) -> torch.Tensor:
    """:func:`forward` on a block table (token-major heads already permuted)."""
    return forward(q, k, v, table.kv_num_blocks, table.kv_indices, block_size=table.block_size,
                   kv_len=table.layout.kv_len, softmax_scale=softmax_scale)  # fmt: skip


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int,
    kv_len: int,
    softmax_scale: float,
) -> torch.Tensor:
    """Block-sparse attention on ``[B, N, H, D]`` tensors in float32 (float64 for float64 input).

    One query block at a time: scores against every key, then the keys outside the block's
    visited key blocks (or at/after ``kv_len``) are masked out. A row that visits nothing is
    exactly zero; otherwise NaN / inf behave as in dense SDPA over the visited keys: they
    propagate from visited keys and never leak from keys the row does not visit.
    """
    batch, n, heads, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.transpose(1, 2).to(compute) for t in (q, k[:, :kv_len], v[:, :kv_len]))
    out = torch.zeros(batch, heads, n, v.shape[-1], dtype=compute, device=q.device)
    num_kv_blocks = num_blocks(kv_len, block_size)
    slots = torch.arange(kv_indices.shape[-1], device=q.device)
    finite_v = bool(torch.isfinite(vf).all())
    for i in range(kv_num_blocks.shape[1]):
        rows = slice(i * block_size, min((i + 1) * block_size, n))
        visited = torch.zeros(heads, num_kv_blocks + 1, dtype=torch.bool, device=q.device)
        used = slots[None, :] < kv_num_blocks[:, i, None]
        index = torch.where(used, kv_indices[:, i].long(), num_kv_blocks)  # unused -> spare column
        visited.scatter_(1, index, True)
        keys = visited[:, :num_kv_blocks].repeat_interleave(block_size, dim=1)[:, :kv_len]
        scores = (qf[:, :, rows] @ kf.transpose(-1, -2)) * softmax_scale
        scores = scores.masked_fill(~keys[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(keys.any(-1)[None, :, None, None], probs, 0.0)  # rows that visit no key: 0
        # a skipped key weighs exactly 0, but 0 * inf or 0 * NaN in v would not be 0
        values = vf if finite_v else torch.where(keys[None, :, :, None], vf, 0.0)
        out[:, :, rows] = probs @ values
    return out.transpose(1, 2).to(q.dtype)
