"""The SVG profiling kernel (issue 16) against the float64 torch profile, with the frame-major mask
tested once per row and key tile (row-wise) or key by key, on Wan's layout and on an odd one (text
suffix, ragged blocks, frames that split key blocks); and its launch rules by profile size."""

import os

import pytest
import torch

from helpers import rel_rms
from sparse_vdit import VideoLayout
from sparse_vdit.methods.svg import SVG, sampled_errors, sampled_outputs
from test_svg_modes import WAN, heads_qkv

torch.set_num_threads(1)
BLOCK = 16
LAYOUTS = {"wan": WAN, "odd-text": VideoLayout(5, 5, 7, 19, "suffix")}  # 48 / 35 tokens a frame
SETTINGS = {  # sampled.TUNING fields (16 x 16 tiles: several key tiles a table block, two key splits)
    "row-wise": {},
    "per-key": {"row_wise": False},
}


def _triton_ready():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", LAYOUTS)
def test_profile_kernel_equals_the_float64_profile_and_chooses_alike(name, setting, monkeypatch):
    """Spatial, temporal and sink heads, rows in the middle frames, in both modes (``reference``: the
    sink): outputs as the float64 torch path's, the errors' choice identical to it."""
    _triton_ready()
    from sparse_vdit.kernels.triton import sampled

    layout = LAYOUTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in heads_qkv(layout, "STK", dim=32))
    rows = torch.arange(2 * layout.frame_tokens + 5, 4 * layout.frame_tokens, 6)  # frames 2-3
    monkeypatch.setattr(sampled, "TUNING", dict(sampled.TUNING, block_m=16, block_n=16, **SETTINGS[setting]))
    for mode in ("reference", "ours"):
        patterns = SVG(0.25, mode=mode, block_size=BLOCK).profile_patterns(layout)
        ref = sampled_outputs(q.double(), k.double(), v.double(), rows, layout, patterns, BLOCK, backend="torch")
        got = sampled_outputs(q, k, v, rows, layout, patterns, BLOCK, backend="triton")
        for a, b in zip(got, ref):
            assert a.shape == b.shape and not a.isnan().any() and rel_rms(a, b.float()) < 1e-5, (mode, rel_rms(a, b))
        errors, expected = sampled_errors(*got), sampled_errors(*ref)
        assert torch.equal(errors.argmin(0), expected.argmin(0)), (mode, errors, expected)
        assert expected.argmin(0).tolist()[:2] == [0, 1]  # the spatial and the temporal head are told apart


def test_launch_rules_pick_by_profile_size_and_tuning_overrides(monkeypatch):
    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton import sampled

    bounds = [bound for bound, _ in sampled.LAUNCH_RULES]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    assert all(set(rule) == set(sampled.LAUNCH_KEYS) for _, rule in sampled.LAUNCH_RULES)
    wan13 = sampled.launch_settings(1 * 12 * 64 * 32_760, 128)  # samples x heads x rows x keys
    wan14 = sampled.launch_settings(1 * 40 * 64 * 75_600, 128)
    assert wan13 == sampled.LAUNCH_RULES[0][1] and wan14 == sampled.LAUNCH_RULES[-1][1]
    assert (wan13["programs_per_sm"], wan14["programs_per_sm"]) == (2, 8)  # the H200 sweep's winners
    assert sampled._tiles(64, 128, torch.device("cpu")) == tuple(
        sampled.LAUNCH_RULES[0][1][k] for k in ("block_m", "block_n", "num_warps", "num_stages"))  # fmt: skip
    assert sampled._tiles(64, 256, torch.device("cpu")) == (16, 64, 4, 2)  # wide heads: smaller tiles
    monkeypatch.setitem(sampled.TUNING, "block_n", 64)
    monkeypatch.setitem(sampled.TUNING, "num_warps", 2)
    assert sampled.launch_settings(1, 128) == dict(sampled.LAUNCH_RULES[0][1], block_n=64, num_warps=2)


def test_splits_follow_the_rule_s_programs_per_sm(monkeypatch):
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sparse_vdit.kernels.triton import sampled

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert sampled._splits(40, 75_600, 32, cuda, per_sm=8) == 27  # ceil(8 * 132 / 40): Wan-14B's 40 programs
    assert sampled._splits(12, 32_760, 32, cuda, per_sm=2) == 22  # Wan-1.3B's 12
    monkeypatch.setitem(sampled.TUNING, "programs_per_sm", 1)
    assert sampled._splits(40, 75_600, 32, cuda, per_sm=8) == 4  # TUNING over the rule
