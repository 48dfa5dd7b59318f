"""Render the result files of bench/results/ as the tables of BENCHMARKS.md.

    python bench/report.py            # rewrites the generated sections of BENCHMARKS.md in place
    python bench/report.py --dry-run  # renders them and prints what it would write, writes nothing

Each generated section sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; the prose
around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
OUT_PATHS = r"/tmp/results|/root/out/\w+"  # the device's output folders, written $OUT in commands


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def attention(data: dict) -> str:
    v = data["versions"]
    out = [
        f"Device: {v['gpu']} (sm{v['sm'].replace('.', '')}, {v['sms']} SMs); torch {v['torch']}, cuDNN {v['cudnn']}, "
        f"triton {v['triton']}, flash-attn-4 {v['flash_attn_4']}; {data['dtype']}, batch {data['batch']}, "
        f"block {data['block']}; {'runs' if data.get('runs') else 'run'} took {data['wall_s']:.0f} s.",
        "",
    ]
    runs = data.get("runs") or []
    if runs:  # rows merged from several runs: each cell's efficiency is against its own run's cuDNN
        out += ["Runs (a cell marked `[n]` comes from run n; unmarked: run 2):", ""]
        out += [f"{r['run']}. `{r['command']}` ({r['wall_s']:.0f} s){': ' + r['note'] if r.get('note') else ''}"
                for r in runs]  # fmt: skip
        out.append("")
    out += ["Dense baselines (ms, TFLOP/s):", ""]
    mark = (lambda r: f" [{r['run']}]" if r.get("run", 2) != 2 else "") if runs else (lambda r: "")
    rows = data["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    dense = {(r["shape"], r["backend"]): r for r in rows if r["kind"] == "dense"}
    names = ["cudnn", "fa2", "fa4-dense", "flex-dense"]
    out.append(_table(["shape", "cuDNN SDPA", "FlashAttention-2 SDPA", "FA4 dense", "FlexAttention dense"], [
        [s] + [f"{dense[s, n]['ms']:.2f} ({dense[s, n]['tflops']:.0f})" if (s, n) in dense else "-" for n in names]
        for s in shapes
    ]))  # fmt: skip
    cells = defaultdict(dict)
    for r in rows:
        if r["kind"] not in ("dense", "all-dense"):
            cells[r["backend"], r["shape"], r["kind"]][r["target"]] = r
    full = {(r["backend"], r["shape"]): r for r in rows if r["kind"] == "all-dense"}
    for backend in dict.fromkeys(b for b, _, _ in cells):
        out += ["", f"`{backend}`: block efficiency (ms); last column: an all-dense table through the API / "
                    "the backend's own block path", ""]  # fmt: skip
        table_rows = []
        for (b, shape, kind), by_target in cells.items():
            if b != backend:
                continue
            row = [shape, kind]
            for t in TARGETS:
                r = by_target.get(t)
                row.append(f"{r['block_eff']:.2f} ({r['ms']:.2f}){mark(r)}" if r else "-")
            api, direct = full.get((backend, shape)), full.get((backend + "-direct", shape))
            first = kind == next(k for b2, s2, k in cells if b2 == backend and s2 == shape)
            row.append(f"{api['block_eff']:.2f} / {direct['block_eff']:.2f}" if first and api and direct else "")
            table_rows.append(row)
        out.append(_table(["shape", "table"] + [f"{t:.0%}" for t in TARGETS] + ["100%"], table_rows))
    return "\n".join(out)


def e2e(data: dict) -> str:
    run = data["runs"][-1]
    out = [
        f"Device: {run['device']}; torch {run['torch']}, diffusers {run['diffusers']}, triton {run['triton']}; "
        f"{run['date']}.",
        "",
    ]
    rows = [
        [r["model"], r["mode"], r["variant"], f"{r['density']:.1%}", f"{r['seconds'] * 1e3:.1f}",
         "" if r.get("attention_share") is None else f"{r['attention_share']:.0%}", f"{r['speedup_vs_unpatched']:.2f}",
         f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else ""]
        for r in data["results"] if not r.get("dry_run")
    ]  # fmt: skip
    out.append(_table(["model", "mode", "variant", "attention density", "forward ms", "attention share",
                       "x unpatched", "x best dense"], rows))  # fmt: skip
    return "\n".join(out)


def tables(data: dict) -> str:
    rows = [
        [r["model"], f"{r['layers']} x {r['heads']}", f"{r['tokens']:,}", f"{r['cold_s']:.3f}",
         f"{r['cached_s'] * 1e3:.2f}", f"{r['tables_mib']:.0f}"]
        for r in data["rows"]
    ]  # fmt: skip
    return f"Device: {data['device']}, torch {data['torch']}.\n\n" + _table(
        ["model", "layers x heads", "tokens", "cold s", "cached ms", "stored MiB"], rows
    )


def fidelity(data: dict) -> str:
    env = data["environment"]
    speed = "" if data["speedup_meaningful"] else " (CPU: speedups NOT meaningful)"
    out = [
        f"Device: {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}; {env['date']}. "
        f"{data['model']}, {data['videos']} videos x {data['steps']} steps, layout {data['layout']}, "
        f"block {data['block_size']}{' (dry run)' if data.get('dry_run') else ''}."
        + (f" Weights trained {w['total_steps']} steps ({w['total_videos_seen']} videos)."
           if (w := data.get("weights") or {}).get("total_steps") else ""),
        "",
    ]  # fmt: skip
    skips = any("skipped_heads" in r for r in data["rows"])  # the rows of plans say how many heads they skip
    rows = [
        [r["method"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['density']:.1%}", f"{r['flop_reduction']:.2f}",
         f"{r['attention_speedup']:.2f}", f"{r['speedup']:.2f}",
         f"{r['search_cost_vs_dense']:.1f}" if "search_cost_vs_dense" in r else "",
         *([str(r["skipped_heads"]) if "skipped_heads" in r else ""] if skips else [])]
        for r in data["rows"]
    ]  # fmt: skip
    out.append(_table(["method", "PSNR dB", "SSIM", "attention density", "FLOP reduction",
                       f"attention speedup{speed}", f"generation speedup{speed}",
                       "search cost (x one dense generation)", *(["skipped heads"] if skips else [])], rows))  # fmt: skip
    if data.get("not_run"):
        out += ["", f"Not run (past the time budget): {', '.join(data['not_run'])}."]
    return "\n".join(out)


def svg(data: dict) -> str:
    v = data["versions"]
    dense = {r["shape"]: r["ms"] for r in data["rows"] if r["part"] == "cudnn-dense"}
    fast = {r["shape"]: r["backend"] for r in data["rows"] if r["part"] == "attn-fast"}
    out = [
        f"Device: {v['gpu']}; torch {v['torch']}, triton {v['triton']}, flash-attn-4 {v['flash_attn_4'] or 'not installed'}. "
        f"Command: `{re.sub(OUT_PATHS, '$OUT', data['command'])}` ({data['wall_s']:.0f} s). Fast path: "
        + ", ".join(f"{s} `{b}`" for s, b in fast.items()) + ".",
        "",
    ]
    sweep = any(r.get("programs_per_sm") not in (None, 4) or r.get("tiles") not in (None, "default")
                for r in data["summary"])  # a launch-shape sweep: say which shape each line is
    launch = (lambda r: [str(r.get("tiles") or "-"), str(r.get("programs_per_sm") or "-")]) if sweep else (lambda r: [])
    queued = all(r.get("profile_queued_ms") is not None for r in data["summary"])
    rows = [
        [r["shape"], f"{r['density']:.2f}", str(r["rows"]), r["profile_backend"], *launch(r), f"{dense[r['shape']]:.1f}",
         f"{r['attn_fast_ms']:.2f}", f"{r['profile_ms']:.2f}", f"{r['profile_share']:.1%}",
         *([f"{r['profile_queued_ms']:.2f} ({r['profile_queued_share']:.1%})"] if queued else []), f"{r['layer_overhead']:.1%}",
         f"{r['flex_over_fast']:.2f}", f"{r['layer_flex_over_fast']:.2f}", f"{r['speedup_vs_cudnn']:.2f}"]
        for r in data["summary"]
    ]  # fmt: skip
    out.append(_table(["shape", "density", "rows", "profiling", *(["tiles", "programs / SM"] if sweep else []),
                       "cuDNN dense ms", "SVG attention ms",
                       "profile ms", "profile / attention", *(["profile queued ms (/ attention)"] if queued else []),
                       "(layer - attention) / attention", "flex / fast (attention)",
                       "flex / fast (layer)", "layer x cuDNN dense"], rows))  # fmt: skip
    return "\n".join(out)


def variants(data: dict) -> str:
    """bench/kernel_variants.py results: one line per table, a column per variant."""
    out = ["Runs:", ""]
    out += [f"{r['run']}. `{r['command']}` ({r['device']}, torch {r['torch']}, triton {r['triton']}, {r['seconds']:.0f} s)"
            f"{': ' + r['note'] if r.get('note') else ''}" for r in data["runs"]]  # fmt: skip
    for part, value, what in (("attention", "efficiency", "block efficiency against dense cuDNN SDPA (ms)"),
                              ("profile", "ms", "ms of one fused sampled-row call (64 rows, Wan-14B 720p)")):  # fmt: skip
        rows = [r for r in data["rows"] if r["part"] == part and value in r]
        if not rows:
            continue
        names = list(dict.fromkeys(r["variant"] for r in rows))
        cells: dict = defaultdict(dict)
        for r in rows:
            cell = f"{r[value]:.2f} ({r['ms']:.2f})" if value == "efficiency" else f"{r['ms']:.3f}"
            cells[r["shape"], r.get("kind", "svg bands"), r["density"], r["run"]][r["variant"]] = cell
        out += ["", f"{part}: {what}, run in brackets", ""]
        out.append(_table(["shape", "table", "density", "run"] + names, [
            [shape, kind, f"{density:.3f}", run] + [got.get(n, "-") for n in names]
            for (shape, kind, density, run), got in cells.items()
        ]))  # fmt: skip
    return "\n".join(out)


def oracle(data: dict) -> str:
    """bench/oracle.py results: best block masks at each density, and the search's candidates."""
    out = [f"Command: `{data['command']}` (CPU, {data['wall_s']:.0f} s); organism {data['layout']}, "
           f"{data['heads']} heads (layers x heads), {data['calls']} scored calls; captions: {'; '.join(data['captions'])}.", ""]  # fmt: skip
    blocks = sorted({r["block"] for r in data["rows"]})
    header = ["mask"] + [f"block {b}: density, mean / worst rel. MSE, heads < 6e-4" for b in blocks]
    keyed = defaultdict(dict)
    for r in data["rows"]:
        label = r["setting"] if r["kind"] == "candidate" else f"{r['kind']} {r['setting']:.0%}"
        keyed[label][r["block"]] = (f"{r['density']:.0%}, {r['mean_rel_mse']:.1e} / {r['max_rel_mse']:.1e}, "
                                    f"{r['heads_under_6e-4']}")  # fmt: skip
    order = sorted(keyed, key=lambda k: (not k.startswith(("per-call", "static")), k))
    out.append(_table(header, [[k] + [keyed[k].get(b, "-") for b in blocks] for k in order]))
    return "\n".join(out)


# section -> (result file, renderer)
SECTIONS = {
    "attention": ("attention", attention), "e2e": ("e2e", e2e), "tables": ("tables", tables),
    "fidelity": ("fidelity", fidelity), "svg": ("svg", svg), "svg-h200": ("svg-h200", svg),
    "variants": ("kernel-variants-h200-final", variants), "variants-first": ("kernel-variants-h200", variants),
    "oracle": ("oracle", oracle),
}


def render(text: str) -> tuple[str, list[str]]:
    """``text`` (BENCHMARKS.md) with every section whose result file exists rendered; and their names."""
    done = []
    for name, (result, render) in SECTIONS.items():
        source = RESULTS / f"{result}.json"
        if not source.exists():
            continue
        body = render(json.loads(source.read_text()))
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"BENCHMARKS.md has no <!-- {name}:begin --> ... <!-- {name}:end --> section")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        done.append(name)
    return text, done


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="render every section, write nothing")
    args = p.parse_args(argv)
    path = ROOT / "BENCHMARKS.md"
    text, done = render(path.read_text())
    if args.dry_run:
        print(f"would rewrite {len(done)} sections of {path}: {', '.join(done)}")
    else:
        path.write_text(text)
    return done


if __name__ == "__main__":
    main()
