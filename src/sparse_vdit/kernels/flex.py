"""FlexAttention backend: block tables -> ``BlockMask.from_kv_blocks`` -> compiled ``flex_attention``.

No N x N mask is ever built: the BlockMask is made from our tables directly (block level only).
The sequence is padded to a multiple of the block; every visited key block is a *full* block
except the ragged last key block, which is a *partial* block masked by ``kv_idx < kv_len``.
A table's BlockMask is built once and kept with the table (``BlockTable.form``), and
``flex_attention`` is ``torch.compile``'d once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_table import num_blocks
from .registry import API_DTYPES, Backend

BACKEND = Backend("flex", API_DTYPES, (64, 128), needs_cuda=True, token_major_in_place=False, auto_rank=2, backward=True,
                  note="FlexAttention from our tables (BlockMask.from_kv_blocks), compiled once")

_COMPILED = None


def is_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether this backend can run on ``device`` (default: the current GPU), and why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch >= 2.5 has it
        return False, f"torch {torch.__version__} has no FlexAttention ({exc})"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False, f"the FlexAttention backend needs CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return False, "the FlexAttention backend needs a CUDA GPU (none visible)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"FlexAttention needs compute capability >= 8.0, this GPU is {major}.{minor}"
    return True, f"FlexAttention (torch {torch.__version__}) on sm{major}{minor}"


def bump_recompile_limits() -> None:
    """One compiled graph per (shape, dtype, kv_len): raise dynamo's recompile limits for a model's layouts."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


def _compiled_flex():
    """``torch.compile(flex_attention)``, built once (the CPU gets inductor's C++ kernel).

    ``fullgraph=True`` so that hitting a recompile limit raises instead of silently running eager
    FlexAttention, which ignores the block structure (and builds an N x N score matrix).
    """
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        bump_recompile_limits()
        _COMPILED = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _COMPILED


def _kv_mask(kv_len: int):
    def kv_in_range(b, h, q_idx, kv_idx):
        return kv_idx < kv_len

    return kv_in_range


def block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *, block_size: int, q_len: int, kv_len: int):
    """The BlockMask of a table's index form, for a sequence padded to a multiple of ``block_size``."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, qb, width = kv_indices.shape
    kb = num_blocks(kv_len, block_size)
    if qb != num_blocks(q_len, block_size):
        raise ValueError(f"table has {qb} query blocks, the sequence of {q_len} needs {num_blocks(q_len, block_size)}")
    counts = kv_num_blocks.to(torch.int32)
    index = kv_indices.to(torch.int32)
    # FlexAttention wants the full number of key blocks as the last dimension (DESIGN.md facts).
    if width >= kb:
        index = index[..., :kb]
    else:
        index = torch.cat([index, index[..., -1:].expand(heads, qb, kb - width)], dim=-1)
    index = index.contiguous()
    if kv_len % block_size:
        # The ragged last key block is the last visited index of a row (indices ascend).
        last = torch.gather(index, -1, (counts.long() - 1).clamp(min=0)[..., None])[..., 0]
        has_last = ((counts > 0) & (last == kb - 1)).to(torch.int32)
        full_counts = counts - has_last
        partial_counts = has_last
        partial_index = torch.full_like(index, kb - 1)
    else:
        full_counts = counts
        partial_counts = torch.zeros_like(counts)
        partial_index = torch.zeros_like(index)
    mask = BlockMask.from_kv_blocks(
        partial_counts[None],
        partial_index[None],
        full_counts[None].contiguous(),
        index[None],
        BLOCK_SIZE=block_size,
        mask_mod=_kv_mask(kv_len),
        seq_lengths=(qb * block_size, kb * block_size),
        compute_q_blocks=True,  # the backward needs the transposed (q) indices
    )
    return mask


def table_mask(table):
    """The BlockMask of ``table``, built once and kept with it."""
    return table.form("flex.block_mask", lambda t: block_mask(
        t.kv_num_blocks, t.kv_indices, block_size=t.block_size, q_len=t.layout.num_tokens, kv_len=t.layout.kv_len))
def kernel_options(block_size: int) -> dict | None:
    """Inductor's tiles must divide the BlockMask's blocks: below 128 (its default query tile), tiles
    of the table's block size (else "Q and KV block size must be divisible by BLOCK_M/BLOCK_N")."""
    return None if block_size >= 128 else {"BLOCK_M": block_size, "BLOCK_N": block_size}


def _pad_heads_first(x: torch.Tensor, length: int, padded: int) -> torch.Tensor:
    """[B, N, H, D] -> [B, H, padded, D] (a view when no padding is needed)."""
    x = x[:, :length]
    if padded != length:
        x = F.pad(x, (0, 0, 0, 0, 0, padded - length))
    return x.transpose(1, 2)


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
    """Block-sparse attention through FlexAttention; [B, N, H, D] in, [B, N, H, D] out (q's dtype).

    Builds the BlockMask on every call: :func:`run` keeps it with the table.
    """
    heads, n = q.shape[2], q.shape[1]
    if kv_num_blocks.shape[0] != heads:
        raise ValueError(f"table has {kv_num_blocks.shape[0]} heads, q has {heads}")
    if kv_num_blocks.device != q.device:
        kv_num_blocks, kv_indices = kv_num_blocks.to(q.device), kv_indices.to(q.device)
    mask = block_mask(kv_num_blocks, kv_indices, block_size=block_size, q_len=n, kv_len=kv_len)
    return _attend(q, k, v, mask, block_size=block_size, kv_len=kv_len, softmax_scale=softmax_scale)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float) -> torch.Tensor:
    """Block-sparse attention of ``table`` (token-major heads already permuted), its BlockMask kept."""
    return _attend(q, k, v, table_mask(table), block_size=table.block_size, kv_len=table.layout.kv_len,
                   softmax_scale=softmax_scale)  # fmt: skip


def _attend(q, k, v, mask, *, block_size: int, kv_len: int, softmax_scale: float) -> torch.Tensor:
    n = q.shape[1]
    qb, kb = num_blocks(n, block_size), num_blocks(kv_len, block_size)
    qh = _pad_heads_first(q, n, qb * block_size)
    kh = _pad_heads_first(k, kv_len, kb * block_size)
    vh = _pad_heads_first(v, kv_len, kb * block_size)
    # Always the compiled kernel: eager FlexAttention ignores the block structure (it evaluates only
    # mask_mod, over a full N x N score matrix), so it would compute dense attention here.
    out = _compiled_flex()(qh, kh, vh, block_mask=mask, scale=float(softmax_scale),
                           kernel_options=kernel_options(block_size))  # fmt: skip
    return out.transpose(1, 2)[:, :n].contiguous()


__all__ = ["BACKEND", "block_mask", "forward", "is_available", "run", "table_mask"]
