"""SVG's reference rules: our tables against dense masks written from the reference code's rules.

The oracles below restate svg-project/Sparse-VideoGen's mask functions pair by pair (with the
table's block standing in for their 128); they never read our tables.
"""

import math

import pytest
import torch

from sparse_vdit.layout import VideoLayout
from sparse_vdit.methods.svg_reference import (
    HUNYUAN_T2V,
    WAN_I2V,
    WAN_T2V,
    executed_patterns,
    profile_patterns,
    reference_config,
    reference_rows,
    sparsity_to_width,
)
from sparse_vdit.patterns import compile_layer

torch.set_num_threads(1)
BLOCK = 16
LAYOUTS = {  # odd frames x height x width; ragged last blocks; text prefix and suffix
    "wan-odd": (VideoLayout(5, 5, 7), WAN_T2V),
    "wan-i2v-ragged": (VideoLayout(7, 3, 9), WAN_I2V),
    "hunyuan-suffix": (VideoLayout(3, 5, 9, 21, "suffix", text_valid=13), HUNYUAN_T2V),
    "cog-prefix": (VideoLayout(3, 7, 5, 11, "prefix"), HUNYUAN_T2V),
}
DENSITIES = (0.25, 0.4, 0.6)


def oracle_width(density, context, frames, frame_tokens):
    """sparsity_to_width, restated: a band of half-width w tokens covers 1 - (1 - w/N)^2 of N x N."""
    n = context + frames * frame_tokens
    target = density - 2 * context / n
    return n * (1 - math.sqrt(1 - target)) / frame_tokens


def executed_oracle(config, layout, density):
    """Bool [N, kv_len] in the head's own order: generate_temporal_head_mask_mod, pair by pair."""
    n, kv, s, v0, nv = layout.num_tokens, layout.kv_len, layout.frame_tokens, layout.video_start, layout.video_tokens
    text = set(range(layout.text_start, layout.text_start + layout.text))
    out = torch.zeros(n, kv, dtype=torch.bool)
    if config.sink:  # Wan: context_length = 0, ceil, <=, first-frame sink
        band = math.ceil(oracle_width(density, 0, layout.frames, s) * s / BLOCK) * BLOCK
    else:  # HunyuanVideo / CogVideoX: floor, <, text rows and columns
        band = math.floor(oracle_width(density, layout.text, layout.frames, s) * s / BLOCK) * BLOCK
    for q in range(n):
        for k in range(kv):
            keep = abs(q - k) <= band if config.sink else abs(q - k) < band
            keep |= config.sink and v0 <= k < v0 + s
            keep |= q in text or k in text
            out[q, k] = keep
    return out


def profile_oracle(config, layout):
    """Bool [N, kv_len] in the head's own order: get_attention_mask's block band (+ sink, + text)."""
    n, kv, s, v0, nv = layout.num_tokens, layout.kv_len, layout.frame_tokens, layout.video_start, layout.video_tokens
    limit = int(config.profile_frames * s // BLOCK)
    out = torch.zeros(n, kv, dtype=torch.bool)
    for q in range(n):
        for k in range(kv):
            qv, kv_ = v0 <= q < v0 + nv, v0 <= k < v0 + nv
            if qv and kv_:
                out[q, k] = abs((q - v0) // BLOCK - (k - v0) // BLOCK) < limit or (config.sink and k - v0 < s)
            else:
                out[q, k] = True  # a text row or a text column
    return out


def blocks_of(mask):
    """Block map of a token mask: a block is visited when it holds one kept pair."""
    qb, kb = -(-mask.shape[0] // BLOCK), -(-mask.shape[1] // BLOCK)
    padded = torch.zeros(qb * BLOCK, kb * BLOCK, dtype=torch.bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.view(qb, BLOCK, kb, BLOCK).any(3).any(1)


def own_order_token_mask(table):
    layout = table.layout
    m = table.block_mask(0).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    return m[: layout.num_tokens, : layout.kv_len]


def test_sparsity_to_width_matches_the_restated_rule():
    for args in ((0.25, 0, 21, 3600), (0.3, 256, 33, 3600), (0.1, 226, 11, 4080)):
        assert sparsity_to_width(*args) == pytest.approx(oracle_width(*args), rel=1e-12)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("name", LAYOUTS)
def test_executed_tables_are_the_reference_mask_blocks(name, density):
    layout, config = LAYOUTS[name]
    reference = executed_oracle(config, layout, density)
    for pattern in executed_patterns(config, layout, density, BLOCK):  # spatial, temporal: same rule, own order
        assert pattern.sink == (1.0 if config.sink else 0.0)
        table = compile_layer([pattern], layout, BLOCK)
        if config.band_tokens(layout, density, BLOCK) >= 0:  # else the reference keeps no band; we keep the own block
            assert torch.equal(table.block_mask(0), blocks_of(reference)), pattern
        assert bool((own_order_token_mask(table) | ~reference).all())  # every reference pair is computed


@pytest.mark.parametrize("name", [n for n, (lay, _) in LAYOUTS.items() if lay.video_start % BLOCK == 0])
def test_profile_tables_equal_the_reference_profile_masks(name):
    """Block for block (a block holding text, or the end of the first frame, is visited whole)."""
    layout, config = LAYOUTS[name]
    reference = profile_oracle(config, layout)
    for pattern in profile_patterns(config, layout, BLOCK):
        table = compile_layer([pattern], layout, BLOCK)
        assert torch.equal(table.block_mask(0), blocks_of(reference)), pattern
        assert bool((own_order_token_mask(table) | ~reference).all())


def test_wan_temporal_sink_is_the_first_frame_of_token_major_positions():
    layout = VideoLayout(5, 4, 8)  # S = 32 = two blocks of 16
    _, temporal_head = executed_patterns(WAN_T2V, layout, 0.25, BLOCK)
    table = compile_layer([temporal_head], layout, BLOCK)
    assert table.token_major[0] and table.block_mask(0)[:, :2].all()
    # in frame-major terms those are tokens p < S / F of every frame: the same 32 keys
    tm = layout.token_major_order()
    assert sorted(tm[:32].tolist()) == sorted(f * 32 + p for f in range(5) for p in range(32 // 5 + 1) if p * 5 + f < 32)


def test_rows_are_drawn_with_replacement_from_the_first_positions():
    layout = VideoLayout(21, 30, 52)
    rows = reference_rows(layout, 64, 10_000, step=3, layer=2, seed=0)
    assert rows.shape == (64,) and int(rows.min()) >= 0 and int(rows.max()) < 10_000
    assert torch.equal(rows, reference_rows(layout, 64, 10_000, step=3, layer=2, seed=0))
    many = reference_rows(VideoLayout(2, 2, 2), 64, 10_000, 0, 0)
    assert int(many.max()) < 8 and len(set(many.tolist())) < 64  # with replacement


def test_configs_and_warmup_follow_the_scripts():
    wan, hy = VideoLayout(21, 45, 80), VideoLayout(33, 45, 80, 256, "suffix")
    assert reference_config("wan", "wan2.1-t2v-14b", wan) is WAN_T2V
    assert reference_config(None, None, wan) is WAN_T2V and reference_config(None, None, hy) is HUNYUAN_T2V
    assert reference_config("wan", "Wan2.1-I2V-14B-720P", wan) is WAN_I2V
    # families the reference has no scripts for follow their layout (SkyReels-V2, LTX: Wan; Mochi: HunyuanVideo)
    assert reference_config("skyreels_v2", "SkyReels-V2-I2V-14B", wan) is WAN_I2V
    assert reference_config("ltx_video", None, wan) is WAN_T2V and reference_config("mochi", None, hy) is HUNYUAN_T2V
    assert (WAN_T2V.warmup_steps(50), WAN_I2V.warmup_steps(40), HUNYUAN_T2V.warmup_steps(50)) == (15, 14, 5)
    assert (WAN_T2V.warmup_layers(40), WAN_T2V.warmup_layers(30), HUNYUAN_T2V.warmup_layers(60)) == (1, 0, 1)
