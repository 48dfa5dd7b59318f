"""The Triton backward's dQ split (``OPTIONS["dq_split"]``): which query blocks recompute their dQ though the dS
tiles are stored, and the slots of the tiles that are still stored. The gradients under the split are checked
against float64 autograd with the other variants (test_backward.py, ``dq-split-*``)."""

from __future__ import annotations

import pytest
import torch

from sparse_vdit import VideoLayout, compile_layer
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, temporal, vertical

torch.set_num_threads(1)
pytest.importorskip("triton")

from sparse_vdit.kernels.triton import ds_tiles  # noqa: E402
from sparse_vdit.kernels.triton.launcher import _schedule  # noqa: E402

HEADS = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3), temporal(0.1)]
LAYOUT = VideoLayout(3, 6, 9, 20, "suffix", text_valid=7)


@pytest.mark.parametrize("tiles_per_block", [1, 2])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_recompute_rows_spread_a_share_of_the_busy_blocks_through_the_launch(share, tiles_per_block):
    """``share`` of the busy query blocks (rounded down), every one of them busy, spread through the dQ launch's
    order (between two chosen blocks at least ``1 / share - 1`` unchosen ones), none in its last tenth."""
    table = compile_layer(HEADS, LAYOUT, 16)
    num_tiles = -(-LAYOUT.num_tokens // (16 // tiles_per_block))
    rows = ds_tiles.recompute_rows(table.kv_num_blocks, tiles_per_block, num_tiles, "levels", share)
    busy = table.kv_num_blocks > 0
    assert rows.dtype == torch.int8 and rows.shape == busy.shape
    assert not (rows.bool() & ~busy).any()
    schedule = _schedule(table.kv_num_blocks, tiles_per_block, num_tiles, "levels").long()
    order = []  # busy blocks at their first tile's place in the launch
    for item in schedule.tolist():
        block = (item // num_tiles, item % num_tiles // tiles_per_block)
        if busy[block] and block not in order:
            order.append(block)
    chosen = [i for i, block in enumerate(order) if rows[block]]
    assert 0 < int(0.85 * share * len(order)) <= len(chosen) <= share * len(order)
    assert all(b - a >= round(1 / share) - 1 for a, b in zip(chosen, chosen[1:]))
    assert max(chosen) < 0.9 * len(order)
    assert not ds_tiles.recompute_rows(table.kv_num_blocks, tiles_per_block, num_tiles, "levels", 0.0).any()


def test_slots_leave_out_the_pairs_of_recomputing_blocks():
    """Under a split, the stored pairs are numbered as without it but skipping the recomputing blocks' pairs, which
    the dK/dV kernel's list marks -1; each head's first slot counts stored pairs only."""
    table = compile_layer(HEADS, LAYOUT, 16)
    recompute = torch.zeros(table.num_heads, table.num_q_blocks, dtype=torch.int8)
    recompute[0, 1] = recompute[2, 3] = recompute[3, 0] = recompute[5, -1] = 1
    first, head_first, by_column, q_first = ds_tiles.slots(table, recompute)
    expected, slot = {}, 0
    for h in range(table.num_heads):
        for qb in range(table.num_q_blocks):
            for r in range(table.range_starts.shape[2]):
                s, e = int(table.range_starts[h, qb, r]), int(table.range_ends[h, qb, r])
                if e > s and not recompute[h, qb]:
                    assert int(first[h, qb, r]) == slot
                for kb in range(s, e):
                    expected[h, qb, kb] = -1 if recompute[h, qb] else slot
                    slot += 0 if recompute[h, qb] else 1
        assert head_first[h + 1] == slot
    skipped = sum(1 for value in expected.values() if value < 0)
    assert skipped > 0 and slot + skipped == ds_tiles.slots(table)[1][-1]
    q_starts, q_ends = table.query_ranges
    found = {}
    for h, kb, r in zip(*torch.nonzero(q_ends > q_starts, as_tuple=True)):
        for qb in range(int(q_starts[h, kb, r]), int(q_ends[h, kb, r])):
            found[int(h), qb, int(kb)] = int(by_column[q_first[h, kb, r] + qb - q_starts[h, kb, r]])
    assert found == expected


@pytest.mark.parametrize("capability, head_dim, expected",
                         [((9, 0), 128, 0.25), ((9, 0), 64, 0.0), ((8, 0), 128, 0.0), ((10, 0), 128, 0.0)])
def test_the_default_split_acts_on_hopper_at_head_dim_128_only(capability, head_dim, expected, monkeypatch):
    """Where it was measured (an H100, head dim 128) the default splits a quarter of the dQ programs; elsewhere none,
    unless the option is set; the CPU splits only when asked."""
    from sparse_vdit.kernels.triton import backward

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert backward.split_share(torch.device("cuda", 0), head_dim) == expected
    assert backward.split_share(torch.device("cpu"), 128) == 0.0
    monkeypatch.setitem(backward.OPTIONS, "dq_split", 0.5)
    assert backward.split_share(torch.device("cuda", 0), head_dim) == 0.5
    assert backward.split_share(torch.device("cpu"), 64) == 0.5
