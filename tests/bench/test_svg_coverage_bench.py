"""bench/svg_coverage.py: its per-block pair counts against a dense count, and its result shape."""

import json

import pytest
import torch

from sparse_vdit import VideoLayout
from sparse_vdit.methods.svg_reference import HUNYUAN_T2V, WAN_T2V


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("svg_coverage")


@pytest.mark.parametrize("config,layout", [(WAN_T2V, VideoLayout(5, 16, 20)),
                                           (HUNYUAN_T2V, VideoLayout(3, 16, 20, 150, "suffix", text_valid=70))],
                         ids=["wan-sink", "hunyuan-text"])  # fmt: skip
def test_pair_counts_equal_a_dense_count(bench, config, layout):
    density = 0.3
    got = bench.reference_pairs(config, layout, density, chunk=97)
    n, kv, s = layout.num_tokens, layout.kv_len, layout.frame_tokens
    band = config.band_tokens(layout, density)
    q, k = torch.arange(n)[:, None], torch.arange(kv)[None, :]
    text = lambda x: (x >= layout.text_start) & (x < layout.text_start + layout.text)  # noqa: E731
    keep = ((q - k).abs() <= band) | text(q) | text(k) | ((k < s) if config.sink else False)
    padded = torch.zeros(-(-n // 128) * 128, -(-kv // 128) * 128)
    padded[:n, :kv] = keep.double()
    expected = padded.view(-(-n // 128), 128, -(-kv // 128), 128).sum((1, 3))
    assert torch.equal(got, expected.double())


def test_coverage_run_writes_its_result(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", (VideoLayout(5, 16, 20), bench.KNOWN_MODELS["wan2.1-t2v-1.3b"], 0.25))
    result = bench.main(["--shapes", "tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "svg_coverage.json").read_text())
    assert saved["coverage"] == result["coverage"] and len(saved["coverage"]) == 4
    assert all(r["coverage"] == pytest.approx(1.0) for r in saved["coverage"] if r["mode"] == "reference")
    errors = {r["mask"].split(":")[0]: r["error"] for r in saved["sink_head"]}
    assert errors["reference"] <= 2 * errors["reference (band + kv < S)"] < 1e-3 < errors["ours"]
