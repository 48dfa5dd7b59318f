"""bench/backward.py: a dry run on the CPU times the Triton (interpreter) and reference backwards."""

import json

import pytest
import torch


def test_backward_dry_run(load_script, tmp_path):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    result = load_script("backward").main(["--dry-run", "--backends", "triton", "--kinds", "band", "--out", str(tmp_path),
                                           "--variants", "default"])  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"cudnn-backward", "triton[default]", "reference"}
    (check,) = result["checks"]["default"]  # checked against float64 before it was timed
    assert check["ok"] and max(check["error"]) < 1e-5, check
    assert rows["triton[default]"]["variant"] == "default"
    assert all(r["ms"] > 0 and r["block_eff"] > 0 for r in rows.values())
    assert abs(rows["triton[default]"]["density"] - 0.1) < 0.2  # 4 x 4 blocks: the nearest density reached
    assert json.loads((tmp_path / "backward.json").read_text())["rows"] == result["rows"]
