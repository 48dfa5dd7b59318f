"""bench/train_step.py runs on tiny models on the CPU (--dry-run): every variant's step, the parameters it trains."""

import json

import pytest

pytest.importorskip("diffusers")


def test_dry_run_times_every_variant_and_trains_what_it_says(load_script, tmp_path, capsys):
    train_step = load_script("train_step")
    out = tmp_path / "train_step.json"
    assert train_step.main(["--dry-run", "--models", "wan-1.3b", "--densities", "0.3", "--repeats", "1",
                            "--out", str(out), "--profile", str(tmp_path / "prof")]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["unpatched", "dense", "sparse-30"]
    assert all(r["seconds"] > 0 and r["dry_run"] and r["checkpointing"] and r["trainable"] == "attention" for r in rows)
    assert rows[0]["density"] == 1.0 and 0.2 < rows[2]["density"] < 0.45
    assert rows[2]["speedup_vs_unpatched"] == pytest.approx(rows[0]["seconds"] / rows[2]["seconds"])
    assert "sparse-30" in capsys.readouterr().out
    assert "GeneratedBackwardFor_sparse_vdit" in (tmp_path / "prof" / "wan-1.3b-eager-sparse-30.txt").read_text()  # the backward too


def test_trainable_attention_is_the_projections_only(load_script):
    import torch

    train_step = load_script("train_step")
    from models import TINY, build

    model = build(TINY["wan-1.3b"], torch.device("cpu"), torch.float32)
    train_step.set_trainable(model, "attention")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for n in names)
    assert any(".attn1." in n for n in names)  # self-attention's projections among them
    assert train_step.set_trainable(model, "all") == sum(p.numel() for p in model.parameters())


def test_no_unpatched_row_and_speedups_against_dense(load_script, tmp_path):
    train_step = load_script("train_step")
    out = tmp_path / "train_step.json"
    assert train_step.main(["--dry-run", "--models", "hunyuan", "--densities", "0.3", "--repeats", "1", "--no-unpatched",
                            "--trainable", "all", "--no-checkpointing", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["dense", "sparse-30"]
    assert "speedup_vs_unpatched" not in rows[1] and rows[1]["speedup_vs_dense"] > 0
    assert not rows[1]["checkpointing"] and rows[1]["trainable"] == "all"


def test_sparse_rows_only(load_script, tmp_path):
    train_step = load_script("train_step")
    out = tmp_path / "train_step.json"
    assert train_step.main(["--dry-run", "--models", "wan-1.3b", "--densities", "0.3,0.2", "--repeats", "1",
                            "--no-unpatched", "--no-dense", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["sparse-30", "sparse-20"]
    assert not any(key.startswith("speedup_vs") for r in rows for key in r)
