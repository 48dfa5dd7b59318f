"""Every bench script imports, and each one without a test of its own runs a tiny --dry-run on the CPU."""

import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name, load_script):
    if name in ("e2e", "models", "fidelity", "oracle", "overhead", "search_cost", "sensitivity", "sp"):
        pytest.importorskip("diffusers")
    module = load_script(name)
    assert module.__doc__, f"bench/{name}.py says what it measures"


def test_attention_dry_run_builds_tables_at_their_density(load_script, capsys):
    module = load_script("attention")
    assert module.main(["--dry-run", "--shapes", "wan1.3b-480p", "--kinds", "band", "mixed", "--densities", "0.1"]) == {}
    lines = [line for line in capsys.readouterr().out.splitlines() if "target 0.10" in line]
    assert len(lines) == 2
    for line in lines:
        assert abs(float(line.split("->")[1].split()[0]) - 0.1) < 0.01


def test_tables_dry_run(load_script, tmp_path):
    out = tmp_path / "tables.json"
    (row,) = load_script("tables").main(["--dry-run", "--out", str(out)])
    assert row["model"] == "tiny" and row["block"] == 16 and row["cold_s"] > 0
    assert json.loads(out.read_text())["rows"] == [row]


def test_report_renders_every_section_without_writing(load_script, capsys):
    before = (BENCH.parent / "BENCHMARKS.md").read_text()
    done = load_script("report").main(["--dry-run"])
    assert {"attention", "e2e", "tables"} <= set(done)
    assert (BENCH.parent / "BENCHMARKS.md").read_text() == before
    assert "would rewrite" in capsys.readouterr().out


def test_sensitivity_dry_run(load_script, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "sensitivity.json"
    data = load_script("sensitivity").main(["--dry-run", "--device", "cpu", "--out", str(out)])
    (row,) = data["rows"]
    assert data["steps"] == 2 and row["noise"] == 0.1 and row["psnr"] > 0
    assert json.loads(out.read_text())["rows"] == data["rows"]


def test_kernel_variants_dry_run(load_script, tmp_path):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    rows = load_script("kernel_variants").main(["--dry-run", "--out", str(tmp_path)])
    assert {r["part"] for r in rows} == {"attention", "profile"}
    assert all("error" not in r and r["ms"] > 0 for r in rows)
    assert all(r["rel_rms_vs_first"] < 1e-3 for r in rows)
    assert json.loads((tmp_path / "kernel_variants.json").read_text())["meta"]["dry_run"]


def test_out_of_memory_is_said_and_the_run_goes_on(capsys):
    import common

    with common.out_of_memory_said("wan-14b"):
        raise torch.cuda.OutOfMemoryError("no room")
    assert "wan-14b: out of memory (no room)" in capsys.readouterr().out
    with pytest.raises(ValueError), common.out_of_memory_said("wan-14b"):  # other errors still raise
        raise ValueError("bad")


def test_gpu_session_steps_are_named_once_and_listed():
    """bench/gpu_session.sh: every step's case label is unique (bash runs the first of two alike, silently) and
    its header lists it."""
    import re

    text = (BENCH / "gpu_session.sh").read_text()
    labels = [name for line in re.findall(r"^    ([\w|. -]+)\) ", text, re.M) for name in re.split(r"\s*\|\s*", line)]
    assert len(labels) > 20
    assert len(labels) == len(set(labels)), sorted({n for n in labels if labels.count(n) > 1})
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    missing = [n for n in labels if not re.search(rf"(^|[\s/]){re.escape(n)}(\s|$)", header, re.M)]
    assert not missing, missing


def test_gpu_session_steps_name_backward_variants_that_exist():
    """bench/gpu_session.sh: every ``--variants`` of a bench/backward.py step is in ``backward.VARIANTS`` (a step
    naming a removed variant would spend a GPU call to stop at its first line)."""
    import re

    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton.backward import VARIANTS

    text = (BENCH / "gpu_session.sh").read_text().replace("\\\n", " ")
    named = [name for line in text.splitlines() if "bench/backward.py" in line
             for group in re.findall(r"--variants((?:\s+(?!-)[\w-]+)+)", line) for name in group.split()]
    assert len(named) > 5
    assert set(named) <= set(VARIANTS), sorted(set(named) - set(VARIANTS))
