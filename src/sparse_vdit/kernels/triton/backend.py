"""The Triton backend's entry: its declaration, measured tiles where asked for, then one launch.

``launcher`` launches with a given or rule-based tile choice; ``tuning`` times the launcher to
find tiles (``SPARSE_VDIT_TRITON_AUTOTUNE=1``); this module joins them, so neither imports the other.
"""

from __future__ import annotations

import torch

from ...block_table import num_blocks, run_length
from ..registry import API_DTYPES, Backend
from . import launcher, tuning
from .launcher import is_available

BACKEND = Backend("triton", API_DTYPES, (64, 128), needs_cuda=False, token_major_in_place=True, auto_rank=1, backward=True,
                  note="ours: any CUDA GPU Triton supports, or the CPU under TRITON_INTERPRET=1")  # fmt: skip


def _tiles(q: torch.Tensor, block_size: int, tiles=None, table=None, head_order: bool = False) -> tuple[int, int, int, int]:
    """Tiles for ``q``: given, tuned (per density bucket of ``table``, else dense), set in
    ``launcher.OPTIONS["tiles"]`` (one choice, or a dict keyed by density bucket or by (head dim,
    density bucket), the latter first), the launcher's small-launch tiles (``head_order`` inputs,
    :func:`launcher.small_launch`), or the launcher's rule."""

    def density() -> float:
        return table.form("triton.density", lambda t: t.density) if table is not None else 1.0

    if tiles is None and q.device.type == "cuda" and tuning.enabled():
        batch, n, heads, dim = q.shape
        tiles = tuning.tuned_tiles(batch, heads, n, dim, q.dtype, block_size, q.device, density())
    chosen = launcher.option("tiles")
    if tiles is None and chosen is not None:
        if isinstance(chosen, dict):
            bucket = tuning.density_bucket(density())
            chosen = chosen.get((q.shape[-1], bucket), chosen.get(bucket))
        tiles = chosen
    if tiles is None and head_order:
        tiles = launcher.small_launch_tiles(q, block_size, density())
    return launcher._tiles(block_size, q.shape[-1], q.device, tiles)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
            kv_indices: torch.Tensor | None, *, block_size: int, tiles=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """:func:`launcher.forward` with the tuned tiles of this GPU and shape when
    ``SPARSE_VDIT_TRITON_AUTOTUNE=1`` on CUDA (and no ``tiles`` given)."""
    tiles = _tiles(q, block_size, tiles)
    return launcher.forward(q, k, v, kv_num_blocks, kv_indices, block_size=block_size, tiles=tiles, **kwargs)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float,
        head_order: bool = False) -> torch.Tensor:  # fmt: skip
    """Block-sparse attention of ``table``: its ranges read in place, token-major heads through
    the order in-kernel; the work order is kept with the table. ``head_order``: q, k, v already hold
    each head in its own order (:func:`sparse_vdit.kernels.head_order.to_head_order`); the output is
    frame-major either way."""
    return _run(q, k, v, table, softmax_scale, False, head_order)


def run_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float,
                 head_order: bool = False):  # fmt: skip
    """:func:`run` and each row's log-sum-exp (float32 ``[B, H, N]``, by frame-major row), for :func:`run_backward`."""
    return _run(q, k, v, table, softmax_scale, True, head_order)


def run_backward(grad_out, q, k, v, out, lse, table, softmax_scale: float, head_order: bool = False,
                 to_frame_major: bool = False, rotary=None):  # fmt: skip
    """``(dq, dk, dv)`` of :func:`run_with_lse`'s attention (:mod:`.backward`'s two kernels); ``head_order``:
    q, k, v as that forward ran them in head order, the gradients come back in that order, or with
    ``to_frame_major`` frame-major (dq and dk through the transpose of ``rotary``: the backward of the pass that
    made them)."""
    from .backward import backward as triton_backward

    return triton_backward(grad_out, q, k, v, out, lse, table, softmax_scale, head_order=head_order,
                           to_frame_major=to_frame_major, rotary=rotary)  # fmt: skip


def _run(q, k, v, table, softmax_scale: float, return_lse: bool, head_order: bool = False):
    block = table.block_size
    tiles = _tiles(q, block, table=table, head_order=head_order)
    schedule = launcher.table_schedule(table, q.shape[1], tiles[0], launcher.option("schedule"))
    layout = table.layout
    return launcher.forward(
        q, k, v, table.kv_num_blocks, None, block_size=block, kv_len=layout.kv_len, softmax_scale=softmax_scale,
        ranges=(table.range_starts, table.range_ends), token_major=launcher.token_major_flags(table),
        layout=(layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens),
        tiles=tiles, schedule=schedule, return_lse=return_lse, head_order=head_order,
        visited=_visited(table),
    )  # fmt: skip


def block_list_on(table) -> bool:
    """Whether ``launcher.option("block_list")`` puts ``table`` in the kernel's block-list mode: True,
    False, or a number R: its runs of visited key blocks shorter than R on average
    (:func:`~sparse_vdit.block_table.run_length`: measured once per table, or declared by the
    builder of a per-call table, so no host sync per call)."""
    choice = launcher.option("block_list")
    if isinstance(choice, bool) or choice is None:
        return bool(choice)
    return 0.0 < run_length(table) < float(choice)


def _visited(table) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's block lists of ``table`` (counts, ascending indices) where :func:`block_list_on`, else None."""
    return (table.kv_num_blocks, table.kv_indices) if block_list_on(table) else None


SELECT_ON_DEVICE = True  # run_selected reads the per-(sample, head) choice in the kernel


def run_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, candidates, selected: torch.Tensor,
                 softmax_scale: float) -> torch.Tensor:  # fmt: skip
    """Head ``h`` of sample ``b`` attends with row ``selected[b, h]`` of ``candidates``, read in the
    kernel with that row's token order: one launch, every candidate resident, no host sync. The work
    is ordered by the most blocks any candidate visits per query block (kept with the table)."""
    block, heads = candidates.block_size, q.shape[2]
    tiles = _tiles(q, block)
    order = launcher.option("schedule")
    per_block, q_tiles = block // tiles[0], num_blocks(q.shape[1], tiles[0])
    counts = candidates.form(("select.counts", heads),
                             lambda t: t.kv_num_blocks.max(0).values.expand(heads, -1).contiguous())  # fmt: skip
    schedule = candidates.form(("triton.select_schedule", heads, per_block, q_tiles, order),
                               lambda t: launcher._schedule(counts, per_block, q_tiles, order))  # fmt: skip
    layout = candidates.layout
    token_major = launcher.token_major_flags(candidates)
    return launcher.forward(
        q, k, v, counts, None, block_size=block, kv_len=layout.kv_len, softmax_scale=softmax_scale,
        ranges=(candidates.range_starts, candidates.range_ends), token_major=token_major,
        layout=(layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens),
        tiles=tiles, schedule=schedule, selected=selected, visited=_visited(candidates),
    )  # fmt: skip


__all__ = ["BACKEND", "SELECT_ON_DEVICE", "block_list_on", "forward", "is_available", "run", "run_backward", "run_selected",
           "run_with_lse"]
