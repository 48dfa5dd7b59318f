"""bench/sp.py: its one-command driver on the CPU (--dry-run: world 1 here, world 2 spawned on gloo,
every family), the table it prints, and the torchrun command it runs on GPUs."""

import importlib
import json

import pytest

pytest.importorskip("diffusers")


@pytest.fixture
def sp(monkeypatch):
    """bench/sp.py imported as ``sp`` (bench/ is on the path, conftest.py), so that the processes its
    --dry-run spawns can import it too."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return importlib.import_module("sp")


def test_dry_run_one_and_two_processes_every_family(sp, tmp_path, capsys):
    out = tmp_path / "sp.json"
    # --budget-s: the budget counts from bench/common.py's import, so a long test session must not skip rows
    assert sp.main(["--dry-run", "--gpus", "1,2", "--models", "wan-14b,hunyuan,cogvideox1.5", "--densities", "0.3",
                    "--repeats", "1", "--budget-s", "1e6", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["model"], r["world"], r["cp"], r["variant"]) for r in rows) == sorted(
        (m, w, "none" if w == 1 else "ulysses", v)
        for m in ("wan-14b", "hunyuan", "cogvideox1.5") for w in (1, 2) for v in ("dense", "sparse-30")
    )  # fmt: skip
    assert all(r["seconds"] > 0 and r["dry_run"] and len(r["attention_seconds_per_rank"]) == r["world"] for r in rows)
    table = capsys.readouterr().out
    two = [line for line in table.splitlines() if line.startswith("| hunyuan | 2 | ulysses | sparse-30 |")]
    assert len(two) == 1 and two[0].rstrip(" |").endswith("x")  # the forward-vs-1-GPU column is filled


def test_table_ratios(sp):
    def row(world, variant, seconds, cp="ulysses"):
        return dict(model="m", world=world, cp=cp if world > 1 else "none", variant=variant, density=0.5,
                    seconds=seconds, attention_seconds_per_rank=[0.1] * world)  # fmt: skip

    rows = [row(1, "dense", 4.0), row(1, "sparse-50", 2.0), row(4, "dense", 1.0), row(4, "sparse-50", 0.8)]
    lines = sp.table(rows).splitlines()
    # world 4 sparse: 1.25x vs its dense, 1.25 / 2.0 of the 1-GPU speedup, 2.0 / 0.8 = 2.5x faster than 1 GPU
    assert lines[-1] == "| m | 4 | ulysses | sparse-50 | 0.50 | 800.0 | 100.0-100.0 | 1.25x | 0.62 | 2.50x |"
    assert lines[2].startswith("| m | 1 | none | dense |") and lines[2].endswith("| 1.00x |  |  |")


def test_torchrun_command_and_arguments(sp):
    command = sp.torchrun_command(4, ["--models", "hunyuan"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[5].endswith("bench/sp.py") and command[6:] == ["--models", "hunyuan"]
    assert sp.parse_args(["--gpus", "1,8", "--cp", "ring"]).gpus == [1, 8]
    with pytest.raises(SystemExit):
        sp.parse_args(["--gpus", "0"])


def test_every_context_parallel_family_has_a_real_and_a_tiny_model(sp):
    """Each family context parallelism runs has a published config in ``--models`` (its token grid
    from the config, no model built) and a tiny one for --dry-run."""
    from types import SimpleNamespace

    import models
    import torch

    from sparse_vdit.integrations.diffusers import families as F
    from sparse_vdit.integrations.diffusers import parallel

    seen, grids = set(), {}
    for name, bench in models.MODELS.items():
        family = next(f for f in F.FAMILIES if bench.cls in f.model_classes)
        config = SimpleNamespace(**{"patch_size_t": None, **bench.config})
        grid = dict(zip(("num_frames", "height", "width"), bench.extra.get("grid", (None,) * 3)))
        hidden = torch.empty(bench.latent, device="meta")
        grids[name] = (config.num_attention_heads, *family.latent_grid(SimpleNamespace(config=config), hidden, grid))
        seen.add(family.name)
        assert name in models.TINY and sp.parse_args(["--models", name]).models == [name]
    assert set(parallel.CP_FAMILIES) == seen
    # heads, latent frames x height x width after patchify (divisible by 8 GPUs)
    assert grids["skyreels-v2-14b"] == (40, 31, 45, 80)
    assert grids["ltx-video"] == (32, 21, 24, 40)
    assert grids["mochi"] == (24, 28, 30, 53)


def test_dry_run_one_process_new_families(sp, tmp_path):
    """SkyReels-V2, LTX-Video (packed tokens, the grid as arguments) and Mochi (padded text) build,
    take their inputs and run dense and sparse (the 2-process runs: tests/integrations/test_context_parallel.py)."""
    out = tmp_path / "sp.json"
    assert sp.main(["--dry-run", "--gpus", "1", "--models", "skyreels-v2-14b,ltx-video,mochi", "--densities", "0.3",
                    "--repeats", "1", "--budget-s", "1e6", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["model"], r["variant"]) for r in rows) == sorted(
        (m, v) for m in ("skyreels-v2-14b", "ltx-video", "mochi") for v in ("dense", "sparse-30"))  # fmt: skip
    assert all(r["seconds"] > 0 and (r["density"] < 0.4) == (r["variant"] != "dense") for r in rows)
