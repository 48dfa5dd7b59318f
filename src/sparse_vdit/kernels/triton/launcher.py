"""Launcher of the Triton block-sparse kernel: tile choice, work schedule, checks."""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

from ...block_table import is_power_of_two, num_blocks

LOG2E = 1.4426950408889634

# Kernel options (None: the default, DEFAULTS): ``tma`` loads the whole key tiles of frame-major
# heads through tensor descriptors (sm90+, or the interpreter), ``warp_specialize`` asks Triton to
# warp-specialise the key loop, ``schedule`` orders the work (see _schedule). Set by benchmarks and
# tests; the defaults are the fastest set of bench/kernel_variants.py on an H200 (BENCHMARKS.md).
# Token-major heads read in place load each key tile through the permutation row by row (reading a
# key range frame by frame as contiguous runs lost on an H200, issue 21; BENCHMARKS.md).
# ``tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) in place of the rule of ``_tiles``, or a dict
# {density bucket (``tuning.DENSITY_BUCKETS``) or (head dim, density bucket): tiles} read per table by
# ``backend`` (None, or a bucket not listed: the rule).
# ``block_list``: the kernel walks each query tile's visited key blocks as one list in one loop over key
# tiles (the pipeliner prefetches across what were range boundaries) instead of range by range: True,
# False, or a number R: for tables whose runs of visited key blocks are shorter than R blocks on average
# (``block_table.run_length``; online tables declare theirs, so no host sync). Default 8, from issue 22's
# H200 runs (bf16, 25%, kernel alone, time vs the offline plan's tables in range mode; Wan-1.3B 480p /
# Wan-14B 720p): online top-k tables (runs 1.33 blocks, 48 / 111 ranges a row) 1.41x / 1.27x in ranges,
# 1.19x / 1.09x as lists at 3 stages, 1.04x / 1.01x as lists at 5 (``list_stages``); top-k in pairs of key
# blocks (runs 2.65, 24 / 56 ranges) 1.20x / 1.10x in ranges, 1.19x / 1.15x as lists at 3 stages; the plan's
# own tables (runs ~50, 1.2 ranges) 1.27x / 1.31x slower as lists. End to end (Wan-1.3B compiled, 25%), the
# hybrid (a quarter of the heads online: declared runs 3.8) 321.7 ms in ranges, 301.2 ms as lists at 5
# stages. Run length, not ranges a row, separates them; 8 sits between the hybrid's 3.8 and plans' 46-61.
# ``list_stages``: software-pipelining stages of block-list launches (None: the tiles' own), on sm90+ only
# by default (shared memory for a third key/value buffer; elsewhere the tiles' own; a launch shape that still
# runs out of shared memory, e.g. head dim 256, runs at the tiles' own, remembered). Compiled for sm_90 on the
# CPU (Triton 3.9, 128x64 tiles, 8 warps), the range loop keeps as many key/value buffers as stages (3 at 3);
# the list loop, whose block index is a load of its own in the pipeline, keeps 2 at 3 and 4 stages and 3 at
# 5. Default 5, from issue 22's H200 run (bf16, 25%, online top-k tables as lists, kernel time vs the plan's
# tables in ranges; Wan-1.3B 480p / Wan-14B 720p): 1.21x / 1.11x at the tiles' 3 stages, 1.20x / 1.10x at
# 4, 1.04x / 1.01x at 5 (`bench/online_cost.py --block-list --list-stages 4 5`, BENCHMARKS.md).
# Dropped after an H200 run (session r): a forward written in Gluon with the softmax beside the previous key
# tile's P V (asynchronous MMAs), one work item a program or persistent: 0.02-0.14 below this kernel in all 32
# processor cells (its code is in commit c3b88b1).
OPTIONS: dict[str, bool | float | str | tuple | dict | None] = {"tma": None, "warp_specialize": None, "schedule": None,
                                                                "tiles": None, "block_list": None,
                                                                "list_stages": None}  # fmt: skip
DEFAULTS: dict[str, bool | float | str | tuple | dict | None] = {"tma": True, "warp_specialize": False,
                                                                 "schedule": "levels", "tiles": None,
                                                                 "block_list": 8.0, "list_stages": 5}  # fmt: skip
# Launch shapes (device, dtype, head dim, tiles, warps) whose block-list launch at ``list_stages`` ran out of
# shared memory; they run at the tiles' own stages from then on.
_LIST_STAGES_TOO_DEEP: set[tuple] = set()


def option(name: str):
    """The kernel option ``name`` in force: ``OPTIONS`` where set, else ``DEFAULTS``."""
    return DEFAULTS[name] if OPTIONS[name] is None else OPTIONS[name]


@contextmanager
def options_set(**options):
    """``OPTIONS`` set to ``options`` for the calls inside, restored after (benchmarks' A/B runs)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise KeyError(f"unknown Triton kernel options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    saved = {name: OPTIONS[name] for name in options}
    OPTIONS.update(options)
    try:
        yield
    finally:
        OPTIONS.update(saved)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device`` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err})"
    if device is not None and device.type == "cpu":
        return (True, "Triton interpreter") if interpreting() else (False, "needs CUDA (or TRITON_INTERPRET=1)")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, "Triton on CUDA"


def _tiles(
    block_size: int, head_dim: int, device: torch.device, override: tuple[int, int, int, int] | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this GPU generation, or ``override`` once checked."""
    if override is not None:
        block_m, block_n, warps, stages = (int(x) for x in override)
        for name, tile in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
            if tile < 16 or not is_power_of_two(tile) or block_size % tile:
                raise ValueError(f"{name}={tile} must be a power of two >= 16 dividing the block size {block_size}")
        return block_m, block_n, warps, stages
    if device.type == "cpu":
        return block_size, block_size, 4, 1
    major, _ = torch.cuda.get_device_capability(device)
    block_m = min(block_size, 128)
    block_n = min(block_size, 64 if head_dim > 64 or major < 9 else 128)
    warps = 8 if block_m * head_dim >= 128 * 128 else 4
    stages = 3 if major >= 8 else 2
    return block_m, block_n, warps, stages


# The rule's exception for small launches at low density, on inputs in each head's own order
# (issue 21's H200 sweep, bf16, head dim 128, the kernel alone): Wan-1.3B 480p (12 heads, 23
# 128-row query tiles per SM) at 5-20% ran faster on 64 x 64 tiles (block efficiency 0.88-0.97 vs the
# rule's 0.81-0.92, but for multi-diagonal 20%: 0.88 vs 0.92), not at 40% (0.85-0.87 vs 0.88-0.94);
# Wan-14B and HunyuanVideo 720p (169-179 tiles per SM) kept the rule at every density.
SMALL_LAUNCH_TILES = (64, 64, 4, 3)
SMALL_LAUNCH_MAX_DENSITY = 0.3
SMALL_LAUNCH_MAX_TILES_PER_SM = 64


def small_launch(major: int, sms: int, block_size: int, head_dim: int, rows: int, density: float) -> bool:
    """Whether a launch of ``rows`` query rows (batch x heads x tokens) at ``density`` takes
    :data:`SMALL_LAUNCH_TILES` instead of the rule on a GPU of compute capability ``major`` with ``sms`` SMs."""
    return (major >= 9 and head_dim == 128 and block_size % 64 == 0 and density <= SMALL_LAUNCH_MAX_DENSITY
            and rows < SMALL_LAUNCH_MAX_TILES_PER_SM * 128 * sms)  # fmt: skip


def small_launch_tiles(q: torch.Tensor, block_size: int, density: float) -> tuple[int, int, int, int] | None:
    """:data:`SMALL_LAUNCH_TILES` where :func:`small_launch` holds for head-ordered ``q`` [B, N, H, D]
    on its CUDA device, else None (the rule)."""
    if q.device.type != "cuda":
        return None
    batch, n, heads, dim = q.shape
    major, sms = _device_facts(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return SMALL_LAUNCH_TILES if small_launch(major, sms, block_size, dim, batch * heads * n, density) else None


@functools.cache
def _device_facts(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count


SCHEDULES = ("work", "heads", "levels")


def tile_work(block_work: torch.Tensor, tiles_per_block: int, num_tiles: int) -> torch.Tensor:
    """``[H, num_tiles]``: each tile's work, its table block's (``block_work`` ``[H, blocks]``)."""
    return block_work.repeat_interleave(tiles_per_block, dim=1)[:, :num_tiles]


def _schedule(kv_num_blocks: torch.Tensor, tiles_per_block: int, num_q_tiles: int, order: str = "work") -> torch.Tensor:
    """Work items ``head * num_q_tiles + tile``, heavy work first (no idle tail behind dense heads).

    ``"work"``: every tile by its work, heaviest first. ``"heads"``: heads by their total work,
    heaviest first, each head's tiles together (heaviest first, then in order), so that the
    programs running at once read one head's keys and values (L2 reuse). ``"levels"``: tiles by
    power-of-two work level, heaviest level first, and within a level head by head in order: the
    heavy tiles (dense text rows, dense heads) still go first, the rest keeps one head's tiles together.
    """
    if order not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {order!r}")
    heads = kv_num_blocks.shape[0]
    work = tile_work(kv_num_blocks, tiles_per_block, num_q_tiles)
    if order == "work":
        result = torch.argsort(work.flatten(), descending=True, stable=True)
    elif order == "heads":
        by_head = torch.argsort(work.sum(1), descending=True, stable=True)
        within = torch.argsort(work, dim=1, descending=True, stable=True)
        result = (by_head[:, None] * num_q_tiles + within[by_head]).flatten()
    else:
        level = torch.where(work > 0, torch.log2(work.clamp_min(1).double()).floor(), -1.0)
        result = torch.argsort(level.flatten(), descending=True, stable=True)
    assert result.numel() == heads * num_q_tiles
    return result.to(torch.int32)


def table_schedule(table, n: int, block_m: int, order: str) -> torch.Tensor:
    """:func:`_schedule`'s work items of ``table`` for ``block_m``-row query tiles over ``n`` tokens, kept
    with the table (computed once per table and tile)."""
    per_block, q_tiles = table.block_size // block_m, num_blocks(n, block_m)
    return table.form(("triton.schedule", per_block, q_tiles, order),
                      lambda t: _schedule(t.kv_num_blocks, per_block, q_tiles, order))


def token_major_flags(table) -> torch.Tensor | None:
    """The kernels' int8 token-major flags of ``table``'s heads, kept with the table (no cast launched per
    call); None where every head is frame-major."""
    if not table.token_major_heads:
        return None
    return table.form("triton.token_major_int8", lambda t: t.token_major.to(torch.int8))


def side_slots(table) -> torch.Tensor:
    """int32 ``[H]``, kept with ``table``: each token-major head's slot among them (in head order), -1 for others."""

    def build(t):
        flags = t.token_major.to(torch.int32)
        return torch.where(flags != 0, flags.cumsum(0) - 1, -1).to(torch.int32)

    return table.form("triton.side_slots", build)


def _tma_ok(device: torch.device) -> bool:
    if device.type == "cpu":
        return interpreting()
    return torch.cuda.get_device_capability(device)[0] >= 9


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple | None:
    """Tensor descriptors of ``[B, N, H, D]`` keys and values, one ``[1, block_n, 1, D]`` tile at a
    time; None where the tensors do not allow them (16-byte aligned base and strides)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dim = k.shape[-1]
    try:
        return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, 1, dim]) for t in (k, v))
    except AssertionError:
        return None


def launch_options(device: torch.device, warps: int, stages: int, block_list: bool) -> dict:
    """Triton's launch options (none in the interpreter): ``warps``, and ``stages`` or, for a
    block-list launch, ``list_stages`` (where set in ``OPTIONS``; by default on sm90+ only)."""
    if device.type == "cpu":
        return {}
    if block_list:
        chosen = OPTIONS["list_stages"]
        if chosen is None and torch.cuda.get_device_capability(device) >= (9, 0):
            chosen = DEFAULTS["list_stages"]
        stages = stages if chosen is None else int(chosen)
    return {"num_warps": warps, "num_stages": stages}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor | None,
    *,
    block_size: int,
    kv_len: int,
    softmax_scale: float,
    return_lse: bool = False,
    ranges: tuple[torch.Tensor, torch.Tensor],
    token_major: torch.Tensor | None = None,
    layout: tuple[int, int, int, int] = (1, 1, 0, 0),
    tiles: tuple[int, int, int, int] | None = None,
    schedule: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    head_order: bool = False,
    visited: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Block-sparse attention on ``[B, N, H, D]`` tensors with one Triton launch for all heads.

    Reads the table's key-block ``ranges`` (starts, ends: int32 [H, Qb, R]) directly, so
    ``kv_indices`` is not needed; ``kv_num_blocks`` orders the work, heaviest first. Heads with
    ``token_major[h]`` (bool [H]; None when there are none) have tables in token-major order: the kernel reads and writes
    their rows through that order (``layout`` = frames, frame tokens, video start, video
    tokens), so q, k, v and the output stay frame-major in memory.

    ``selected`` (int32 [B, H], on q's device): ``ranges`` and ``token_major`` then hold candidate
    tables ([M, Qb, R] and [M]) and head ``h`` of sample ``b`` reads candidate ``selected[b, h]``,
    chosen on the device (``kv_num_blocks`` [H, Qb] then only orders the work).

    ``tiles`` (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the fixed rule of ``_tiles``
    (:func:`sparse_vdit.kernels.triton.backend.run` passes the measured choice of ``tuning``);
    ``schedule`` is the work order of :func:`_schedule` for those tiles (computed when not given).
    ``return_lse``: also return each row's log-sum-exp, float32 ``[B, H, N]`` by memory row (what
    :mod:`.backward` needs).

    ``head_order``: q, k, v already hold each head in its own order (token-major heads permuted, as
    :func:`sparse_vdit.kernels.head_order.to_head_order` writes them): every head's key tiles are
    contiguous (TMA for all), and the output rows are still stored frame-major (no inverse copy).

    ``visited`` (counts int32 [H, Qb], ascending key-block lists int32 [H, Qb, W]; [M, ...] with
    ``selected``; the table's ``kv_num_blocks`` / ``kv_indices``): the kernel walks these lists in one
    loop over key tiles instead of the ranges (block-list mode, for scattered tables).
    """
    from triton.runtime.errors import OutOfResources

    from .kernel import block_sparse_attention_fwd

    batch, n, heads, dim = q.shape
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("the Triton backend needs the head dim contiguous (stride 1)")
    block_m, block_n, warps, stages = _tiles(block_size, dim, q.device, tiles)
    num_q_tiles = num_blocks(n, block_m)
    if schedule is None:
        schedule = _schedule(kv_num_blocks, block_size // block_m, num_q_tiles, option("schedule"))
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device) if return_lse else None
    starts, ends = (r.contiguous() for r in ranges)
    any_token_major = token_major is not None  # None: every head is frame-major
    flags = token_major.to(torch.int8) if any_token_major else starts  # any pointer when unused
    use_tma = bool(option("tma")) and _tma_ok(q.device)
    descriptors = _descriptors(k, v, block_n) if use_tma else None
    tma = descriptors is not None
    descriptors = descriptors or (starts, starts)  # any pointers when unused
    select = selected is not None
    if select and (selected.shape != (batch, heads) or selected.dtype != torch.int32 or selected.device != q.device):
        raise ValueError(f"selected must be int32 [{batch}, {heads}] on {q.device}, got {selected.dtype} "
                         f"{tuple(selected.shape)} on {selected.device}")  # fmt: skip
    selected = selected.contiguous() if select else starts
    block_list = visited is not None
    counts, blocks = (t.contiguous() for t in visited) if block_list else (starts, starts)  # any pointers when unused
    if block_list and (counts.dtype != torch.int32 or blocks.dtype != torch.int32 or blocks.shape[:2] != counts.shape
                       or counts.shape[1] != starts.shape[1]):  # fmt: skip
        raise ValueError(f"visited must be int32 counts [rows, {starts.shape[1]}] and lists [rows, "
                         f"{starts.shape[1]}, W], got {tuple(counts.shape)} {counts.dtype}, "
                         f"{tuple(blocks.shape)} {blocks.dtype}")  # fmt: skip
    shape_key = (q.device, q.dtype, dim, block_m, block_n, warps)

    def launch(extra: dict) -> None:
        block_sparse_attention_fwd[(schedule.numel(), batch)](
            q, k, v, out, *descriptors, starts, ends, schedule, flags, selected,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            starts.stride(0), starts.stride(1), selected.stride(0) if select else 0,
            n, kv_len, num_q_tiles, starts.shape[2], *layout[1:],
            softmax_scale * LOG2E,
            LSE=lse if return_lse else out, stride_lb=heads * n,
            COUNTS=counts, BLOCKS=blocks, stride_ch=counts.stride(0), stride_bh=blocks.stride(0),
            stride_bm=blocks.stride(1), STORE_LSE=return_lse,
            FRAMES=layout[0], TABLE_BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
            IEEE=q.dtype == torch.float32, ANY_TOKEN_MAJOR=any_token_major,
            TMA=tma, WARP_SPECIALIZE=bool(option("warp_specialize")), SELECT=select,
            HEAD_ORDER=head_order and any_token_major, BLOCK_LIST=block_list,
            **extra,
        )  # fmt: skip

    extra = launch_options(q.device, warps, stages, block_list)
    deeper = block_list and extra.get("num_stages", stages) != stages  # list_stages in force
    if deeper and shape_key in _LIST_STAGES_TOO_DEEP:
        extra, deeper = {**extra, "num_stages": stages}, False
    try:
        launch(extra)
    except OutOfResources:  # a deeper list pipeline than this GPU's shared memory holds: the tiles' own
        if not deeper:
            raise
        _LIST_STAGES_TOO_DEEP.add(shape_key)
        launch({**extra, "num_stages": stages})
    return (out, lse) if return_lse else out
