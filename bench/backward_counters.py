"""Hardware counters of the Triton backward's kernels beside cuDNN's dense backward (Nsight Compute, issue 18).

    python bench/backward_counters.py profile [--shape wan1.3b-480p] [--cells mixed:0.1 band:0.1] [--variant V] [--out DIR]
    python bench/backward_counters.py summarize DIR/raw.csv [--order DIR/order.json]

``profile`` runs ``ncu`` (``--set full``, clocks left alone) over this script's ``run`` mode, which builds
the cells' tables, runs each backward once to compile it, then once more between ``cudaProfilerStart`` and
``Stop`` (cuDNN's dense backward first): only those kernels are profiled, a ``spin_kernel`` (``torch.cuda._sleep``)
between cells to tell them apart. From ncu's report (not kept: ~30 MB) it writes the raw page as ``DIR/raw.csv``, the
Triton dK/dV kernel's SASS with its stall samples per instruction (``DIR/dkdv-source.csv``, where ncu gives it),
and prints :func:`summarize`'s table: per kernel its time, SM clock, the tensor pipe's and the issue slots'
busy share, DRAM and shared-memory traffic, instructions, and the stall reasons that cost most. Device time:
about 2 minutes at Wan-1.3B 480p (every kernel replayed ~40 times).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it

SEPARATOR = "spin_kernel"  # torch.cuda._sleep's kernel: launched between cells
# (column label, ncu metric names in order of preference)
COLUMNS = (
    ("ms", ("gpu__time_duration.sum",)),
    ("GHz", ("smsp__cycles_elapsed.avg.per_second", "sm__cycles_elapsed.avg.per_second")),
    ("sm%", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("tensor%", ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
                 "re:^sm__pipe_tensor\\w*_cycles_active\\.avg\\.pct_of_peak_sustained_active$")),
    ("issue%", ("sm__inst_issued.avg.pct_of_peak_sustained_active", "smsp__issue_active.avg.pct_of_peak_sustained_active")),
    ("dram%", ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
    ("smem wavefronts M", ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",)),
    ("bank conflicts M", ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",)),
    ("inst M", ("smsp__inst_executed.sum", "sm__inst_executed.sum")),
    ("regs", ("launch__registers_per_thread",)),
    ("warps%", ("sm__warps_active.avg.pct_of_peak_sustained_active",)),
)
SCALE = {"ms": {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3,
                "second": 1e3},
         "GHz": {"Ghz": 1.0, "GHz": 1.0, "Mhz": 1e-3, "MHz": 1e-3, "hz": 1e-9, "cycle/nsecond": 1.0},
         "smem wavefronts M": {"": 1e-6}, "bank conflicts M": {"": 1e-6}, "inst M": {"inst": 1e-6, "": 1e-6}}  # fmt: skip
STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)_per_issue_active\.ratio$")


def number(text: str) -> float | None:
    """A raw-page value as a float (thousands separators dropped); None where it is not a number."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_raw(path) -> list[dict]:
    """The rows of ncu's raw page (``--page raw --csv``, gzipped or not): one dict per kernel, metric -> (value,
    unit)."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("==")]
    header, units, *rows = list(csv.reader(lines))
    return [{name: (value, unit) for name, unit, value in zip(header, units, row)} for row in rows if row]


def _pick(row: dict, label: str, names) -> float | None:
    """The first of ``names`` (``re:`` for a pattern) that ``row`` has a number for, in the column's unit."""
    for name in names:
        if name.startswith("re:"):
            name = next((n for n in sorted(row) if re.match(name[3:], n)), "")
        if name in row and (value := number(row[name][0])) is not None:
            return value * SCALE.get(label, {}).get(row[name][1], 1.0)
    return None


def stalls(row: dict, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` stall reasons of a kernel by cycles per issued instruction, largest first."""
    found = [(m.group(1), number(value)) for name, (value, _) in row.items() if (m := STALL.match(name))]
    return sorted(((reason, v) for reason, v in found if v), key=lambda item: -item[1])[:top]


def kernels(rows: list[dict], labels: list[str] | None = None) -> list[dict]:
    """Each profiled kernel (separators dropped) with its cell (``labels[i]`` for the i-th run between
    separators), short name, the :data:`COLUMNS` found and its top stalls."""
    out, cell = [], 0
    for row in rows:
        name = row.get("Kernel Name", ("?", ""))[0]
        if SEPARATOR in name:
            cell += 1
            continue
        picked = {label: _pick(row, label, names) for label, names in COLUMNS}
        label = labels[cell] if labels and cell < len(labels) else f"cell {cell}"
        out.append({"cell": label, "kernel": short_name(name), **picked, "stalls": stalls(row)})
    return out


def short_name(name: str) -> str:
    """A kernel's name without its template arguments and parameters, at most 64 characters."""
    name = re.sub(r"[<(].*$", "", name).strip()
    return name if len(name) <= 64 else name[:61] + "..."


def summarize(rows: list[dict], labels: list[str] | None = None) -> str:
    """A markdown table of :func:`kernels` of ncu's raw rows."""
    found = kernels(rows, labels)
    shown = [label for label, _ in COLUMNS if any(k[label] is not None for k in found)]
    lines = ["| cell | kernel | " + " | ".join(shown) + " | top stalls (cycles per issue) |",
             "|---|---|" + "---|" * len(shown) + "---|"]  # fmt: skip
    for k in found:
        values = ["-" if k[c] is None else f"{k[c]:.3g}" if abs(k[c]) < 100 else f"{k[c]:.0f}" for c in shown]
        said = ", ".join(f"{reason} {v:.2f}" for reason, v in k["stalls"])
        lines.append(f"| {k['cell']} | {k['kernel']} | " + " | ".join(values) + f" | {said} |")
    return "\n".join(lines)


def ncu_command(ncu: str, out: Path, argv: list[str]) -> list[str]:
    """The ncu command line profiling ``run`` with ``argv``, its report written to ``out/backward``."""
    return [ncu, "--profile-from-start", "off", "--clock-control", "none", "--set", "full", "--target-processes", "all",
            "--force-overwrite", "--export", str(out / "backward"), sys.executable, os.path.abspath(__file__), "run",
            *argv]  # fmt: skip


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("profile", "run"):
        m = sub.add_parser(mode)
        m.add_argument("--shape", default="wan1.3b-480p")
        m.add_argument("--cells", nargs="+", default=["mixed:0.1", "band:0.1"], help="kind:density")
        m.add_argument("--variant", default=None, help="the Triton backward's variant (backward.VARIANTS)")
        m.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/results"), "backward-counters"))
    s = sub.add_parser("summarize")
    s.add_argument("raw")
    s.add_argument("--order", default=None)
    args = p.parse_args(argv)
    for cell in getattr(args, "cells", []):
        kind, _, density = cell.partition(":")
        if not density or number(density) is None:
            p.error(f"a cell is kind:density, e.g. mixed:0.1 (got {cell!r})")
    if getattr(args, "variant", None):
        from sparse_vdit.kernels.triton.backward import VARIANTS

        if args.variant not in VARIANTS:
            p.error(f"unknown variant {args.variant!r}; known: {list(VARIANTS)}")
    return args


def run(args) -> list[str]:
    """Each cell's backward once to compile, then once under the profiler; the cells' labels in order."""
    import torch
    from common import SHAPES, sdpa_with, table_for
    from torch.nn.attention import SDPBackend

    from backward import backward_timer, input_sets, use_variant

    from sparse_vdit.kernels import sparse_attention

    use_variant(args.variant)

    shape, device = SHAPES[args.shape], torch.device("cuda")
    kv = shape.layout.kv_len
    dense = sdpa_with(SDPBackend.CUDNN_ATTENTION)
    attends = {"cudnn-dense": lambda q, k, v: dense(q, k[:, :kv], v[:, :kv])}
    for cell in args.cells:
        kind, _, density = cell.partition(":")
        table = table_for(kind, float(density), shape.layout, shape.heads, device)[0]
        attends[f"{kind} {table.density:.3f}"] = lambda q, k, v, table=table: sparse_attention(q, k, v, table,
                                                                                            backend="triton")
    (inputs,) = input_sets(shape, 1, 1, device, torch.bfloat16)
    prepared = {}
    for label, attend in attends.items():
        prepare, backward = backward_timer(attend)
        prepared[label] = (backward, prepare(*inputs))
        backward(*prepared[label][1])  # compiled and warm outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for i, (backward, args_) in enumerate(prepared.values()):
        if i:
            torch.cuda._sleep(1000)
        backward(*args_)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return list(prepared)


def profile(args) -> str:
    """ncu over :func:`run`; the report's raw page, the dK/dV kernel's source page and the summary in ``args.out``."""
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--shape", args.shape, "--cells", *args.cells, "--out", str(out)]
    argv += ["--variant", args.variant] if args.variant else []
    subprocess.run(ncu_command(str(ncu), out, argv), check=True)
    report = str(out / "backward.ncu-rep")
    with open(out / "raw.csv", "w") as f:
        subprocess.run([str(ncu), "--import", report, "--csv", "--page", "raw"], stdout=f, check=True)
    with open(out / "dkdv-source.csv", "w") as f:  # per-instruction stall samples; best effort
        subprocess.run([str(ncu), "--import", report, "--csv", "--page", "source", "--print-source", "sass",
                        "--kernel-name", "regex:dkdv"], stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    Path(report).unlink()  # ~30 MB: over what a lent GPU call brings back; the two pages keep what is read here
    labels = json.loads((out / "order.json").read_text())
    table = summarize(read_raw(out / "raw.csv"), labels)
    (out / "summary.md").write_text(table + "\n")
    return table


def main(argv=None) -> None:
    args = parse(argv)
    if args.mode == "run":
        labels = run(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "order.json").write_text(json.dumps(labels))
    elif args.mode == "profile":
        print(profile(args))
    else:
        labels = json.loads(Path(args.order).read_text()) if args.order else None
        print(summarize(read_raw(args.raw), labels))


if __name__ == "__main__":
    main()
