"""Measured Triton tiles: the pruner, the JSON cache, forced tiles against the reference (CPU)."""

import json

import pytest
import torch
from helpers import poison_empty_like, rel_rms

from sparse_vdit import VideoLayout, compile_layer
from sparse_vdit.kernels import reference
from sparse_vdit.kernels.triton import launcher, tuning
from sparse_vdit.patterns import dense, diagonal, skip, vertical

T = tuning.Tiles
LARGE = 1 << 30


def test_pruner_keeps_tiles_dividing_the_block():
    kept = tuning.prune(tuning.candidates(), block_size=64, head_dim=64, elem_bytes=2, smem_limit=LARGE)
    assert kept and all(t.block_m == 64 and t.block_n in (32, 64) for t in kept)
    assert tuning.prune(tuning.candidates(), block_size=32, head_dim=64, elem_bytes=2, smem_limit=LARGE) == []
    assert len(tuning.prune(tuning.candidates(), block_size=128, head_dim=64, elem_bytes=2, smem_limit=LARGE)) == 27


def test_pruner_drops_configs_over_the_shared_memory_limit():
    fits, over = T(128, 64, 8, 2), T(128, 64, 8, 3)  # (128 + 2*64*s) * 64 * 2 bytes: 49152 and 65536
    limit = tuning.shared_memory_estimate(fits, 64, 2)
    assert limit == 49152 and tuning.shared_memory_estimate(over, 64, 2) == 65536
    assert tuning.prune([fits, over], block_size=128, head_dim=64, elem_bytes=2, smem_limit=limit) == [fits]
    assert tuning.prune([fits], block_size=128, head_dim=64, elem_bytes=4, smem_limit=limit) == []  # fp32: twice


def test_pruner_warps_and_tile_area_rules():
    configs = [T(64, 32, 8, 2), T(64, 32, 4, 2), T(128, 32, 8, 2), T(32, 32, 4, 2)]
    kept = tuning.prune(configs, block_size=128, head_dim=64, elem_bytes=2, smem_limit=LARGE)
    assert kept == [T(64, 32, 4, 2), T(128, 32, 8, 2)]  # 8 warps need 128 rows; 32 x 32 is too small


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_VDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", {})
    key = tuning.cache_key("Fake GPU", (9, 0), 128, 128, torch.bfloat16)
    assert key == "Fake GPU/sm90/d128/block128/bfloat16"
    assert tuning.load(key) is None
    path = tuning.store(key, (128, 64, 8, 3), {"ms": 1.5})
    assert path == tmp_path / "triton" / "tiles.json"
    tuning.store(tuning.cache_key("Fake GPU", (9, 0), 64, 128, torch.bfloat16), T(128, 128, 4, 3))
    tuning._memory.clear()
    assert tuning.load(key) == T(128, 64, 8, 3)  # from the file
    assert key in tuning._memory
    entries = json.loads(path.read_text())["entries"]
    assert entries[key] == {"tiles": [128, 64, 8, 3], "ms": 1.5} and len(entries) == 2


def test_autotune_refuses_the_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        tuning.autotune(1, 2, 256, 64, torch.float16, 128, "cpu")


def test_override_is_checked():
    assert launcher._tiles(128, 64, torch.device("cpu"), (64, 32, 4, 2)) == (64, 32, 4, 2)
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        launcher._tiles(96, 64, torch.device("cpu"), (32, 48, 4, 2))
    with pytest.raises(ValueError, match="BLOCK_M=128"):
        launcher._tiles(64, 64, torch.device("cpu"), (128, 64, 4, 2))


@pytest.mark.skipif(not launcher.is_available(torch.device("cpu"))[0], reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("tiles", [None, T(64, 32, 4, 2), T(128, 64, 8, 3)], ids=["rule", "m64-n32", "m128-n64"])
def test_forced_tiles_match_reference(tiles, monkeypatch):
    monkeypatch.setenv(tuning.ENV, "1")  # ignored on the CPU: the rule decides unless tiles are forced
    monkeypatch.setattr(tuning, "tuned_tiles", lambda *a: pytest.fail("tuned on the CPU"))
    layout = VideoLayout(2, 10, 15)  # 300 tokens: blocks of 128, 128, 44
    heads = [dense(), diagonal(0.5), vertical(((0.0, 0.5),), 0.0), skip()]
    table = compile_layer(heads, layout, 128, "cpu")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, layout.num_tokens, len(heads), 32, generator=g) for _ in range(3))
    poison_empty_like(monkeypatch, launcher.torch)  # output buffers start as NaN: unwritten elements show
    ranges = (table.range_starts, table.range_ends)
    out = launcher.forward(q, k, v, table.kv_num_blocks, None, block_size=128, kv_len=layout.kv_len,
                           softmax_scale=32**-0.5, ranges=ranges, tiles=tiles)  # fmt: skip
    monkeypatch.undo()
    ref = reference.forward(q, k, v, table.kv_num_blocks, table.kv_indices, block_size=128, kv_len=layout.kv_len,
                            softmax_scale=32**-0.5)  # fmt: skip
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert rel_rms(out, ref) < 1e-5


def test_density_buckets_key_the_cache():
    assert tuning.density_bucket(0.06) == 0.05 and tuning.density_bucket(0.13) == 0.1
    assert tuning.density_bucket(0.3) == 0.4 and tuning.density_bucket(0.8) == 1.0
    dense_key = tuning.cache_key("Fake GPU", (9, 0), 128, 128, torch.bfloat16)
    assert tuning.cache_key("Fake GPU", (9, 0), 128, 128, torch.bfloat16, density=0.9) == dense_key
    assert tuning.cache_key("Fake GPU", (9, 0), 128, 128, torch.bfloat16, density=0.11) == dense_key + "/density0.1"


def test_band_ranges_hit_the_bucket_density():
    for density in (0.05, 0.1, 0.2, 0.4, 1.0):
        starts, ends = tuning.band_ranges(3, 256, density, "cpu")
        assert starts.shape == ends.shape == (3, 256, 1) and starts.dtype == torch.int32
        assert ((starts >= 0) & (ends <= 256) & (starts < ends)).all()
        assert abs(float((ends - starts).double().mean()) / 256 - density) < 0.01 + 0.1 * density


def test_tiles_option_one_choice_or_per_density_bucket(monkeypatch):
    """``launcher.OPTIONS["tiles"]``: one choice for every table, or one per density bucket
    (other buckets keep the rule); what the bench sweeps and what a measured winner is set as."""
    from sparse_vdit.kernels.triton import backend

    layout = VideoLayout(4, 8, 16)  # 512 tokens, 4 blocks of 128
    sparse = compile_layer([diagonal(0.0)] * 2, layout, 128, "cpu")  # 4 of 16 blocks: density 0.25 (bucket 0.2)
    q = torch.zeros(1, layout.num_tokens, 2, 64)
    rule = launcher._tiles(128, 64, q.device)
    monkeypatch.setitem(launcher.OPTIONS, "tiles", (64, 32, 4, 2))
    assert backend._tiles(q, 128, table=sparse) == (64, 32, 4, 2)
    assert backend._tiles(q, 128, tiles=(32, 32, 4, 1), table=sparse) == (32, 32, 4, 1)  # given tiles first
    assert tuning.density_bucket(sparse.density) == 0.2
    monkeypatch.setitem(launcher.OPTIONS, "tiles", {0.2: (64, 64, 4, 3), 0.05: (32, 32, 4, 2)})
    assert backend._tiles(q, 128, table=sparse) == (64, 64, 4, 3)
    by_dim = {0.2: (64, 64, 4, 3), (64, 0.2): (128, 64, 4, 3), (128, 0.2): (32, 32, 4, 2)}
    monkeypatch.setitem(launcher.OPTIONS, "tiles", by_dim)
    assert backend._tiles(q, 128, table=sparse) == (128, 64, 4, 3)  # this head dim's entry first
    assert backend._tiles(q, 128, table=compile_layer([dense()] * 2, layout, 128, "cpu")) == rule  # bucket 1.0: none
    monkeypatch.setitem(launcher.OPTIONS, "tiles", (64, 48, 4, 2))
    with pytest.raises(ValueError, match="BLOCK_N=48"):
        backend._tiles(q, 128, table=sparse)


@pytest.mark.skipif(not launcher.is_available(torch.device("cpu"))[0], reason="needs triton and TRITON_INTERPRET=1")
def test_tiles_option_runs_the_chosen_tiles(monkeypatch):
    """The backend launches with the tiles set in ``launcher.OPTIONS`` and still matches the reference."""
    from sparse_vdit import sparse_attention

    layout = VideoLayout(2, 10, 15)  # 300 tokens: blocks of 128, 128, 44
    heads = [diagonal(0.5), vertical(((0.0, 0.5),), 0.0), skip()]
    table = compile_layer(heads, layout, 128, "cpu")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, layout.num_tokens, len(heads), 64, generator=g) for _ in range(3))
    monkeypatch.setitem(launcher.OPTIONS, "tiles", (64, 32, 4, 2))
    launched = []
    forward = launcher.forward
    monkeypatch.setattr(launcher, "forward", lambda *a, **kw: launched.append(kw["tiles"]) or forward(*a, **kw))
    out = sparse_attention(q, k, v, table, backend="triton")
    assert launched == [(64, 32, 4, 2)]
    ref = sparse_attention(q, k, v, table, backend="reference")
    assert rel_rms(out, ref) < 1e-5


def test_small_launch_rule_on_the_measured_shapes():
    """The launcher's exception to its rule (issue 21's H200 sweep, 132 SMs, head dim 128): Wan-1.3B
    480p takes 64 x 64 tiles at 5-20%, not at 40%; Wan-14B and HunyuanVideo 720p keep the rule; so do
    head dim 64 (CogVideoX1.5), GPUs before sm90 and tables of 32-token blocks."""
    wan13, wan14, hunyuan = 12 * 32760, 40 * 75600, 24 * (118800 + 256)  # query rows of one launch (batch 1)
    for density in (0.05, 0.1, 0.2):
        assert launcher.small_launch(9, 132, 128, 128, wan13, density)
        assert not launcher.small_launch(9, 132, 128, 128, wan14, density)
        assert not launcher.small_launch(9, 132, 128, 128, hunyuan, density)
    assert not launcher.small_launch(9, 132, 128, 128, wan13, 0.4)
    assert launcher.small_launch(9, 132, 128, 128, 2 * wan13, 0.05)  # both halves of classifier-free guidance
    assert not launcher.small_launch(9, 132, 128, 64, 48 * 45106, 0.05)
    assert not launcher.small_launch(8, 108, 128, 128, wan13, 0.05)
    assert not launcher.small_launch(9, 132, 32, 128, wan13, 0.05)


def test_small_launch_tiles_only_on_head_ordered_inputs_and_after_the_options(monkeypatch):
    """``backend._tiles`` asks for the small-launch tiles on head-ordered inputs only (where they
    were measured), after given tiles and ``launcher.OPTIONS["tiles"]``; on the CPU there are none."""
    from sparse_vdit.kernels.triton import backend

    layout = VideoLayout(4, 8, 16)
    table = compile_layer([diagonal(0.0)] * 2, layout, 128, "cpu")
    q = torch.zeros(1, layout.num_tokens, 2, 128)
    rule = launcher._tiles(128, 128, q.device)
    assert launcher.small_launch_tiles(q, 128, 0.05) is None  # CPU
    asked = []
    monkeypatch.setattr(launcher, "small_launch_tiles", lambda q, block, density: asked.append(density) or (64, 64, 4, 3))
    assert backend._tiles(q, 128, table=table) == rule
    assert backend._tiles(q, 128, table=table, head_order=True) == (64, 64, 4, 3)
    assert asked == [table.density]
    assert backend._tiles(q, 128, tiles=(32, 32, 4, 1), table=table, head_order=True) == (32, 32, 4, 1)
    monkeypatch.setitem(launcher.OPTIONS, "tiles", (64, 32, 4, 2))
    assert backend._tiles(q, 128, table=table, head_order=True) == (64, 32, 4, 2)
    assert asked == [table.density]
