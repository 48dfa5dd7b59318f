"""bench/processor_attention.py: a dry run on the CPU (Triton interpreter) times and checks each path."""

import json

import pytest
import torch


def test_processor_attention_dry_run(load_script, tmp_path, capsys):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("processor_attention")
    result = script.main(["--dry-run", "--densities", "0.3", "--kinds", "mixed", "--backends", "triton", "--sets", "1",
                          "--out", str(tmp_path)])  # fmt: skip
    assert sorted(label for backend, label in script.PATHS if backend == "triton") == ["fused-permuted", "old"]
    rows = {(r["kind"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {("dense", "dense-old"), ("dense", "dense-fused"), ("mixed", "old"), ("mixed", "fused-permuted")}
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows[("mixed", "fused-permuted")]["check"] < 1e-6  # fp32: the fused path equals the old one
    assert result["failed_checks"] == []
    assert json.loads((tmp_path / "processor-attention.json").read_text())["rows"] == result["rows"]
    assert "triton/fused-permuted" in capsys.readouterr().out.split("block efficiency")[-1]  # the table, printed last
