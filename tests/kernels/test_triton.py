"""The Triton backend against the reference: interpreter on the CPU (fp16/fp32), bf16 on a GPU."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import poison_empty_like, rel_rms  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer, sparse_attention  # noqa: E402
from sparse_vdit.kernels.triton import launcher  # noqa: E402
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16, torch.float32]
MIXED = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)]
CASES = {
    "mixed-text-suffix-padded-batch2": (VideoLayout(3, 5, 9, 40, "suffix", text_valid=7), 16, MIXED, 2, 64),
    "mixed-text-prefix-d128": (VideoLayout(3, 4, 7, 13, "prefix"), 16, MIXED, 1, 128),
    "svg-spatial-temporal": (VideoLayout(4, 4, 6), 32, [spatial(1.0), temporal(0.2), spatial(0.0)], 2, 64),
    "ragged-1560-token-frames": (VideoLayout(2, 30, 52), 128, [diagonal(0.5), multi_diagonal(0.05)], 1, 64),
}


def _torch_error(q, k, v, expected):
    """How wrong plain torch attention is at this precision (the DESIGN.md yardstick)."""
    return rel_rms(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case, dtype, monkeypatch):
    layout, block, heads, batch, dim = CASES[case]
    table = compile_layer(heads, layout, block, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v = (torch.randn(batch, layout.num_tokens, len(heads), dim, generator=g, device=DEVICE).to(dtype) for _ in range(3))
    poison_empty_like(monkeypatch, launcher.torch)  # output buffers start as NaN: unwritten elements show
    out = sparse_attention(q, k, v, table, backend="triton")
    monkeypatch.undo()
    ref = sparse_attention(q.float(), k.float(), v.float(), table, backend="reference")
    assert not out.isnan().any()
    for h, p in enumerate(heads):
        if p.name == "skip":
            assert torch.equal(out[:, :, h], torch.zeros_like(out[:, :, h]))
    dense_expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
    bound = max(2 * _torch_error(q, k, v, dense_expected), 1e-6)
    assert rel_rms(out, ref) <= bound, f"{rel_rms(out, ref):.2e} > {bound:.2e}"


def test_schedule_puts_heavy_work_first():
    counts = torch.tensor([[1, 1, 2], [5, 5, 5], [4, 6, 0]], dtype=torch.int32)
    order = launcher._schedule(counts, tiles_per_block=1, num_q_tiles=3)
    assert order.tolist() == [7, 3, 4, 5, 6, 2, 0, 1, 8]
    by_head = launcher._schedule(counts, tiles_per_block=1, num_q_tiles=3, order="heads")
    assert by_head.tolist() == [3, 4, 5, 7, 6, 8, 2, 0, 1]  # heads 1, 2, 0; each head's tiles heaviest first
    by_level = launcher._schedule(counts, tiles_per_block=1, num_q_tiles=3, order="levels")
    assert by_level.tolist() == [3, 4, 5, 6, 7, 2, 0, 1, 8]  # levels 2 (4..7 blocks), 1, 0, then empty tiles
    with pytest.raises(ValueError, match="schedule"):
        launcher._schedule(counts, 1, 3, order="random")


OPTION_SETS = {  # the defaults (launcher.DEFAULTS) are covered by test_triton_matches_reference
    "plain-by-work": {"tma": False, "warp_specialize": False, "schedule": "work"},
    "tma-by-heads": {"tma": True, "warp_specialize": False, "schedule": "heads"},
    "warp-specialize": {"tma": False, "warp_specialize": True, "schedule": "levels"},
}


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("case", ["mixed-text-suffix-padded-batch2", "ragged-1560-token-frames"])
def test_kernel_options_match_reference(case, options, monkeypatch):
    """Each kernel option (TMA tiles for the frame-major heads, the warp-specialised loop, the work
    order) gives the same attention, with token-major heads in the same launch."""
    layout, block, heads, batch, dim = CASES[case]
    dtype = DTYPES[0]
    table = compile_layer(heads, layout, block, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q, k, v = (torch.randn(batch, layout.num_tokens, len(heads), dim, generator=g, device=DEVICE).to(dtype) for _ in range(3))
    monkeypatch.setattr(launcher, "OPTIONS", dict(launcher.OPTIONS, **OPTION_SETS[options]))
    calls = []
    descriptors = launcher._descriptors
    monkeypatch.setattr(launcher, "_descriptors", lambda *a: calls.append(descriptors(*a)) or calls[-1])
    out = sparse_attention(q, k, v, table, backend="triton")
    assert [c is not None for c in calls] == ([True] if OPTION_SETS[options]["tma"] else [])
    ref = sparse_attention(q.float(), k.float(), v.float(), table, backend="reference")
    assert not out.isnan().any()
    dense_expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
    bound = max(2 * _torch_error(q, k, v, dense_expected), 1e-6)
    assert rel_rms(out, ref) <= bound, f"{rel_rms(out, ref):.2e} > {bound:.2e}"


def test_options_set_restores_the_options_it_set():
    before = dict(launcher.OPTIONS)
    with launcher.options_set(block_list=True, tiles=(16, 16, 4, 1)):
        assert launcher.option("block_list") is True and launcher.option("tiles") == (16, 16, 4, 1)
        assert launcher.OPTIONS["tma"] == before["tma"]  # the others untouched
    assert launcher.OPTIONS == before
    with pytest.raises(RuntimeError), launcher.options_set(schedule="heads"):
        raise RuntimeError("restored on errors too")
    assert launcher.OPTIONS == before
    with pytest.raises(KeyError, match="unknown Triton kernel options"), launcher.options_set(blocklist=True):
        pass
    assert launcher.OPTIONS == before
