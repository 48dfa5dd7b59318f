"""bench/backward_counters.py: ncu's raw page read, cells told apart, the summary's columns and stalls."""

import csv
import gzip
import io
from pathlib import Path

import pytest

HEADER = ["ID", "Kernel Name", "gpu__time_duration.sum", "smsp__cycles_elapsed.avg.per_second",
          "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
          "smsp__inst_executed.sum", "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
          "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
          "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"]  # fmt: skip
UNITS = ["", "", "us", "Ghz", "%", "", "inst", "", "", ""]  # as ncu 2025.3 writes them


def raw_page(tmp_path: Path, rows) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL)
    writer.writerows([HEADER, UNITS, *rows])
    path = tmp_path / "raw.csv.gz"  # gzipped, as the results keep them
    path.write_bytes(gzip.compress(("==PROF== Connected to process\n" + text.getvalue()).encode()))
    return path


def test_cells_split_at_the_separator_with_units_and_top_stalls(load_script, tmp_path):
    script = load_script("backward_counters")
    path = raw_page(tmp_path, [
        ["1", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop(int, float)", "30,360.5", "1.62", "71.5", "4,164,548,419",
         "1,500,000,000", "0.50", "1.25", "0.10"],
        ["2", "spin_kernel(long)", "1", "1", "0", "0", "10", "0", "0", "0"],
        ["3", "block_sparse_attention_bwd_dkdv", "3,030", "1.83", "55.0", "1,000", "400,000,000", "2.00", "0.40",
         "0.90"],
    ])  # fmt: skip
    rows = script.read_raw(path)
    found = script.kernels(rows, ["cudnn-dense", "mixed 0.100"])
    assert [(k["cell"], k["kernel"]) for k in found] == [
        ("cudnn-dense", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop"),
        ("mixed 0.100", "block_sparse_attention_bwd_dkdv")]  # fmt: skip
    dense, dkdv = found
    assert dense["ms"] == pytest.approx(30.3605) and dkdv["ms"] == pytest.approx(3.030)  # separators read, us -> ms
    assert dense["smem wavefronts M"] == pytest.approx(4164.548419) and dense["inst M"] == pytest.approx(1500)
    assert dkdv["tensor%"] == pytest.approx(55.0) and dkdv["GHz"] == pytest.approx(1.83)
    assert dkdv["stalls"] == [("barrier", 2.0), ("wait", 0.9), ("long_scoreboard", 0.4)]  # largest first
    table = script.summarize(rows, ["cudnn-dense", "mixed 0.100"])
    lines = table.splitlines()
    assert lines[0].startswith("| cell | kernel | ms | GHz | tensor% |") and "sm%" not in lines[0]  # absent: not shown
    assert len(lines) == 4 and "barrier 2.00, wait 0.90" in lines[3]


def test_command_profiles_only_the_marked_range_with_clocks_alone(load_script, tmp_path):
    script = load_script("backward_counters")
    command = script.ncu_command("ncu", tmp_path, ["--shape", "wan1.3b-480p"])
    joined = " ".join(command)
    assert "--profile-from-start off" in joined and "--clock-control none" in joined  # METHOD.md: clocks left alone
    assert command[-3:] == ["run", "--shape", "wan1.3b-480p"] and command[-4].endswith("backward_counters.py")
    assert script.parse(["run", "--cells", "band:0.25"]).cells == ["band:0.25"]
    with pytest.raises(SystemExit):
        script.parse(["profile", "--cells", "band"])  # no density: refused before any GPU work


def test_variant_is_checked_and_passed_to_the_profiled_run(load_script):
    script = load_script("backward_counters")
    assert script.parse(["run", "--variant", "triton-dkdv"]).variant == "triton-dkdv"
    with pytest.raises(SystemExit):
        script.parse(["profile", "--variant", "no-such-variant"])
