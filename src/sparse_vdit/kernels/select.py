"""`select_attention`: block-sparse attention where every (sample, head) picks one candidate table on the device."""

from __future__ import annotations

import torch

from ..layout import VideoLayout
from ..patterns.choice import HeadChoice
from ..patterns.table import BlockTable, compile_layer
from .api import RANGE_BACKENDS, _check, resolve_backend, sparse_attention

_SCHEDULE_COUNTS: dict = {}
# FlashAttention-4 reads the choice on the device too (per-(sample, head) block tensors gathered from
# the resident candidates, token-major heads permuted by a Triton kernel reading the choice). Off by
# default until measured against the host path on a GPU (bench/svg.py's layer-device-fa4 part).
FA4_ON_DEVICE = False


def decides_on_device(backend: str) -> bool:
    """Whether :func:`select_attention` keeps the choice on the device for this (resolved) backend."""
    return backend in RANGE_BACKENDS or (backend == "fa4" and FA4_ON_DEVICE)


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
    With ``FA4_ON_DEVICE`` FlashAttention-4 takes per-(sample, head) block tensors gathered on the
    device (:func:`gathered_tables`) and the token-major heads are permuted by a kernel that reads
    the choice (:mod:`~sparse_vdit.kernels.triton.placement`): no sync there either.
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
    if name == "fa4" and FA4_ON_DEVICE and choice.selected.device == q.device:
        from . import fa4

        if fa4.supports(block_size, q.shape[-1], q.dtype, q.device)[0]:
            return _fa4_on_device(q, k, v, choice, layout, block_size, scale)
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


def gathered_tables(choice: HeadChoice, layout: VideoLayout, block_size: int, device: torch.device):
    """Per-(sample, head) tables gathered on the device from the resident candidates: counts int32
    [B, H, Qb], indices int32 [B, H, Qb, W] (W <= key blocks; later slots repeat one) and the
    candidates' token-major flags [M], as FlashAttention-4's block-sparse tensors take them."""
    table = compile_layer(choice.candidates, layout, block_size, device)
    selected = choice.selected.to(device).long()
    index = table.kv_indices[..., : table.num_kv_blocks]
    return table.kv_num_blocks[selected], index[selected], table.token_major


def _fa4_on_device(q, k, v, choice: HeadChoice, layout: VideoLayout, block_size: int, scale: float) -> torch.Tensor:
    from . import fa4
    from .triton.placement import head_order

    interface, BlockSparseTensorsTorch = fa4._import()
    counts, index, token_major = gathered_tables(choice, layout, block_size, q.device)
    geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
    moved = any(p.token_major for p in choice.candidates)
    if moved:
        q, k, v = (head_order(t, choice.selected, token_major, geometry) for t in (q, k, v))
    if k.shape[1] != layout.kv_len:
        k, v = k[:, : layout.kv_len], v[:, : layout.kv_len]
    empty = torch.zeros(*counts.shape, 1, dtype=torch.int32, device=q.device)
    sparse = BlockSparseTensorsTorch(mask_block_cnt=torch.zeros_like(counts), mask_block_idx=empty,
                                     full_block_cnt=counts, full_block_idx=index,
                                     block_size=(block_size, block_size))  # fmt: skip
    out = torch.empty_like(q)
    with torch.cuda.device(q.device):
        interface._flash_attn_fwd(q, k, v, softmax_scale=float(scale), block_sparse_tensors=sparse, out=out)
    return head_order(out, choice.selected, token_major, geometry, to_head_order=False) if moved else out


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
