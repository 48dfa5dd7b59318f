"""Block-sparse attention forward for Hopper (sm90) in Gluon, Triton's lower-level language.

Triton 3.6 (and 3.9) compiles our Triton kernel's key loop so that each tile's scores are waited for
before its softmax: the tensor cores idle while the softmax runs, and Triton's warp specialisation
does not build for this loop on sm90 (issue 21; BENCHMARKS.md). This kernel writes the loop by hand
with asynchronous warpgroup MMAs, as FlashAttention-3 does within a warpgroup: tile ``j``'s scores
``Q K_j`` and tile ``j - 1``'s ``P V`` are issued together, the softmax of tile ``j`` runs while
``P V`` is still on the tensor cores, and keys and values arrive by TMA ``STAGES`` tiles ahead.

A program takes work items (a query tile of a head of a sample) one after another, or one only
(``persistent``): its key tiles form one stream through the ring, so the next item's query tile and
first key tiles load while this item's last ones run.

It serves inputs in each head's own order (the processor's fused path; frame-major heads are
already in theirs), contiguous ``[B, N, H, D]`` bf16 / fp16 with D 64 or 128, on sm90, walking the
table's ascending key-block lists; the output goes to frame-major rows, as the Triton kernel's
``HEAD_ORDER`` path. Opt-in: ``launcher.OPTIONS["gluon"]`` (see :func:`applies`).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load (the old name raises)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# (BLOCK_M, BLOCK_N, warps, stages) at 128-token table blocks; 64-token blocks take 64-row, 4-warp tiles.
TILES = (128, 64, 8, 3)
SHARED_PER_SM = 232448  # bytes of shared memory an sm90 SM gives its programs (227 KB)
THREADS_AT_255_REGISTERS = 65536 // 255  # threads an SM holds when each uses the most registers it may


@gluon.constexpr_function
def mma_layout(num_warps, columns):
    """The warpgroup MMA accumulator layout of ``[rows, columns]`` tiles: warps stacked along the rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


def row_descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor of contiguous ``[B, N, H, D]`` ``t`` as its ``[B, N, H * D]`` view, ``[1, rows, D]`` at a
    time (one head's rows of one sample): coordinates ``(b, position, h * D)``; rows past the sample's ``N`` read
    as zeros (never the next sample's)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, n, heads, dim = t.shape
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    view = t.view(batch, n, heads * dim)
    layout = gl.NVMMASharedLayout.get_default_for([1, rows, dim], element)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [1, rows, dim], layout)


@gluon.constexpr_function
def buffer_layout(rows, dim, dtype):
    """The shared-memory layout of a ``[rows, dim]`` buffer that :func:`_load_rows` fills and MMAs read."""
    return gl.NVMMASharedLayout.get_default_for([rows, dim], dtype)


@gluon.jit
def _load_rows(desc, batch, row, col, bar, smem, pred=True):
    """TMA load of sample ``batch``'s rows from ``row`` and columns from ``col`` (a :func:`row_descriptor`) into the
    ``[rows, D]`` buffer ``smem``, arriving on ``bar``."""
    _tma_load(desc, [batch, row, col], bar, smem.reshape([1, smem.shape[0], smem.shape[1]]), pred=pred)


@gluon.jit
def _tile_start(blocks, i, TABLE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, ok=True):
    """First key of the ``i``-th key tile of the query tile's ascending block list."""
    per_block: gl.constexpr = TABLE_BLOCK // BLOCK_N
    return gl.load(blocks + i // per_block, mask=ok, other=0) * TABLE_BLOCK + (i % per_block) * BLOCK_N


@gluon.jit
def _work(w, TOTAL, BATCH, SCHEDULE, COUNTS, BLOCKS, KV_LEN, NUM_Q_TILES, stride_ch, stride_bh, stride_bm,
          TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Work item ``w`` of the launch (schedule entry ``w // BATCH``, sample ``w % BATCH``): its sample, head,
    query tile, the offset of its key-block list in BLOCKS and its number of key tiles (0 past ``TOTAL``)."""
    ok = w < TOTAL
    item = gl.load(SCHEDULE + w // BATCH, mask=ok, other=0)
    head = item // NUM_Q_TILES
    tile = item % NUM_Q_TILES
    row = tile * BLOCK_M // TABLE_BLOCK  # the table's query block holding this tile
    count = gl.load(COUNTS + head * stride_ch + row, mask=ok, other=0)
    blocks = head * stride_bh + row * stride_bm
    last_start = gl.load(BLOCKS + blocks + gl.maximum(count - 1, 0), mask=ok, other=0) * TABLE_BLOCK
    in_last = gl.minimum(KV_LEN - last_start, TABLE_BLOCK)  # keys of the last listed block
    ntiles = gl.where(count > 0, (count - 1) * (TABLE_BLOCK // BLOCK_N) + (in_last + BLOCK_N - 1) // BLOCK_N, 0)
    return w % BATCH, head, tile, blocks, ntiles


@gluon.jit
def _produce(produced, allowed, done, ntiles, blocks, batch, col, next_done, next_ntiles, next_blocks, next_batch,
             next_col, BLOCKS, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars,
             TABLE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """If ``allowed``, TMA loads of the next key tile of the program's stream (the current work item's, else
    the next item's) and its values into slot ``produced % STAGES``; the counters advanced."""
    from_this = allowed & (done < ntiles)
    from_next = allowed & (done >= ntiles) & (next_done < next_ntiles)
    ok = from_this | from_next
    start = _tile_start(BLOCKS + gl.where(from_this, blocks, next_blocks), gl.where(from_this, done, next_done),
                        TABLE_BLOCK, BLOCK_N, ok)  # fmt: skip
    sample = gl.where(from_this, batch, next_batch)
    column = gl.where(from_this, col, next_col)
    slot = produced % STAGES
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=ok)
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=ok)
    _load_rows(k_desc, sample, start, column, k_bars.index(slot), k_smem.index(slot), pred=ok)
    _load_rows(v_desc, sample, start, column, v_bars.index(slot), v_smem.index(slot), pred=ok)
    return produced + ok.to(gl.int32), done + from_this.to(gl.int32), next_done + from_next.to(gl.int32)


@gluon.jit
def _after(x):
    """``x``, and a wait for every MMA in flight that ptxas cannot move above it: a wait predicated on ``x``
    (always true). Without it ptxas may sink the softmax's exponentials below the wait for ``P V`` (seen in
    the sm_90a SASS with Triton 3.6 and 3.9, depending on tiles, register cap and the code around the loop):
    the overlap is lost. The wait that follows it in the source is then a no-op."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred ok; setp.ne.b32 ok, $1, 0x7FC00001; @ok wgmma.wait_group.sync.aligned 0; mov.b32 $0, $1; }",
        "=r,r", [x], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _masked(s, j, blocks, KV_LEN, s_layout: gl.constexpr, TABLE_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    """Scores of key tile ``j`` with the keys at or past ``KV_LEN`` (the ragged last block) at -inf."""
    start = _tile_start(blocks, j, TABLE_BLOCK, BLOCK_N)
    if start + BLOCK_N > KV_LEN:
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < KV_LEN)[None, :], s, float("-inf"))
    return s


@gluon.jit
def block_sparse_attention_fwd_sm90(
    q_desc, k_desc, v_desc,  # TMA descriptors of the [B, N, H * D] views; blocks [1, BLOCK_M or BLOCK_N, D]
    O,  # [B, N, H, D] output, frame-major rows
    SCHEDULE,  # int32 [H * NUM_Q_TILES]: work items head * NUM_Q_TILES + tile, heaviest first
    TOKEN_MAJOR,  # int8 [H]: heads whose order is token-major (their output rows move back); unused without
    COUNTS, BLOCKS,  # int32 [H, Qb] visited key blocks and int32 [H, Qb, W] their ascending list
    LSE,  # with STORE_LSE: float32 [B, H, N] log-sum-exp by frame-major row
    stride_ob, stride_on, stride_oh, stride_ch, stride_bh, stride_bm, stride_lb,
    N, KV_LEN, NUM_Q_TILES, BATCH, TOTAL, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale,  # softmax_scale * log2(e)
    FRAMES: gl.constexpr, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_LSE: gl.constexpr, ANY_TOKEN_MAJOR: gl.constexpr,
    PERSISTENT: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    # Program p takes work items p, p + P, ... of the TOTAL = schedule x batch (P programs; without PERSISTENT,
    # one item each). Its key tiles form one stream through the ring; PERSISTENT: the next item's query tile
    # (in a second buffer) and first key tiles load while this item's last tiles run.
    gl.static_assert(STAGES >= 2, "the next key tile loads beside this one: at least 2 slots")
    Q_BUFFERS: gl.constexpr = 2 if PERSISTENT else 1
    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFFERS, BLOCK_M, HEAD_DIM], buffer_layout(BLOCK_M, HEAD_DIM, dtype))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], buffer_layout(BLOCK_N, HEAD_DIM, dtype))
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], buffer_layout(BLOCK_N, HEAD_DIM, dtype))
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(b), count=1)
        mbarrier.init(v_bars.index(b), count=1)
    for b in gl.static_range(Q_BUFFERS):
        mbarrier.init(q_bars.index(b), count=1)

    first = gl.program_id(0)
    step = gl.num_programs(0)
    batch, head, tile, blocks, ntiles = _work(first, TOTAL, BATCH, SCHEDULE, COUNTS, BLOCKS, KV_LEN, NUM_Q_TILES,
                                              stride_ch, stride_bh, stride_bm, TABLE_BLOCK, BLOCK_M, BLOCK_N)  # fmt: skip
    mbarrier.expect(q_bars.index(0), q_desc.block_type.nbytes)
    _load_rows(q_desc, batch, tile * BLOCK_M, head * HEAD_DIM, q_bars.index(0), q_smem.index(0))
    produced = 0  # key tiles issued and consumed by this program so far: the ring's slots and phases
    consumed = 0
    done = 0  # tiles of the current item issued (some may have been issued during the previous item)
    it = 0  # items taken: the query buffer and its phase
    for w in range(first, TOTAL, step):
        if PERSISTENT:
            nb, nh, nt, next_blocks, next_ntiles = _work(w + step, TOTAL, BATCH, SCHEDULE, COUNTS, BLOCKS, KV_LEN,
                                                         NUM_Q_TILES, stride_ch, stride_bh, stride_bm, TABLE_BLOCK,
                                                         BLOCK_M, BLOCK_N)  # fmt: skip
            # the next item's query tile goes where the last item's was (its MMAs are done)
            q_next = (it + 1) % Q_BUFFERS
            mbarrier.expect(q_bars.index(q_next), q_desc.block_type.nbytes, pred=w + step < TOTAL)
            _load_rows(q_desc, nb, nt * BLOCK_M, nh * HEAD_DIM, q_bars.index(q_next), q_smem.index(q_next),
                       pred=w + step < TOTAL)  # fmt: skip
        else:
            nb, nh, nt, next_blocks, next_ntiles = batch, head, tile, blocks, 0
        col = head * HEAD_DIM
        next_col = nh * HEAD_DIM
        next_done = 0
        for _ in gl.static_range(STAGES):  # every slot is free between items
            produced, done, next_done = _produce(produced, produced < consumed + STAGES, done, ntiles, blocks, batch,
                                                 col, next_done, next_ntiles, next_blocks, nb, next_col, BLOCKS,
                                                 k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, TABLE_BLOCK, BLOCK_N,
                                                 STAGES)  # fmt: skip
        q_smem_now = q_smem.index(it % Q_BUFFERS)
        item_blocks = BLOCKS + blocks

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bars.index(it % Q_BUFFERS), (it // Q_BUFFERS) & 1)
        if ntiles > 0:
            mbarrier.wait(k_bars.index(consumed % STAGES), (consumed // STAGES) & 1)  # tile 0: its scores alone
            s = warpgroup_mma(q_smem_now, k_smem.index(consumed % STAGES).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)  # fmt: skip
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            s = _masked(s, 0, item_blocks, KV_LEN, s_layout, TABLE_BLOCK, BLOCK_N)
            m_i = gl.max(s, axis=1) * qk_scale
            p = gl.exp2(s * qk_scale - m_i[:, None])
            l_i = gl.sum(p, axis=1)
            for j in range(1, ntiles):
                slot = (consumed + j) % STAGES
                mbarrier.wait(k_bars.index(slot), ((consumed + j) // STAGES) & 1)
                s = warpgroup_mma(q_smem_now, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)  # fmt: skip
                prev = (consumed + j - 1) % STAGES
                mbarrier.wait(v_bars.index(prev), ((consumed + j - 1) // STAGES) & 1)
                # P is packed here, after the last wait: registers an in-flight MMA reads are not written
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # this tile's scores; P V of the last runs on
                s = _masked(s, j, item_blocks, KV_LEN, s_layout, TABLE_BLOCK, BLOCK_N)
                m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
                p = gl.exp2(s * qk_scale - m_new[:, None])
                alpha = gl.exp2(m_i - m_new)
                l_i = _after(l_i * alpha + gl.sum(p, axis=1))
                m_i = m_new
                acc, p_op, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op, p))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                # tile j - 1's slot is free (its scores and its P V are done): the stream's next tile goes there
                produced, done, next_done = _produce(produced, produced < consumed + j + STAGES, done, ntiles, blocks,
                                                     batch, col, next_done, next_ntiles, next_blocks, nb,
                                                     next_col, BLOCKS, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars,
                                                     TABLE_BLOCK, BLOCK_N, STAGES)  # fmt: skip
            last = (consumed + ntiles - 1) % STAGES
            mbarrier.wait(v_bars.index(last), ((consumed + ntiles - 1) // STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            # the last tile's slot is free: the next item's tile goes there before this item's output is written
            produced, done, next_done = _produce(produced, produced < consumed + ntiles + STAGES, done, ntiles,
                                                 blocks, batch, col, next_done, next_ntiles, next_blocks, nb,
                                                 next_col, BLOCKS, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars,
                                                 TABLE_BLOCK, BLOCK_N, STAGES)  # fmt: skip
        _write_rows(acc, m_i, l_i, O, LSE, TOKEN_MAJOR, batch, head, tile, stride_ob, stride_on, stride_oh, stride_lb,
                    N, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, o_layout, FRAMES, BLOCK_M, HEAD_DIM, STORE_LSE,
                    ANY_TOKEN_MAJOR)  # fmt: skip
        consumed += ntiles
        batch, head, tile, blocks, ntiles = nb, nh, nt, next_blocks, next_ntiles
        done = next_done
        it += 1
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(b))
        mbarrier.invalidate(v_bars.index(b))
    for b in gl.static_range(Q_BUFFERS):
        mbarrier.invalidate(q_bars.index(b))


@gluon.jit
def _write_rows(acc, m_i, l_i, O, LSE, TOKEN_MAJOR, batch, head, tile, stride_ob, stride_on, stride_oh, stride_lb,
                N, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, o_layout: gl.constexpr, FRAMES: gl.constexpr,
                BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STORE_LSE: gl.constexpr,
                ANY_TOKEN_MAJOR: gl.constexpr):  # fmt: skip
    """One work item's output rows (and log-sum-exp) to their frame-major positions; rows that visit nothing
    get 0 (and LSE +inf)."""
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    offs_m = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))  # the head's order
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    rows_m = offs_m
    if ANY_TOKEN_MAJOR:  # a token-major head's video position p * F + f is frame-major row f * S + p
        token_major = gl.load(TOKEN_MAJOR + head) != 0
        j = offs_m - VIDEO_START
        moved = (j >= 0) & (j < VIDEO_TOKENS) & token_major
        rows_m = gl.where(moved, VIDEO_START + (j % FRAMES) * FRAME_TOKENS + j // FRAMES, offs_m)
    o_ptrs = O + batch.to(gl.int64) * stride_ob + head * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :]
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < N)[:, None])
    if STORE_LSE:
        m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
        lse = gl.where(l_o == 0.0, float("inf"), (m_o + gl.log2(l_o)) * 0.6931471805599453)
        gl.store(LSE + batch.to(gl.int64) * stride_lb + head * N + rows_m, lse, mask=offs_m < N)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, head_order: bool) -> str | None:
    """Why this kernel cannot run these inputs (None: it can): bf16 / fp16, head dim 64 or 128,
    contiguous ``[B, N, H, D]`` q, k, v in each head's own order (``head_order``, or a table without
    token-major heads), a 64- or 128-token table, an sm90 GPU."""
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs bf16 or fp16 q, k, v (got {q.dtype}, {k.dtype}, {v.dtype})"
    if q.dim() != 4 or q.shape[-1] not in (64, 128) or k.shape != q.shape or v.shape != q.shape:
        return (f"needs q, k, v of one [B, N, H, D] shape with D 64 or 128 (got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)})")  # fmt: skip
    if not all(t.is_contiguous() for t in (q, k, v)):
        return "needs contiguous q, k, v"
    if table.token_major_heads and not head_order:
        return "needs token-major heads in their own order (head_order inputs)"
    if table.block_size not in (64, 128):
        return f"needs a 64- or 128-token table (got {table.block_size})"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs an sm90 (Hopper) GPU"
    return None


def tiles_for(block_size: int, head_dim: int, tiles: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) for a table of ``block_size`` tokens: ``tiles`` (default
    :data:`TILES`) with the tiles cut to the block, 4 warps for 64-row tiles."""
    block_m, block_n, warps, stages = tiles or TILES
    block_m, block_n = min(block_m, block_size), min(block_n, block_size)
    if block_m < 64 or block_n < 16 or block_size % block_m or block_size % block_n:
        raise ValueError(f"tiles {tiles} do not fit {block_size}-token blocks (BLOCK_M >= 64, both dividing the block)")
    if stages < 2:
        raise ValueError(f"tiles {tiles}: the key ring needs at least 2 stages (the next tile loads beside this one)")
    return block_m, block_n, 4 if block_m == 64 else warps, stages


def programs_per_sm(tiles: tuple[int, int, int, int], head_dim: int, itemsize: int = 2) -> int:
    """How many persistent programs of these tiles an sm90 SM surely holds at once: by shared memory (two
    query tiles and the key / value ring) and by registers (at the most a thread may use)."""
    block_m, block_n, warps, stages = tiles
    shared = (2 * block_m + 2 * stages * block_n) * head_dim * itemsize + 1024
    return max(1, min(SHARED_PER_SM // shared, THREADS_AT_255_REGISTERS // (32 * warps)))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, softmax_scale: float, *,
            tiles: tuple[int, int, int, int] | None = None, schedule: torch.Tensor | None = None,
            return_lse: bool = False, out: torch.Tensor | None = None, persistent: bool | int = False):  # fmt: skip
    """Block-sparse attention of ``table`` on ``q, k, v`` held in each head's own order (see
    :func:`applies`, which must hold); output (and with ``return_lse`` the float32 ``[B, H, N]``
    log-sum-exp) by frame-major row, as :func:`.launcher.forward` with ``head_order``. ``schedule``:
    work items heaviest first for these tiles (the table's ``"levels"`` schedule, kept with it, when not
    given); ``out``: where to write;
    ``persistent``: as many programs as the GPU holds at once (or this many), each taking every P-th work item
    and loading the next one's query and first key tiles during this one's last (else one program an item)."""
    from ...block_table import num_blocks
    from .launcher import LOG2E, table_schedule, token_major_flags

    batch, n, heads, dim = q.shape
    tiles = tiles_for(table.block_size, dim, tiles)
    block_m, block_n, warps, stages = tiles

    q_tiles = num_blocks(n, block_m)
    if schedule is None:
        schedule = table_schedule(table, n, block_m, "levels")
    counts, blocks = table.kv_num_blocks, table.kv_indices
    flags = token_major_flags(table)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=q.device) if return_lse else out
    layout = table.layout
    total = schedule.numel() * batch
    programs = total
    if persistent is True:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        programs = min(total, sms * programs_per_sm(tiles, dim, q.element_size()))
    elif persistent:
        programs = min(total, int(persistent))
    block_sparse_attention_fwd_sm90[(programs,)](
        row_descriptor(q, block_m), row_descriptor(k, block_n), row_descriptor(v, block_n), out, schedule,
        counts if flags is None else flags, counts, blocks, lse,
        out.stride(0), out.stride(1), out.stride(2), counts.stride(0), blocks.stride(0), blocks.stride(1), heads * n,
        n, layout.kv_len, q_tiles, batch, total, layout.frame_tokens, layout.video_start, layout.video_tokens,
        softmax_scale * LOG2E,
        FRAMES=layout.frames, TABLE_BLOCK=table.block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        STAGES=stages, STORE_LSE=return_lse, ANY_TOKEN_MAJOR=flags is not None, PERSISTENT=programs < total,
        num_warps=warps,
    )  # fmt: skip
    return (out, lse) if return_lse else out


__all__ = ["TILES", "applies", "block_sparse_attention_fwd_sm90", "forward", "mma_layout", "programs_per_sm",
           "row_descriptor", "tiles_for"]
