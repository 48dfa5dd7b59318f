"""The Triton top-k / top-p selection (kernels/triton/pooled_topk.py) against the torch rule of
methods/online.py: the same kept blocks, ranges and index lists (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from sparse_vdit import VideoLayout  # noqa: E402
from sparse_vdit.block_table import mask_ranges, run_length  # noqa: E402
from sparse_vdit.kernels.triton import pooled_topk  # noqa: E402
from sparse_vdit.methods.online import (  # noqa: E402
    _pool, forced_blocks, index_form, max_kept, max_runs, online_table, pooled_mass, select_blocks, top_k_keep)

torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16]
BLOCK = 16
LAYOUTS = [
    VideoLayout(3, 5, 7),  # 105 tokens: a ragged last block of 9
    VideoLayout(2, 5, 5, text=21, text_position="prefix"),  # text blocks straddle the video
    VideoLayout(3, 4, 6, text=20, text_position="suffix", text_valid=9),  # padded text: kv_len 81 < 92
]


def _poison(monkeypatch):
    """torch.empty hands out NaN / -7 filled buffers while the kernels run (unwritten slots show)."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(pooled_topk.torch, "empty", poisoned)


def _torch_rule(q, k, layout, count):
    """(keep, starts, ends, indices) of the torch rule, widths as online_table takes them."""
    forced = forced_blocks(layout, BLOCK, q.device)
    kb = forced.shape[-1]
    runs, width = min(max_runs(layout, BLOCK, count), kb // 2 + 1), max_kept(layout, BLOCK, count)
    keep = top_k_keep(pooled_mass(q, k, layout, BLOCK), forced, count)
    return (keep, *mask_ranges(keep, runs), index_form(keep, width)), forced, runs, width


def _check(q, k, layout, count, monkeypatch):
    expected, forced, runs, width = _torch_rule(q, k, layout, count)
    _poison(monkeypatch)
    got = pooled_topk.pooled_top_k(q, k, forced, count, block=BLOCK, kv_len=layout.kv_len, range_width=runs,
                                   index_width=width)  # fmt: skip
    monkeypatch.undo()
    for name, a, b in zip(("keep", "starts", "ends", "indices"), got, expected):
        assert a.shape == b.shape and torch.equal(a, b), name
    return got[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_triton_top_k_equals_the_torch_rule(layout, dtype, monkeypatch):
    gen = torch.Generator(device=DEVICE).manual_seed(layout.num_tokens)
    q, k = (torch.randn(2, layout.num_tokens, 3, 16, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    q[:, : layout.num_tokens // 2] *= 3  # some rows peaked, some flat
    kb = -(-layout.kv_len // BLOCK)
    for count in (1, kb // 2, kb):  # budget 1: the forced blocks alone; kb: every block
        keep = _check(q, k, layout, count, monkeypatch)
        if count == kb:
            assert keep.all()


@pytest.mark.parametrize("layout", [LAYOUTS[2], VideoLayout(4, 8, 10)], ids=lambda lay: lay.describe())
def test_triton_top_p_equals_the_torch_rule(layout, monkeypatch):
    """Per row the shortest prefix reaching p, clamped to the budget, at least the forced blocks."""
    gen = torch.Generator(device=DEVICE).manual_seed(layout.num_tokens + 1)
    q, k = (torch.randn(2, layout.num_tokens, 3, 16, generator=gen, device=DEVICE) for _ in range(2))
    q[:, : layout.num_tokens // 2] *= 4  # peaked rows keep few blocks, flat rows many
    forced = forced_blocks(layout, BLOCK, q.device)
    kb = forced.shape[-1]
    for p, low, high in ((0.3, 1, kb), (0.9, 2, kb - 1), (1.0, 1, kb)):
        expected = select_blocks(pooled_mass(q, k, layout, BLOCK), forced, p, low, high)
        runs = min(max_runs(layout, BLOCK, high), kb // 2 + 1)
        _poison(monkeypatch)
        got = pooled_topk.pooled_top_k(q, k, forced, high, block=BLOCK, kv_len=layout.kv_len, range_width=runs,
                                       index_width=kb, p=p, min_count=low)  # fmt: skip
        monkeypatch.undo()
        assert torch.equal(got[0], expected)
        assert torch.equal(got[1], mask_ranges(expected, runs)[0]) and torch.equal(got[3], index_form(expected, kb))
        if p == 0.3 and not layout.text:  # 20 key blocks, one forced a row
            assert expected.sum(-1).unique().numel() > 1  # the counts vary by row


def test_two_tiles_of_query_blocks_and_wide_rows(monkeypatch):
    """20 query blocks (two programs of 16) and 20 key blocks (rows padded to 32 in the kernel)."""
    layout = VideoLayout(4, 8, 10)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q, k = (torch.randn(1, layout.num_tokens, 2, 16, generator=gen, device=DEVICE) for _ in range(2))
    _check(q, k, layout, 7, monkeypatch)


def test_ties_go_to_the_lower_key_block(monkeypatch):
    """Query blocks of zeros score every full key block alike, identical key blocks tie too: the
    kept blocks among equal masses are the lowest, as top_k_keep keeps them."""
    layout = LAYOUTS[2]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q, k = (torch.randn(2, layout.num_tokens, 2, 32, generator=gen, device=DEVICE) for _ in range(2))
    q[:, 16:48] = 0  # query blocks 1 and 2: flat rows
    k[:, 32:48] = k[:, 0:16]  # key block 2 repeats key block 0
    k[:, 48:64] = k[:, 0:16]  # and block 3
    for count in (4, 5):  # row 1 is forced to keep blocks 1 (its own), 4 and 5 (text); 0, 2, 3 tie
        keep = _check(q, k, layout, count, monkeypatch)
        expected = torch.tensor([True, True, count == 5, False, True, True], device=DEVICE)
        assert (keep[:, 1] == expected).all()


def test_pooling_is_the_block_mean():
    layout = LAYOUTS[0]
    x = torch.randn(2, layout.num_tokens, 3, 16, device=DEVICE)
    for length in (layout.num_tokens, 90):  # ragged last blocks of 9 and 10 tokens
        got = pooled_topk.pool_blocks(x, length, BLOCK)
        torch.testing.assert_close(got, _pool(x, length, BLOCK, torch.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key_group, low, high", [(1, 0.3, 0.3), (1, 0.1, 0.5), (2, 0.3, 0.3)])
def test_online_table_dispatches_fixed_budgets_to_triton(key_group, low, high, monkeypatch):
    """compile="triton": single key blocks (top-k, top-p) through the kernels, groups through torch;
    the same table either way, its run length declared."""
    layout = LAYOUTS[1]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    q, k = (torch.randn(1, layout.num_tokens, 2, 16, generator=gen, device=DEVICE) for _ in range(2))
    calls = []
    real = pooled_topk.pooled_top_k
    monkeypatch.setattr(pooled_topk, "pooled_top_k", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = online_table(q, k, layout, BLOCK, 0.9, low, high, key_group=key_group, compile="triton")
    monkeypatch.undo()
    expected = online_table(q, k, layout, BLOCK, 0.9, low, high, key_group=key_group, compile="never")
    assert len(calls) == (key_group == 1)
    assert torch.equal(got.range_starts, expected.range_starts) and torch.equal(got.range_ends, expected.range_ends)
    assert torch.equal(got.kv_indices, expected.kv_indices) and run_length(got) == key_group
    with pytest.raises(ValueError, match="compile"):
        online_table(q, k, layout, BLOCK, compile="sometimes")


def test_pooled_top_k_checks_its_inputs():
    layout = LAYOUTS[0]
    q = torch.randn(1, layout.num_tokens, 1, 16, device=DEVICE)
    forced = forced_blocks(layout, BLOCK, q.device)
    with pytest.raises(ValueError, match="forced"):
        pooled_topk.pooled_top_k(q, q, forced[:, 1:], 2, block=BLOCK, kv_len=layout.kv_len, range_width=3, index_width=3)
    with pytest.raises(ValueError, match="head dim"):
        pooled_topk.pooled_top_k(q[..., :12], q[..., :12], forced, 2, block=BLOCK, kv_len=layout.kv_len,
                                 range_width=3, index_width=3)  # fmt: skip
