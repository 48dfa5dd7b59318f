"""The Triton kernel's block-list mode (``launcher.OPTIONS["block_list"]``) against the float64
masked-attention reference and against the range mode, on scattered and plan tables."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import masked_attention, poison_empty_like, random_qkv, rel_rms, token_mask  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer, sparse_attention  # noqa: E402
from sparse_vdit.block_table import BlockTable, MaskHead, declare_run_length, run_length, table_from_mask  # noqa: E402
from sparse_vdit.kernels import select_attention  # noqa: E402
from sparse_vdit.kernels.head_order import attention_in_head_order  # noqa: E402
from sparse_vdit.kernels.triton import backend as triton_backend  # noqa: E402
from sparse_vdit.kernels.triton import launcher  # noqa: E402
from sparse_vdit.patterns import HeadChoice, dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical  # noqa: E402

torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16, torch.float32]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2x torch's own error
# name: (layout, table block, token-major flags of the scattered heads, batch, tiles or None: the rule)
CASES = {
    # text suffix with padding: kv_len 118 = 7 blocks of 16 + a ragged 6
    "suffix-padded-batch2": (VideoLayout(3, 5, 7, 21, "suffix", text_valid=13), 16, (False, True, False), 2, None),
    # odd frames x height x width, text prefix, 146 tokens: a ragged last block of 2
    "odd-prefix": (VideoLayout(3, 5, 9, 11, "prefix"), 16, (True, False), 1, None),
    # two key tiles per block (16 of 32): the ragged block 22 = one whole tile + 6
    "two-tiles-per-block": (VideoLayout(3, 5, 7, 21, "suffix", text_valid=13), 32, (True, False), 1, (16, 16, 4, 1)),
}


def _scattered(layout, block, flags, seed=0, density=0.4) -> BlockTable:
    """A random top-k-like table (many ranges per row), some rows visiting nothing, heads token-major per ``flags``."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = -(-layout.num_tokens // block), -(-layout.kv_len // block)
    keep = torch.rand(len(flags), qb, kb, generator=g) < density
    keep[:, ::3] = False  # every third query block visits nothing
    keep[0, 1, -1] = True  # the ragged last key block is visited
    base = table_from_mask(layout, block, keep.to(DEVICE), "random")
    heads = tuple(MaskHead("random", bool(f)) for f in flags)
    return BlockTable(layout, block, heads, base.range_starts, base.range_ends,
                      torch.tensor(flags, dtype=torch.bool, device=DEVICE))  # fmt: skip


def _inputs(layout, batch, heads, dtype, seed=1, dim=64):
    return random_qkv((batch, layout.num_tokens, heads, dim), dtype, DEVICE, seed)


def _reference(q, k, v, table):
    """Float64 masked attention of every head through its token mask (frame-major rows)."""
    scale = q.shape[-1] ** -0.5
    out = torch.stack([masked_attention(q[:, :, h], k[:, :, h], v[:, :, h], token_mask(table, h).to(q.device), scale)
                       for h in range(q.shape[2])], dim=2)  # fmt: skip
    return out.masked_fill(torch.arange(q.shape[1], device=q.device)[None, :, None, None] >= table.layout.num_tokens, 0)


def _both_modes(monkeypatch, run, tiles=None):
    """``run()`` in the range mode and in the block-list mode, outputs poisoned; (ranges, list)."""
    results = []
    for block_list in (False, True):
        monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, block_list=block_list, tiles=tiles))
        poison_empty_like(monkeypatch, launcher.torch)
        calls = []
        forward = launcher.forward
        monkeypatch.setattr(launcher, "forward", lambda *a, **kw: calls.append(kw.get("visited")) or forward(*a, **kw))
        results.append(run())
        monkeypatch.undo()
        assert [c is not None for c in calls] == [block_list]  # the mode asked for is the one launched
    return results


def _same(by_list, by_ranges, dtype):
    """Outputs (and log-sum-exps: +inf where a row visits nothing) of the two modes agree."""
    if DEVICE == "cpu":  # the same tiles in the same order: the same arithmetic
        assert all(torch.equal(a, b) for a, b in zip(by_list, by_ranges))
    for a, b in zip(by_list, by_ranges):
        assert torch.equal(a.isinf(), b.isinf())
        finite = ~a.isinf()
        assert rel_rms(a[finite], b[finite]) <= TOLERANCE[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_block_list_matches_reference_and_ranges_on_scattered_tables(case, dtype, monkeypatch):
    layout, block, flags, batch, tiles = CASES[case]
    table = _scattered(layout, block, flags)
    runs = (table.range_ends > table.range_starts).sum(-1)
    assert int(runs.max()) >= 2 and float(runs[runs > 0].double().mean()) > 1.2  # scattered: several ranges a row
    q, k, v = _inputs(layout, batch, len(flags), dtype)
    by_ranges, by_list = _both_modes(monkeypatch, lambda: sparse_attention(q, k, v, table, backend="triton"), tiles)
    assert not by_list.isnan().any()
    ref = _reference(q, k, v, table)
    assert rel_rms(by_list, ref) <= TOLERANCE[dtype], rel_rms(by_list, ref)
    empty = torch.arange(layout.num_tokens, device=DEVICE) // block % 3 == 0  # frame-major rows of empty blocks
    h = flags.index(False)  # a frame-major head: its rows of the empty blocks are those rows in memory
    assert torch.equal(by_list[:, empty, h], torch.zeros_like(by_list[:, empty, h]))
    _same([by_list], [by_ranges], dtype)


@pytest.mark.parametrize("case", ["suffix-padded-batch2", "two-tiles-per-block"])
def test_block_list_on_plan_tables_with_lse(case, monkeypatch):
    """A plan's tables (dense, skip, bands, token-major multi-diagonal, vertical columns) and the
    log-sum-exp of the backward's forward: the same in both modes."""
    layout, block, _, batch, tiles = CASES[case]
    patterns = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)]
    table = compile_layer(patterns, layout, block, DEVICE)
    dtype = DTYPES[0]
    q, k, v = _inputs(layout, batch, len(patterns), dtype, seed=2)
    by_ranges, by_list = _both_modes(monkeypatch, lambda: triton_backend.run_with_lse(q, k, v, table, 64**-0.5), tiles)
    assert not by_list[0].isnan().any() and not by_list[1].isnan().any()
    assert rel_rms(by_list[0], _reference(q, k, v, table)) <= TOLERANCE[dtype]
    _same(by_list, by_ranges, dtype)


def test_block_list_in_head_order(monkeypatch):
    """Inputs in each head's own order (every head read through TMA descriptors in the interpreter)."""
    layout, block, flags, batch, _ = CASES["suffix-padded-batch2"]
    table = _scattered(layout, block, flags, seed=4)
    dtype = DTYPES[0]
    q, k, v = _inputs(layout, batch, len(flags), dtype, seed=5)
    by_ranges, by_list = _both_modes(monkeypatch, lambda: attention_in_head_order(q, k, v, table, backend="triton"))
    assert rel_rms(by_list, _reference(q, k, v, table)) <= TOLERANCE[dtype]
    _same([by_list], [by_ranges], dtype)


def test_block_list_with_candidates_chosen_on_the_device(monkeypatch):
    """SVG's candidate tables, one chosen per (sample, head) in the kernel: the chosen candidate's list."""
    layout, block = VideoLayout(5, 3, 7), 16
    candidates = (spatial(0.6), temporal(0.12))
    dtype = DTYPES[0]
    q, k, v = _inputs(layout, 2, 3, dtype, seed=3)
    selected = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.int32, device=DEVICE)
    table = HeadChoice(candidates, selected).table(layout, block, DEVICE)
    by_ranges, by_list = _both_modes(monkeypatch, lambda: select_attention(q, k, v, table, selected, backend="triton"))
    host = select_attention(q.float(), k.float(), v.float(), table, selected, backend="reference")
    assert rel_rms(by_list, host) <= TOLERANCE[dtype]
    _same([by_list], [by_ranges], dtype)


def test_block_list_rule_by_run_length(monkeypatch):
    """A number R puts tables whose runs of visited blocks are shorter than R on average in the
    block-list mode; the default R picks the lists for scattered tables, the ranges for plans."""
    layout, block, flags, _, _ = CASES["odd-prefix"]
    scattered = _scattered(layout, block, flags, density=0.25)  # runs of 1 / (1 - 0.25) blocks, as top-k's 1.33
    whole = compile_layer([dense()] * 2, layout, block, DEVICE)  # one range a row
    assert 1.0 < run_length(scattered) < 1.5 and run_length(whole) == 10.0  # 146 tokens: 10 blocks of 16
    assert triton_backend.block_list_on(scattered) and not triton_backend.block_list_on(whole)  # the default 8
    assert not triton_backend.block_list_on(compile_layer([skip()] * 2, layout, block, DEVICE))  # nothing visited
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, block_list=1.0))
    assert not triton_backend.block_list_on(_scattered(layout, block, flags, density=0.25))
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, block_list=False))
    assert not triton_backend.block_list_on(scattered)
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, block_list=True))
    assert triton_backend.block_list_on(whole)


def test_block_list_rule_reads_a_declared_run_length(monkeypatch):
    """A builder's declared run length decides, not the table's contents (no host read)."""
    layout, block, flags, _, _ = CASES["odd-prefix"]
    whole = declare_run_length(compile_layer([dense()] * 2, layout, block, DEVICE).heads((1, 0)), 1.0)
    assert run_length(whole) == 1.0 and triton_backend.block_list_on(whole)


def test_block_list_checks_its_lists():
    layout, block, flags, _, _ = CASES["odd-prefix"]
    table = _scattered(layout, block, flags)
    q, k, v = _inputs(layout, 1, len(flags), torch.float32)
    with pytest.raises(ValueError, match="visited"):
        launcher.forward(q, k, v, table.kv_num_blocks, None, block_size=block, kv_len=layout.kv_len, softmax_scale=0.1,
                         ranges=(table.range_starts, table.range_ends),
                         visited=(table.kv_num_blocks.long(), table.kv_indices))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (stages do not exist in the interpreter)")
@pytest.mark.parametrize("stages", [4, 5])
def test_list_stages_keep_the_result(stages, monkeypatch):
    """``launcher.OPTIONS["list_stages"]``: block-list launches pipelined deeper give the same attention."""
    layout, block, flags, batch, tiles = CASES["suffix-padded-batch2"]
    table = _scattered(layout, block, flags, seed=6)
    dtype = DTYPES[0]
    q, k, v = _inputs(layout, batch, len(flags), dtype, seed=7)
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, block_list=True, list_stages=stages))
    poison_empty_like(monkeypatch, launcher.torch)
    out = sparse_attention(q, k, v, table, backend="triton")
    assert rel_rms(out, _reference(q, k, v, table)) <= TOLERANCE[dtype]


def test_list_stages_reach_the_block_list_launch_only(monkeypatch):
    """The option sets num_stages of block-list launches on a GPU and leaves range launches alone; by
    default 5 on sm90+ and the tiles' own below."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    capability = [(9, 0)]
    monkeypatch.setattr(launcher.torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert launcher.launch_options(cuda, 8, 3, True) == {"num_warps": 8, "num_stages": 5}  # default on sm90+
    assert launcher.launch_options(cuda, 8, 3, False) == {"num_warps": 8, "num_stages": 3}
    capability[0] = (8, 0)
    assert launcher.launch_options(cuda, 8, 3, True) == {"num_warps": 8, "num_stages": 3}  # the tiles' own
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, list_stages=4))
    assert launcher.launch_options(cuda, 8, 3, True) == {"num_warps": 8, "num_stages": 4}  # set: on any GPU
    assert launcher.launch_options(cuda, 8, 3, False) == {"num_warps": 8, "num_stages": 3}
    assert launcher.launch_options(cpu, 8, 3, True) == {}  # the interpreter takes none


def test_list_stages_too_deep_for_shared_memory_fall_back(monkeypatch):
    """A block-list launch that runs out of shared memory at ``list_stages`` runs again at the tiles' own
    stages, and that launch shape keeps them from then on; a range launch's error is not caught."""
    from triton.runtime.errors import OutOfResources

    from sparse_vdit.kernels.triton import kernel

    calls = []

    class FakeKernel:  # records the stages of each launch; 5 stages do not fit
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs.get("num_stages"))
                if kwargs.get("num_stages") == 5:
                    raise OutOfResources(260000, 232448, "shared memory")
            return launch

    layout, block, flags, batch, tiles = CASES["odd-prefix"]
    table = _scattered(layout, block, flags, seed=3)
    q, k, v = _inputs(layout, batch, len(flags), torch.float32, seed=4)
    monkeypatch.setattr(kernel, "block_sparse_attention_fwd", FakeKernel())
    monkeypatch.setattr(launcher, "_LIST_STAGES_TOO_DEEP", set())
    monkeypatch.setattr(launcher, "launch_options",
                        lambda device, warps, stages, block_list: {"num_warps": warps,
                                                                   "num_stages": 5 if block_list else stages})

    def forward(visited):
        return launcher.forward(q, k, v, table.kv_num_blocks, None, block_size=block, kv_len=layout.kv_len,
                                softmax_scale=0.1, ranges=(table.range_starts, table.range_ends),
                                visited=visited, tiles=(16, 16, 4, 2))  # fmt: skip

    visited = (table.kv_num_blocks, table.kv_indices)
    forward(visited)
    assert calls == [5, 2] and len(launcher._LIST_STAGES_TOO_DEEP) == 1  # retried at the tiles' 2 stages
    forward(visited)
    assert calls == [5, 2, 2]  # remembered: no second failing compile
    monkeypatch.setattr(launcher, "launch_options", lambda device, warps, stages, block_list: {"num_stages": 5})
    with pytest.raises(OutOfResources):  # not a deeper list pipeline: the error stands
        forward(None)
