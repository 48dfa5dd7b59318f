"""bench/finetune.py: a dry run (tiny random organism, CPU) scores a plan, trains its LoRA, scores again."""

import json

import pytest


def test_finetune_dry_run(load_script, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    result = load_script("finetune").main(["--dry-run", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["training"]["steps"] == 2 and row["training"]["videos"] == 4
    assert 0 < row["density"] < 1 and row["plan"]["method"] == "uniform"
    assert row["before"]["psnr"] > 0 and row["after"]["psnr"] > 0 and row["after"] != row["before"]
    assert json.loads((tmp_path / "finetune.json").read_text())["rows"] == result["rows"]
