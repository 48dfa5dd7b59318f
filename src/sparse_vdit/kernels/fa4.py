"""FlashAttention-4 backend: our block tables fed to FA4's block-sparse forward (CuTe DSL).

FA4 (PyPI ``flash-attn-4``, tested with 4.0.0b36) takes block sparsity as a
``BlockSparseTensorsTorch`` of int32 tensors: ``mask_block_cnt`` [B, H, Qb] and
``mask_block_idx`` [B, H, Qb, W] for *partial* blocks (masked by a ``mask_mod``), and
``full_block_cnt`` / ``full_block_idx`` of the same shapes for *full* blocks; batch and head
dims may be 1 (broadcast); ``W`` may be smaller than the number of key blocks (only the first
``cnt`` slots are read); ``block_size=(block_q, block_kv)``. We pass every visited block as a
full block and an all-zero partial list. FA4 masks the ragged last key block itself (by
``seqlen_k``) on the first full block it processes, which is the *last* of the list, so indices
must ascend (ours do). A query tile with no block at all is written as zeros.

Tile constraints (``flash_attn/cute/interface.py``): on Hopper (sm90) the key block must equal
the kernel's ``tile_n`` (128, or 64 with 64x64 tiles), and the query block a multiple of
``tile_m`` (128 for D=128; D=64 uses 128x128 tiles when told ``block_size=(128, 128)``). On
datacenter Blackwell (sm100/sm103) the forward processes two 128-row Q tiles per CTA
(``q_stage=2``), so query blocks must be multiples of 256.

The backward (:func:`run_backward`) runs FA4's block-sparse backward (``_flash_attn_bwd``) where it
serves (:func:`backward_supports`), else our Triton backward (:data:`BACKWARD` forces either).
FA4's backward walks key tiles, so it takes the table transposed ("Q-direction", as FlashAttention's
``BlockMask`` keeps ``q_num_blocks`` / ``q_indices``): counts ``[B, H, key blocks]`` and indices
``[B, H, key blocks, W]`` (W <= query blocks) of the query blocks visiting each key block, again
all as full blocks beside an empty partial list, ``block_size=(block_q, block_kv)``
(:func:`backward_tensors`). Its tiles: on Hopper ``tile_n`` = the key block exactly (128 for head
dims up to 128) and ``tile_m`` (64, or 128 at D <= 64) dividing the query block; on Blackwell
128 x 128 tiles, blocks any multiple of 128. It masks keys past ``seqlen_k`` on every tile, skips
query subtiles past ``seqlen_q``, writes zero dK/dV for key blocks no query visits, and never
reads the rows of query blocks outside the lists (their LSE may be -inf: rows that visit nothing).

The import of ``flash_attn`` is lazy: this module imports without flash-attn-4.
"""

from __future__ import annotations

import torch

from ..block_table import expand_ranges, num_blocks
from .registry import Backend, logger

BACKEND = Backend("fa4", (torch.bfloat16, torch.float16), (64, 128), needs_cuda=True, token_major_in_place=False, auto_rank=0,
                  backward=True,
                  note="FlashAttention-4 block sparsity, Hopper / datacenter Blackwell; block sizes: supports()")

_FA4 = None
_IMPORT_ERROR: str | None = None
_SUPPORTED_ARCH = {(9, 0): "Hopper", (10, 0): "Blackwell", (10, 3): "Blackwell"}

# Tests set this to fill the output with NaN before the kernel runs (checks every element is written).
_POISON = False


def _import():
    """(flash_attn.cute.interface, BlockSparseTensorsTorch), imported once."""
    global _FA4, _IMPORT_ERROR
    if _FA4 is None:
        if _IMPORT_ERROR is not None:
            raise ImportError(_IMPORT_ERROR)
        try:
            from flash_attn.cute import interface
            from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        except Exception as exc:  # ImportError, or a CUDA / cutlass-dsl library failing to load
            _IMPORT_ERROR = (
                f"flash-attn-4 is not importable ({type(exc).__name__}: {exc}); "
                "install it with `pip install 'sparse-vdit[fa4]'`"
            )
            raise ImportError(_IMPORT_ERROR) from exc
        _FA4 = (interface, BlockSparseTensorsTorch)
    return _FA4


def version() -> str | None:
    """Installed flash-attn-4 version, or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("flash-attn-4")
    except PackageNotFoundError:
        return None


def _arch(device: torch.device | None = None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def is_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether FA4 block-sparse attention can run on ``device`` (default: the current GPU), and why (not)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False, f"FA4 needs CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return False, "FA4 needs a CUDA GPU (none visible)"
    major, minor = _arch(device)
    if (major, minor) not in _SUPPORTED_ARCH:
        return False, (
            f"FA4 block sparsity runs on Hopper (sm90) and datacenter Blackwell (sm100/sm103); "
            f"this GPU ({torch.cuda.get_device_name(device)}) is sm{major}{minor}"
        )
    try:
        _import()
    except ImportError as exc:
        return False, str(exc)
    return True, f"FA4 {version() or '?'} on {_SUPPORTED_ARCH[(major, minor)]} sm{major}{minor}"


def supports(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether FA4 can run a table of ``block_size`` at this head dim and dtype on ``device``."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"FA4 takes float16 or bfloat16 inputs, got {dtype}"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return False, f"FA4 takes head dims that are multiples of 8 up to 256, got {head_dim}"
    if not torch.cuda.is_available():
        return False, "FA4 needs a CUDA GPU (none visible)"
    major, minor = _arch(torch.device(device) if device is not None else None)
    if major == 9:
        if block_size not in (64, 128):
            return False, f"FA4 on Hopper needs block_size 64 or 128 (its tile_n), got {block_size}"
    elif (major, minor) in _SUPPORTED_ARCH:
        if block_size % 256:
            return False, (
                f"FA4 on Blackwell processes query blocks of 256 (two 128-row tiles per CTA); "
                f"compile the table with block_size=256, got {block_size}"
            )
    else:
        return False, f"FA4 block sparsity needs sm90/sm100/sm103, this GPU is sm{major}{minor}"
    return True, "ok"


def _sparse_tensors(counts: torch.Tensor, indices: torch.Tensor, block_size: int, columns: int):
    """FA4's BlockSparseTensorsTorch of per-row block lists (int [H, rows], [H, rows, W]; ``columns``:
    the blocks a list may name, so at most that many slots are kept), every block a full block."""
    _, BlockSparseTensorsTorch = _import()
    heads, rows, width = indices.shape
    counts = counts.to(torch.int32).contiguous()[None]
    index = indices[..., : min(width, columns)].to(torch.int32).contiguous()[None]
    empty_counts = torch.zeros_like(counts)
    empty_index = torch.zeros(1, heads, rows, 1, dtype=torch.int32, device=indices.device)
    return BlockSparseTensorsTorch(
        mask_block_cnt=empty_counts,
        mask_block_idx=empty_index,
        full_block_cnt=counts,
        full_block_idx=index,
        block_size=(block_size, block_size),
    )


def table_tensors(table):
    """FA4's BlockSparseTensorsTorch of ``table`` for the forward, built once and kept with it."""
    return table.form("fa4.sparse_tensors", lambda t: _sparse_tensors(t.kv_num_blocks, t.kv_indices, t.block_size,
                                                                      t.num_kv_blocks))  # fmt: skip


def backward_lists(table) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed table as block lists: int32 counts ``[H, Kb]`` and ascending indices ``[H, Kb, W]``
    of the query blocks that visit each key block (``Kb``: key blocks of ``layout.kv_len``; later slots
    repeat one), from :attr:`BlockTable.query_ranges` (W read on the host: :func:`backward_tensors` keeps it)."""
    starts, ends = table.query_ranges  # one row per block of the sequence: the first Kb are the key blocks
    return expand_ranges(starts[:, : table.num_kv_blocks], ends[:, : table.num_kv_blocks])


def backward_tensors(table):
    """FA4's BlockSparseTensorsTorch of ``table`` for its backward (query blocks per key block), kept with it."""
    return table.form("fa4.backward_tensors", lambda t: _sparse_tensors(*backward_lists(t), t.block_size,
                                                                        t.num_q_blocks))  # fmt: skip


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
    """Block-sparse attention through FA4; [B, N, H, D] in, [B, N, H, D] out (q's dtype).

    Builds FA4's block-sparse tensors on every call: :func:`run` keeps them with the table.
    """
    _import()
    batch, n, heads, dim = q.shape
    ok, why = supports(block_size, dim, q.dtype, q.device)
    if not ok:
        raise ValueError(why)
    if kv_num_blocks.shape != (heads, num_blocks(n, block_size)):
        raise ValueError(f"table counts of shape {tuple(kv_num_blocks.shape)} do not fit q of shape {tuple(q.shape)}")
    if kv_num_blocks.device != q.device:
        kv_num_blocks, kv_indices = kv_num_blocks.to(q.device), kv_indices.to(q.device)
    return _attend(q, k, v, _sparse_tensors(kv_num_blocks, kv_indices, block_size, num_blocks(kv_len, block_size)),
                   kv_len, softmax_scale)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float) -> torch.Tensor:
    """Block-sparse attention of ``table`` (token-major heads already permuted), FA4's tensors kept."""
    return _attend(q, k, v, table_tensors(table), table.layout.kv_len, softmax_scale)


def run_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float):
    """:func:`run` and FA4's log-sum-exp of each row (float32 ``[B, H, N]``, natural log), for :func:`run_backward`."""
    return _attend(q, k, v, table_tensors(table), table.layout.kv_len, softmax_scale, return_lse=True)


# Which backward the fa4 backend runs: "auto", FA4's block-sparse backward where it serves the inputs
# (backward_supports: CUDA sm90/sm100/sm103, its tiles fit the table's block, fp16/bf16), else the Triton
# backward; "triton", always the Triton backward (bench/backward.py's A/B: backend "fa4/triton"); "fa4",
# always FA4's (a ValueError where it cannot). Which one ran is said once per kind of input in the log.
# Default "auto": on an H200 (bf16, 4.0.0b36) FA4's backward passed the GPU tests against float64
# (tests/kernels/test_backward.py, bf16/fp16, head dims 64/128, text prefix/suffix, batch 2) and ran at
# 0.73-1.07 of cuDNN's dense backward per computed block against the Triton one's 0.52-0.64 (Wan-1.3B 480p,
# HunyuanVideo 720p, 10-50%; `bench/backward.py --backends fa4 fa4/triton`, BENCHMARKS.md).
BACKWARD_DEFAULT = "auto"
BACKWARD = BACKWARD_DEFAULT
_BACKWARD_MODES = ("auto", "fa4", "triton")
_SAID_BACKWARD: set = set()


def _hopper_backward_tiles(head_dim: int, block_q: int) -> tuple[int, int]:
    """``(tile_m, tile_n)`` of FA4's sm90 backward, non-causal, for sparse query blocks of ``block_q``
    (``flash_attn.cute.interface._tile_size_bwd_sm90``, 4.0.0b36)."""
    if head_dim <= 64:
        return 128, 128
    if head_dim <= 96:
        return 64, 128
    if head_dim <= 128:
        return (80 if block_q % 80 == 0 else 64), 128
    return (64, 96) if head_dim <= 192 else (64, 64)


def backward_supports(block_size: int, head_dim: int, dtype: torch.dtype, arch: tuple[int, int]) -> tuple[bool, str]:
    """Whether FA4's block-sparse backward runs a table of ``block_size`` at this head dim and dtype on a
    GPU of compute capability ``arch``, and why (not). Its tiles (``_flash_attn_bwd``): on Hopper the key
    block must be its ``tile_n`` and a multiple of its ``tile_m``; on Blackwell (128 x 128 tiles, subtiles
    in both directions) a multiple of 128, head dims up to 128 (hd 192 / 256 take other kernels)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"FA4's backward takes float16 or bfloat16, got {dtype}"
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return False, f"FA4 takes head dims that are multiples of 8 up to 256, got {head_dim}"
    if tuple(arch) == (9, 0):
        tile_m, tile_n = _hopper_backward_tiles(head_dim, block_size)
        if block_size != tile_n or block_size % tile_m:
            return False, (f"FA4's block-sparse backward on Hopper needs block_size {tile_n} (its {tile_m} x {tile_n} "
                           f"tiles at head_dim {head_dim}), got {block_size}")  # fmt: skip
        return True, f"FA4's block-sparse backward on Hopper ({tile_m} x {tile_n} tiles)"
    if tuple(arch) in _SUPPORTED_ARCH:
        if head_dim > 128:
            return False, f"FA4's block-sparse backward on Blackwell is used here for head dims up to 128, got {head_dim}"
        if block_size % 128:
            return False, f"FA4's block-sparse backward on Blackwell needs blocks of a multiple of 128, got {block_size}"
        return True, "FA4's block-sparse backward on Blackwell (128 x 128 tiles)"
    return False, f"FA4's block-sparse backward runs on sm90/sm100/sm103, this GPU is sm{arch[0]}{arch[1]}"


def _arch_of(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA ``device`` (None for other devices)."""
    return _arch(device) if device.type == "cuda" else None


def backward_path(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """``("fa4" | "triton", why)``: which backward :func:`run_backward` runs for these inputs under :data:`BACKWARD`."""
    if BACKWARD not in _BACKWARD_MODES:
        raise ValueError(f"fa4.BACKWARD must be one of {_BACKWARD_MODES}, got {BACKWARD!r}")
    if BACKWARD == "triton":
        return "triton", "fa4.BACKWARD = 'triton'"
    arch = _arch_of(device)
    ok, why = (False, f"FA4 needs CUDA tensors, not {device.type}") if arch is None else backward_supports(
        block_size, head_dim, dtype, arch)  # fmt: skip
    if not ok and BACKWARD == "fa4":
        raise ValueError(f"fa4.BACKWARD = 'fa4', but {why}")
    return ("fa4" if ok else "triton"), why


def run_backward(grad_out, q, k, v, out, lse, table, softmax_scale: float):
    """``(dq, dk, dv)`` on tensors already in each head's order (the forward's ``out`` and FA4's ``lse``):
    FA4's block-sparse backward where it serves, else the Triton backward (:func:`backward_path`), said
    once per (path, dtype, head dim, block, device) in the ``sparse_vdit`` log."""
    dim, block = q.shape[-1], table.block_size
    path, why = backward_path(block, dim, q.dtype, q.device)
    key = (path, q.dtype, dim, block, q.device)
    if key not in _SAID_BACKWARD:
        _SAID_BACKWARD.add(key)
        logger.warning("sparse_vdit: backend 'fa4' runs the %s backward for %s head_dim=%d block=%d on %s (%s)",
                       "FA4 block-sparse" if path == "fa4" else "Triton", str(q.dtype).removeprefix("torch."), dim,
                       block, q.device, why)  # fmt: skip
    if path == "triton":
        from .triton.backward import backward

        return backward(grad_out, q, k, v, out, lse, table, softmax_scale, token_major=False)
    return fa4_backward(grad_out, q, k, v, out, lse, table, softmax_scale)


def fa4_backward(grad_out, q, k, v, out, lse, table, softmax_scale: float):
    """``(dq, dk, dv)`` by FA4's block-sparse backward over ``table`` (:func:`backward_tensors`), no check
    of whether it serves. Keys past ``layout.kv_len`` are not passed (as in the forward); their rows of
    dK and dV are zero. Every other element is written by FA4 (tests poison the buffers: ``_POISON``)."""
    interface, _ = _import()
    n, kv_len = q.shape[1], table.layout.kv_len
    dq, dk, dv = (torch.full_like(t, float("nan")) if _POISON else torch.empty_like(t) for t in (q, k, v))
    if kv_len < n:
        dk[:, kv_len:], dv[:, kv_len:] = 0, 0
        k, v = k[:, :kv_len], v[:, :kv_len]
    with torch.cuda.device(q.device):
        interface._flash_attn_bwd(
            q, k, v, out, grad_out, lse, softmax_scale=float(softmax_scale), block_sparse_tensors=backward_tensors(table),
            dq=dq, dk=dk[:, :kv_len], dv=dv[:, :kv_len],
        )  # fmt: skip
    return dq, dk, dv


# Whether run_selected reads SVG's per-(sample, head) choice on the device (block tensors gathered
# from the resident candidates, token-major heads permuted by a Triton kernel reading the choice).
# Off until measured against the host path on a GPU (bench/svg.py's layer-device-fa4 part).
SELECT_ON_DEVICE = False


def gathered_tables(candidates, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, head) block lists gathered on the device from a table of candidates: counts
    int32 [B, H, Qb] and indices int32 [B, H, Qb, W] (W <= key blocks; later slots repeat one),
    as FA4's block-sparse tensors take them; no host sync."""
    chosen = selected.to(candidates.device).long()
    index = candidates.kv_indices[..., : candidates.num_kv_blocks]
    return candidates.kv_num_blocks[chosen], index[chosen].contiguous()


def run_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, candidates, selected: torch.Tensor,
                 softmax_scale: float) -> torch.Tensor:  # fmt: skip
    """Head ``h`` of sample ``b`` attends with row ``selected[b, h]`` of ``candidates``, the choice
    kept on the device: block tensors gathered per (sample, head), heads whose chosen row is
    token-major permuted there and back by a kernel that reads the choice."""
    from .triton.placement import head_order

    _, BlockSparseTensorsTorch = _import()
    counts, index = gathered_tables(candidates, selected)
    layout = candidates.layout
    geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
    moved = bool(candidates.token_major_heads)
    if moved:
        q, k, v = (head_order(t, selected, candidates.token_major, geometry) for t in (q, k, v))
    empty = torch.zeros(*counts.shape, 1, dtype=torch.int32, device=q.device)
    sparse = BlockSparseTensorsTorch(mask_block_cnt=torch.zeros_like(counts), mask_block_idx=empty,
                                     full_block_cnt=counts, full_block_idx=index,
                                     block_size=(candidates.block_size, candidates.block_size))  # fmt: skip
    out = _attend(q, k, v, sparse, layout.kv_len, softmax_scale)
    return head_order(out, selected, candidates.token_major, geometry, to_head_order=False) if moved else out


def _attend(q, k, v, sparse, kv_len: int, softmax_scale: float, return_lse: bool = False):
    interface, _ = _import()
    if k.shape[1] != kv_len:
        k, v = k[:, :kv_len], v[:, :kv_len]
    out = torch.full_like(q, float("nan")) if _POISON else torch.empty_like(q)
    with torch.cuda.device(q.device):
        result = interface._flash_attn_fwd(
            q, k, v, softmax_scale=float(softmax_scale), block_sparse_tensors=sparse, out=out, return_lse=return_lse
        )
    if not return_lse:
        return out
    lse = result[1] if isinstance(result, (tuple, list)) and len(result) > 1 else None
    if lse is None:
        raise RuntimeError(f"flash-attn-4 {version()} returned no log-sum-exp (return_lse=True): cannot run the backward")
    return out, lse


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Plain dense FA4 forward on [B, N, H, D] (a benchmark baseline)."""
    interface, _ = _import()
    out = torch.empty_like(q)
    with torch.cuda.device(q.device):
        interface._flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, out=out)
    return out


__all__ = ["BACKEND", "BACKWARD", "BACKWARD_DEFAULT", "SELECT_ON_DEVICE", "backward_lists", "backward_path", "backward_supports",
           "backward_tensors", "dense", "fa4_backward", "forward", "gathered_tables", "is_available", "run",
           "run_backward", "run_selected", "run_with_lse", "supports", "table_tensors", "version"]
