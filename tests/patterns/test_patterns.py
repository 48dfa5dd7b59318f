import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import oracle_block_map
from sparse_vdit.layout import VideoLayout
from sparse_vdit.patterns import (
    Pattern,
    compile_layer,
    dense,
    diagonal,
    expand_ranges,
    head_ranges,
    multi_diagonal,
    skip,
    spatial,
    temporal,
    vertical,
    with_sink,
)
from strategies import examples, layouts, patterns

LAYOUTS = {
    "ragged-1560-frames": (VideoLayout(3, 30, 52), 128),
    "video-only": (VideoLayout(4, 6, 7), 16),
    "text-prefix": (VideoLayout(3, 5, 9, 13, "prefix"), 16),
    "text-suffix": (VideoLayout(3, 5, 9, 21, "suffix"), 16),
    "text-suffix-padded": (VideoLayout(3, 5, 9, 40, "suffix", text_valid=7), 16),
    "text-suffix-all-padding": (VideoLayout(2, 4, 4, 8, "suffix", text_valid=0), 16),
}
PATTERNS = [
    dense(),
    skip(),
    diagonal(0.0),
    diagonal(0.5),
    diagonal(1.0),
    multi_diagonal(0.05),
    multi_diagonal(0.3),
    spatial(2.0),
    temporal(0.1),
    vertical(((0.0, 1.0),)),
    vertical(((0.5, 0.75), (2.0, 2.6)), width=0.3),
    with_sink(spatial(0.5)),
    with_sink(temporal(0.05), 1.5),
    with_sink(diagonal(0.0), 0.3),
    with_sink(multi_diagonal(0.1)),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_fast_rows_equal_the_dense_oracle(pattern, name):
    layout, block = LAYOUTS[name]
    table = compile_layer([pattern], layout, block)
    assert torch.equal(table.block_mask(0), oracle_block_map(pattern, layout, block))
    count, index = table.kv_num_blocks[0], table.kv_indices[0]
    assert int(index.max()) < table.num_kv_blocks and int(index.min()) >= 0
    for row, c in zip(index, count):  # visited indices ascending and distinct
        assert torch.all(row[1:c] > row[: c - 1])


@examples(60)
@given(pattern=patterns(), layout=layouts(), block=st.sampled_from([16, 32, 64]))
def test_tables_equal_the_definitions_on_random_layouts(pattern, layout, block):
    """Any pattern on any small layout: the table's blocks are DESIGN.md's definitions, pair by pair."""
    table = compile_layer([pattern], layout, block)
    assert torch.equal(table.block_mask(0), oracle_block_map(pattern, layout, block)), table


def test_layer_table_pads_heads_and_marks_token_major():
    layout = VideoLayout(3, 5, 9, 13, "prefix")
    heads = [dense(), multi_diagonal(0.1), skip(), diagonal(0.5), temporal(0.2)]
    table = compile_layer(heads, layout, 16)
    assert table.kv_indices.shape[:2] == (5, table.num_q_blocks)
    assert table.kv_indices.shape[2] == table.num_kv_blocks  # padded to the dense head
    assert table.token_major.tolist() == [False, True, False, False, True]
    assert table.kv_num_blocks[2].sum() == 0
    for h, p in enumerate(heads):
        assert torch.equal(table.block_mask(h), oracle_block_map(p, layout, 16))
    assert compile_layer(heads, layout, 16) is table  # cached
    assert 0 < table.density < 1


def test_pattern_dict_round_trip_and_validation():
    for p in PATTERNS:
        assert Pattern.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown pattern"):
        Pattern("banded")
    with pytest.raises(ValueError, match="width"):
        diagonal(-1)
    with pytest.raises(ValueError, match="column"):
        vertical(((2.0, 1.0),))
    with pytest.raises(ValueError, match="unknown parameters"):
        Pattern.from_dict({"name": "diagonal", "widht": 1})
    with pytest.raises(TypeError, match="Pattern"):
        compile_layer(["dense"], VideoLayout(2, 2, 2))
    with pytest.raises(ValueError, match="block_size"):
        compile_layer([dense()], VideoLayout(2, 2, 2), block_size=100)


def test_hunyuan_720p_rows_are_visited_sized():
    """Rows are O(query blocks x visited blocks): a narrow band never holds Kb slots."""
    layout = VideoLayout(33, 45, 80, 256, "suffix", text_valid=100)
    count, index = expand_ranges(*head_ranges(diagonal(0.5), layout, 128))
    assert index.shape == (931, int(count.max()))
    video_rows = count[:928]  # the last 3 query blocks hold text, which visits every key
    assert int(video_rows.max()) < 40  # band of ~29 blocks + the text block; Kb is 929


MEMORY_SCRIPT = """
import resource, sys
import sparse_vdit.patterns as P
from sparse_vdit.layout import VideoLayout
P.compile_layer([P.dense(), P.diagonal(1.0)], VideoLayout(2, 4, 4), 16)  # warm up torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
layout = VideoLayout(33, 45, 80, 256, "suffix", text_valid=100)
heads = [P.dense(), P.skip(), P.diagonal(1.0), P.multi_diagonal(0.05), P.vertical(((0, 1),), 0.5), P.temporal(0.1)] * 4
table = P.compile_layer(heads, layout)
stored = table.range_starts.nbytes + table.range_ends.nbytes
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, stored, table.range_starts.shape[2])
"""

HUNYUAN_LAYER_BOUND = 64 * 2**20


def test_hunyuan_720p_layer_tables_stay_under_memory_bound():
    """Building a HunyuanVideo 720p layer's table (24 mixed heads, 119,056 tokens) peaks < 64 MiB.

    An N x N bool mask would take 14 GB, and even a padded [H, Qb, Kb] index list 79 MiB; the
    stored ranges are 8 x 24 x 931 x R bytes with R (ranges per row) a handful.
    """
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True).stdout
    peak, table_bytes, ranges = map(int, out.split())
    assert ranges <= 4
    assert table_bytes == 8 * 24 * 931 * ranges
    assert peak < HUNYUAN_LAYER_BOUND, f"peak {peak / 2**20:.0f} MiB"


def test_sink_round_trips_and_reads_in_the_heads_own_order():
    p = with_sink(temporal(0.1))
    assert p.sink == 1.0 and str(p) == "temporal(0.1, sink=1)"
    assert Pattern.from_dict(p.to_dict()) == p and "sink" not in temporal(0.1).to_dict()
    assert with_sink(skip()) == skip() and with_sink(p, 0) == temporal(0.1)
    with pytest.raises(ValueError, match="sink"):
        Pattern("spatial", 1.0, (), -1.0)
    layout = VideoLayout(5, 4, 8)  # 32 tokens a frame, block 16: the sink is key blocks 0 and 1
    for head in (with_sink(spatial(0.0)), with_sink(temporal(0.0))):
        mask = compile_layer([head], layout, 16).block_mask(0)
        assert mask[:, :2].all() and mask.sum(1).max() <= 3  # sink + own block
