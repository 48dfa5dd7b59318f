"""`select_attention`: block-sparse attention where every (sample, head) picks one candidate table on the device."""

from __future__ import annotations

import torch

from ..layout import VideoLayout
from ..patterns.choice import HeadChoice
from ..patterns.table import BlockTable, compile_layer
from .api import RANGE_BACKENDS, _check, resolve_backend, sparse_attention

_SCHEDULE_COUNTS: dict = {}


def select_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    choice: HeadChoice,
    layout: VideoLayout,
    block_size: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one layer where head ``h`` of sample ``b`` uses ``choice.candidates[choice.selected[b, h]]``
    (tables at ``layout`` and ``block_size``).

    On the Triton backend both candidate tables stay resident on the device and the kernel reads
    the choice (and with it the head's token order): one launch, no host sync, nothing permuted.
    Other backends need the tables (and, for FA4 / FlexAttention, the token-major heads permuted
    in memory) known on the host: ``selected`` is copied there once and each group of samples
    with the same choices runs :func:`~sparse_vdit.sparse_attention` (one launch per group).
    """
    per_head = compile_layer(choice.candidates[:1] * q.shape[2], layout, block_size, q.device)
    scale = _check(q, k, v, per_head, softmax_scale)
    if choice.selected.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"selected is {tuple(choice.selected.shape)}, want (batch, heads) = {(q.shape[0], q.shape[2])}")
    name = resolve_backend(backend, q)
    if name in RANGE_BACKENDS and choice.selected.device == q.device:
        table = compile_layer(choice.candidates, layout, block_size, q.device)
        counts = _schedule_counts(table, q.shape[2])
        token_major = table.token_major if table.token_major_heads else None
        return torch.ops.sparse_vdit.select_attention(
            q, k, v, counts, table.range_starts, table.range_ends, token_major, choice.selected,
            layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens,
            block_size, layout.kv_len, scale,
        )  # fmt: skip
    chosen = choice.selected.cpu()  # the host path's one sync
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(chosen.tolist()):
        groups.setdefault(tuple(row), []).append(b)
    if len(groups) == 1:
        heads = tuple(choice.candidates[i] for i in next(iter(groups)))
        return sparse_attention(q, k, v, compile_layer(heads, layout, block_size, q.device), scale, backend)
    out = torch.empty_like(q)
    for row, samples in groups.items():
        table = compile_layer(tuple(choice.candidates[i] for i in row), layout, block_size, q.device)
        index = torch.tensor(samples, device=q.device)
        out[index] = sparse_attention(q[index], k[index], v[index], table, scale, backend)
    return out


def _schedule_counts(table: BlockTable, heads: int) -> torch.Tensor:
    """int32 [heads, Qb]: the most blocks any candidate visits per query block, to order the work."""
    key = (id(table), heads)
    hit = _SCHEDULE_COUNTS.get(key)
    if hit is None or hit[0] is not table:
        if len(_SCHEDULE_COUNTS) > 256:
            _SCHEDULE_COUNTS.clear()
        counts = table.kv_num_blocks.max(0).values.expand(heads, -1).contiguous()
        hit = _SCHEDULE_COUNTS[key] = (table, counts)
    return hit[1]


@torch.library.custom_op("sparse_vdit::select_attention", mutates_args=())
def _select_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    range_starts: torch.Tensor,
    range_ends: torch.Tensor,
    token_major: torch.Tensor | None,
    selected: torch.Tensor,
    frames: int,
    frame_tokens: int,
    video_start: int,
    video_tokens: int,
    block_size: int,
    kv_len: int,
    softmax_scale: float,
) -> torch.Tensor:
    from .triton import launcher

    return launcher.forward(q, k, v, kv_num_blocks, None, block_size=block_size, kv_len=kv_len,
                            softmax_scale=softmax_scale, ranges=(range_starts, range_ends), token_major=token_major,
                            layout=(frames, frame_tokens, video_start, video_tokens),
                            selected=selected.to(torch.int32))  # fmt: skip


@_select_attention_op.register_fake
def _(q, *args):
    return torch.empty_like(q)
