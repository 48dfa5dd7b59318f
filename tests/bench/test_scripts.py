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


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_script_parses(script):
    """Every bench shell script is valid bash (a GPU call spent on a syntax error finds it too late)."""
    import subprocess

    done = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_env_joins_checks_and_unpacks_the_carried_triton(tmp_path):
    """bench/gpu_env.sh's Triton 3.9 block, on a stand-in package split as bench/pack_triton39.sh splits it
    (two parts under .tri1/ and .tri2/, each beside the SHA256): joined only when both parts are there, checked,
    unpacked; TRITON39=1 then puts it first on PYTHONPATH with its backends found in its own tree."""
    import re
    import shutil
    import subprocess
    import tarfile

    if not (shutil.which("xz") and shutil.which("sha256sum")):
        pytest.skip("needs xz and sha256sum, as the GPU machine has")
    text = (BENCH / "gpu_env.sh").read_text()
    block = text[text.index("for d in .tri*"):]
    block = block[: block.index("\nfi\n", block.index('if [ "${TRITON39')) + 4]
    block = block.replace("/tmp/triton39", str(tmp_path / "t39")).replace("/tmp/tri", str(tmp_path / "tri"))
    pack = (BENCH / "pack_triton39.sh").read_text()
    assert "split -n 2 -d triton39.tar.xz triton39.part." in pack and re.search(r"\.tri1/\n.*\.tri2/", pack, re.S)

    package = tmp_path / "pkg"
    (package / "triton").mkdir(parents=True)
    (package / "triton" / "__init__.py").write_text("__version__ = '3.9.0'\n")
    archive = tmp_path / "triton39.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(package / "triton", arcname="triton")
    data = archive.read_bytes()
    work = tmp_path / "tree"
    for i, part in enumerate((data[: len(data) // 2], data[len(data) // 2 :])):
        folder = work / f".tri{i + 1}"
        folder.mkdir(parents=True)
        (folder / f"triton39.part.0{i}").write_bytes(part)
        subprocess.run(f"cd {tmp_path} && sha256sum triton39.tar.xz > {folder}/SHA256", shell=True, check=True)
    script = block + '\necho "PYTHONPATH=$PYTHONPATH IN_TREE=${TRITON_BACKENDS_IN_TREE:-}"\n'

    (work / ".tri2" / "triton39.part.01").rename(tmp_path / "held")  # one part only: nothing unpacked yet
    first = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert "only 1 of 2 parts" in first.stderr and not (tmp_path / "t39").exists()
    (tmp_path / "held").rename(work / ".tri2" / "triton39.part.01")
    done = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TRITON39": "1", "PYTHONPATH": "src"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t39" / "triton" / "__init__.py").read_text() == "__version__ = '3.9.0'\n"
    assert f"PYTHONPATH={tmp_path / 't39'}:src IN_TREE=1" in done.stdout
