"""Every CLI failure is one line `sparse-vdit <command>: <cause>` and a non-zero exit, before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from helpers import saved_tiny_organism  # noqa: E402
from sparse_vdit import __version__  # noqa: E402
from sparse_vdit.cli import common, demo  # noqa: E402
from sparse_vdit.cli.main import main  # noqa: E402

SRC = Path(__file__).parents[2] / "src"


def fails(argv, monkeypatch=None) -> str:
    """Run the CLI expecting a failure; the one line it ends with."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str), f"exit without a message: {message!r}"
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command starts loading the organism (the arguments should have failed first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(demo, "_model", refuse)


def read_only(path: Path, monkeypatch) -> Path:
    """A folder nobody can write to (root ignores permission bits: then writes into it fail by patch)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    if os.access(path, os.W_OK):  # running as root
        real = common.tempfile.NamedTemporaryFile

        def deny(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == path.resolve():
                raise PermissionError(13, "Permission denied", str(path))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(common.tempfile, "NamedTemporaryFile", deny)
    return path


def test_bad_values_fail_at_parse_time(no_model):
    message = fails(["demo", "--svg-density", "1.5"])
    assert message == "sparse-vdit demo: argument --svg-density: must lie in (0, 1], got 1.5"
    message = fails(["demo", "--backend", "frob"])
    assert message.startswith("sparse-vdit demo: argument --backend: invalid choice: 'frob'")
    assert fails(["demo", "--steps", "0"]) == "sparse-vdit demo: argument --steps: must be >= 1, got 0"
    assert "no CUDA GPU here" in fails(["demo", "--device", "cuda:7"]) or "only" in fails(["demo", "--device", "cuda:7"])
    assert fails(["search", "--model", "organism", "--block-size", "96"]).startswith(
        "sparse-vdit search: argument --block-size: must be a power of two")
    assert fails(["generate", "--model", "x", "--density", "0"]).startswith("sparse-vdit generate: argument --density")
    assert fails(["nonsense"]).startswith("sparse-vdit: argument command: invalid choice")


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"sparse-vdit {__version__}"
    helps = {}
    for command in ("demo", "generate", "search", "check"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.25)" in helps["demo"] and "(default: auto)" in helps["demo"]
    assert f"default {common.ORGANISM_STEPS}" in helps["demo"]
    for command in ("generate", "search"):  # one steps default for both: a plan's ranges are step indices
        assert f"default {common.PIPELINE_STEPS}; {common.ORGANISM_STEPS} on the organism" in helps[command]
        block_help = helps[command].split("--block-size BLOCK_SIZE")[-1].split("--")[0]
        assert f"{common.PIPELINE_BLOCK}; {common.ORGANISM_BLOCK} on the organism" in block_help
    assert "(default: 64)" in helps["check"]


def test_one_dtype_default_for_the_commands_that_load_a_model():
    assert common.dtype_of(None, "cpu") is torch.float32
    assert common.dtype_of(None, "cuda:1") is torch.bfloat16
    assert common.dtype_of("fp16", "cuda") is torch.float16 and common.dtype_of("bf16", "cpu") is torch.bfloat16
    assert fails(["generate", "--model", "x", "--dtype", "f16"]).startswith(
        "sparse-vdit generate: argument --dtype: invalid choice: 'f16'")


def test_bad_demo_plan_file_fails_before_the_model(tmp_path, no_model):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "sparse-vdit-plan", "version": 1, "warmup": {"step": 5}}')
    message = fails(["demo", "--plan", str(bad), "--out", str(tmp_path / "out")])
    assert message == f"sparse-vdit demo: {bad}: the top level: missing key 'model'"
    bad.write_bytes(b"\xff\xfe{}")
    assert fails(["demo", "--plan", str(bad), "--out", str(tmp_path / "out")]).endswith("not UTF-8 text (byte 0: invalid start byte)")
    assert "cannot read plan" in fails(["demo", "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")])


def test_read_only_output_folders(tmp_path, monkeypatch, no_model):
    locked = read_only(tmp_path / "locked", monkeypatch)
    message = fails(["demo", "--out", str(locked)])
    assert message.startswith(f"sparse-vdit demo: cannot write to the output folder {locked}: Permission denied")
    message = fails(["generate", "--model", "organism", "--plan", "dense", "--prompt", "p", "--out", str(locked / "v.mp4")])
    assert message.startswith(f"sparse-vdit generate: cannot write to the output folder {locked}")
    (tmp_path / "file").write_text("x")
    assert fails(["demo", "--out", str(tmp_path / "file")]) == f"sparse-vdit demo: output folder {tmp_path / 'file'} is a file"


def test_search_errors_name_search(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["a cat", ')
    message = fails(["search", "--model", "organism", "--prompts", str(prompts), "--out", str(tmp_path / "p.json")])
    assert message.startswith(f"sparse-vdit search: {prompts} is not valid JSON (line 1")
    prompts.write_text('{"a": 1}')
    assert fails(["search", "--model", "organism", "--prompts", str(prompts)]).endswith("must hold a JSON list of strings")
    message = fails(["search", "--model", "nobody/no-such-model-xyz", "--prompt", "a cat", "--out", str(tmp_path / "p.json")])
    assert message.startswith("sparse-vdit search: 'nobody/no-such-model-xyz' is neither a local folder")
    assert "`hf download nobody/no-such-model-xyz`" in message and "huggingface-cli" not in message


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(demo, "run", broken)
    assert fails(["demo"]) == "sparse-vdit demo: RuntimeError: kernel exploded (--debug shows where)"
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["demo", "--debug"])
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["--debug", "demo"])


def test_generate_runs_an_organism_folder(tmp_path):
    from sparse_vdit.organism.data import sample_scene

    saved_tiny_organism(tmp_path / "w")
    out = tmp_path / "v.mp4"
    caption = sample_scene(0, 0).caption
    assert main(["generate", "--model", str(tmp_path / "w"), "--plan", "dense", "--prompt", caption, "--steps", "2",
                 "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0  # fmt: skip
    import imageio.v3 as iio

    assert iio.imread(out).shape[0] == 4
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["model"].startswith("organism")
    message = fails(["generate", "--model", str(tmp_path / "w"), "--plan", "dense", "--prompt", "purple unicorn",
                     "--steps", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert message.startswith("sparse-vdit generate: ") and "vocabulary" in message


def installed(*argv: str) -> subprocess.CompletedProcess:
    """``sparse-vdit ARGV`` in a fresh process, as a user runs it (this checkout's package, one thread)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparse_vdit.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_the_installed_command_prints_one_line(tmp_path):
    done = installed("demo", "--svg-density", "1.5")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == "sparse-vdit demo: argument --svg-density: must lie in (0, 1], got 1.5\n"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if train-organism starts training (the arguments should have failed first)."""
    from sparse_vdit.organism import train

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "train", refuse)


def test_train_organism_fails_in_one_line_before_training(tmp_path, monkeypatch, no_training):
    out = ["--out", str(tmp_path / "run")]
    assert fails(["train-organism", "--steps", "x", *out]) == "sparse-vdit train-organism: argument --steps: invalid int value: 'x'"
    assert fails(["train-organism", "--bogus", *out]) == "sparse-vdit train-organism: unrecognized arguments: --bogus"
    assert fails(["train-organism", "--size", "32", "--height", "16", *out]) == (
        "sparse-vdit train-organism: give --size or --height/--width, not both")
    assert fails(["train-organism", "--batch-size", "0", *out]) == (
        "sparse-vdit train-organism: argument --batch-size: must be >= 1, got 0")
    assert fails(["train-organism", "--lr", "nan", *out]) == (
        "sparse-vdit train-organism: argument --lr: must be a finite number > 0, got nan")
    assert fails(["train-organism", "--ema", "1", *out]).endswith("argument --ema: must be in [0, 1) (0: no EMA), got 1.0")
    assert "argument --size: must be a multiple of 4" in fails(["train-organism", "--size", "30", *out])
    assert fails(["train-organism", "--device", "frob", *out]).startswith(
        "sparse-vdit train-organism: argument --device: not a torch device: 'frob'")
    assert fails(["train-organism", "--resume", str(tmp_path), *out]) == (
        f"sparse-vdit train-organism: argument --resume: no checkpoint.pt in {tmp_path}")
    assert fails(["train-organism", "--init", str(tmp_path), *out]).startswith(
        f"sparse-vdit train-organism: argument --init: no organism weights in {tmp_path}")
    locked = read_only(tmp_path / "locked", monkeypatch)
    assert fails(["train-organism", "--out", str(locked)]).startswith(
        f"sparse-vdit train-organism: cannot write to the output folder {locked}: Permission denied")


def test_train_organism_hands_checked_arguments_to_training(tmp_path, monkeypatch):
    from sparse_vdit.organism import train

    seen = {}
    monkeypatch.setattr(train, "train", lambda args, command: seen.update(args=args, command=command))
    assert main(["train-organism", "--steps", "3", "--size", "32", "--out", str(tmp_path / "run")]) == 0
    assert seen["args"].steps == 3 and seen["args"].size == 32 and seen["args"].out == str(tmp_path / "run")
    assert seen["command"] == f"sparse-vdit train-organism --steps 3 --size 32 --out {tmp_path / 'run'}"


def test_train_organism_installed_command_prints_one_line():
    done = installed("train-organism", "--preset", "nope")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("sparse-vdit train-organism: argument --preset: invalid choice: 'nope' "
                           "(choose from 'small', 'fidelity')\n")  # fmt: skip


def test_the_other_commands_fail_in_one_line_too(tmp_path, monkeypatch, capsys):
    """The #19 list re-checked on show, check, generate --plan and train-organism --help."""
    locked = read_only(tmp_path / "locked", monkeypatch)
    broken = tmp_path / "plan.json"
    broken.write_bytes(b"\xff\xfe{}")
    assert fails(["show", str(broken)]) == f"sparse-vdit show: {broken}: not UTF-8 text (byte 0: invalid start byte)"
    shipped = Path(demo.__file__).parents[1] / "organism" / "weights" / "plan.json"
    if shipped.exists():
        assert fails(["show", str(shipped), "--out", str(locked / "p.png")]).startswith(
            f"sparse-vdit show: cannot write to the output folder {locked}")
    assert fails(["check", "--out", str(locked)]).startswith(f"sparse-vdit check: cannot write to the output folder {locked}")
    broken.write_text('{"format": "sparse-vdit-plan", ')
    message = fails(["generate", "--model", "organism", "--plan", str(broken), "--prompt", "p", "--out", str(tmp_path / "v.mp4")])
    assert message.startswith(f"sparse-vdit generate: {broken}: not valid JSON (line 1")
    with pytest.raises(SystemExit) as info:
        main(["train-organism", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (upper bound, counted over resumed runs) (default: 8000)" in text and "(default: small)" in text
