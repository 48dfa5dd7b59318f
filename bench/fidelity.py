"""Fidelity benchmark: how close each method's videos stay to dense on the organism, at what cost.

    python bench/fidelity.py                     # shipped organism, 8 captions x 2 seeds = 16 videos
    python bench/fidelity.py --plans a.json b.json --epsilons ""    # offline plans loaded, not searched
    python bench/fidelity.py --quick             # tiny random organism on the CPU (results to a temp file)

Methods (every one through the diffusers integration on the same captions x seeds):

- ``dense``: every head dense (our dense path; the reference the others are scored against);
- ``offline-eps=E``: Sparse-vDiT search (``sparse_vdit.search``, our default setting) at each
  ``--epsilons`` value, run on held-out captions (``--search-captions``), or ``--plans`` files;
- ``svg-NN``: Sparse VideoGen online at each ``--svg-densities`` (25% dense warm-up, first layer dense);
- ``window-spatial-W``: every head ``diagonal(W frames)``; ``window-temporal-W``: every head
  ``multi_diagonal(W)`` (share of the token-major sequence); both after ``--warmup-steps`` dense steps;
- ``skip-only``: the search with ``skip`` as its only candidate (heads dense or skipped);
- ``offline-paper`` (``--paper``): the search in the paper's setting (``mode="paper"``: one caption,
  one seed, absolute MSE, full outputs, the four fixed modes, block-count cost, epsilon 1, lambda 0.5).

``--save-plans DIR`` writes every searched plan there (``<method>.json``); the rows carry each
search's wall time and its cost per video against one dense generation (``search_cost_vs_dense``).

Per method: PSNR and SSIM against dense (mean over videos), attention FLOP density (computed share
of blocks over all steps, warm-up included), measured attention speedup (dense attention time /
the method's, SVG profiling included) and generation speedup. Speedups are meaningful on a GPU
only; on the CPU sparse layers run the plain-torch reference kernel (``speedup_meaningful``: false).
Writes ``--out`` (JSON), a Pareto plot (``--plot``: PSNR vs speedup and vs density) and prints the
table (``python bench/report.py`` puts it in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/report.py renders the table
try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(HERE.parent / "src"))

from report import fidelity as render_table  # noqa: E402

from sparse_vdit import Plan  # noqa: E402
from sparse_vdit.compare import Method, layout_of, run_method, score, search_plan  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.patterns import diagonal, multi_diagonal  # noqa: E402

EVAL_DATA_SEED, SEARCH_DATA_SEED = 777, 4242  # evaluation captions and (held-out) search captions
FAMILIES = ("dense", "offline", "offline-paper", "svg", "window-spatial", "window-temporal", "skip-only")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                   help="tiny random organism on the CPU, 2 videos, 3 steps, one setting per family")  # fmt: skip
    p.add_argument("--weights", type=Path, help="organism weights folder (default: the shipped ones)")
    p.add_argument("--random-weights", action="store_true", help="untrained full-size organism (to try the script)")
    p.add_argument("--captions", type=int, default=8, help="evaluation captions (scenes of data seed 777)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epsilons", type=floats, default=floats("0.0003,0.001,0.003,0.01,0.03"),
                   help="offline search epsilons (relative MSE per head)")
    p.add_argument("--lam", default="epsilon",
                   help="the search's lambda: a number, or 'epsilon' (default: lambda = epsilon, so a head goes "
                        "sparse when its relative error is under epsilon x the share of cost it saves)")
    p.add_argument("--search-captions", type=int, default=4, help="held-out captions the search runs on")
    p.add_argument("--search-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--plans", type=Path, nargs="*", default=[], help="offline plan files, evaluated as they are")
    p.add_argument("--svg-densities", type=floats, default=floats("0.6,0.4,0.25"))
    p.add_argument("--spatial-widths", type=floats, default=floats("4,2,1"), help="window-spatial, frames")
    p.add_argument("--temporal-widths", type=floats, default=floats("0.4,0.2,0.1"),
                   help="window-temporal, share of the token-major sequence")  # fmt: skip
    p.add_argument("--no-skip-only", action="store_true")
    p.add_argument("--search-cost", default="blocks",
                   help="cost in the search's loss: blocks (default: at the organism's 2,048 tokens kernels are "
                        "launch-bound, so measured times say nothing), auto, or a cost table JSON")  # fmt: skip
    p.add_argument("--paper", action="store_true", help="add the search in the paper's setting (offline-paper)")
    p.add_argument("--save-plans", type=Path, help="folder for the searched plans (<method>.json)")
    p.add_argument("--warmup-steps", type=int, help="dense steps of the window baselines (default: 10%% of the steps)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--backend", default="auto", help="sparse kernel: auto, fa4, triton, flex, reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="JSON (default bench/results/fidelity.json; a temp file with --quick)")
    p.add_argument("--plot", type=Path, help="Pareto PNG (default: beside --out, .png)")
    args = p.parse_args(argv)
    if args.quick:
        args.captions, args.seeds, args.steps, args.search_captions = 2, [0], 3, 2
        def middle(xs: list, n: int) -> list:  # defaults shrink to their middle; short lists stay
            return xs[1 : 1 + n] if len(xs) > n + 1 else xs

        args.epsilons, args.svg_densities = middle(args.epsilons, 2), middle(args.svg_densities, 1)
        args.spatial_widths, args.temporal_widths = middle(args.spatial_widths, 1), middle(args.temporal_widths, 1)
        args.block_size, args.random_weights = 16, True
        args.out = args.out or Path(tempfile.mkdtemp(prefix="fidelity-")) / "fidelity.json"
    args.out = args.out or HERE / "results" / "fidelity.json"
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def load_model(args):
    """(transformer, spec, description)."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.quick:
        spec = M.OrganismSpec(frames=4, height=32, width=32)
        config = M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
        model, what = M.build_organism(config), "tiny random organism (--quick)"
    elif args.random_weights:
        spec = M.OrganismSpec()
        model, what = M.build_organism(M.organism_config(spec)), "random organism (untrained)"
    else:
        path = args.weights or M.WEIGHTS_DIR
        try:
            return M.load_organism(path, args.device, dtype), M.load_spec(path), f"organism weights {path}"
        except FileNotFoundError as err:
            raise SystemExit(f"bench/fidelity.py: {err} (or --random-weights / --quick to try the script)") from None
    return M.to_dtype(model, dtype).to(args.device).eval(), spec, what


def methods(args, transformer, spec) -> list[Method]:
    """Every method of the run, dense first; offline plans are searched here."""
    steps, block = args.steps, args.block_size
    warmup = round(0.1 * steps) if args.warmup_steps is None else args.warmup_steps
    search_captions = [D.sample_scene(SEARCH_DATA_SEED, i).caption for i in range(args.search_captions)]
    search = dict(steps=steps, seeds=args.search_seeds, block_size=block, backend=args.backend, progress=True,
                  cost=args.search_cost)  # fmt: skip
    out = [Method("dense", "dense", note="dense")]

    def searched(name: str, family: str, captions=search_captions, **settings) -> Method:
        print(f"searching {name} ...", flush=True)
        plan = search_plan(transformer, spec, captions, time_dense=True, **{**search, **settings})
        if args.save_plans:
            args.save_plans.mkdir(parents=True, exist_ok=True)
            plan.save(args.save_plans / f"{name}.json")
        stats = plan.made_by["stats"]
        runs = len(stats["run_seconds"])  # search cost per video against one dense generation of it
        info = {"search_seconds": stats["search_seconds"], "search_runs": runs,
                "search_cost_vs_dense": stats["search_seconds"] / runs / stats["dense_seconds"]}  # fmt: skip
        return Method(name, "plan", plan, note=family, info=info)

    for eps in args.epsilons:
        lam = eps if args.lam == "epsilon" else float(args.lam)
        out.append(searched(f"offline-eps={eps:g}", "offline", epsilon=eps, lam=lam))
    if args.paper:
        out.append(searched("offline-paper", "offline-paper", search_captions[:1], mode="paper",
                            seeds=args.search_seeds[:1]))  # fmt: skip
    for path in args.plans:
        out.append(Method(f"offline-{path.stem}", "plan", Plan.load(path, transformer), note="offline"))
    for d in args.svg_densities:
        out.append(Method(f"svg-{round(d * 100):02d}", "svg", svg={"density": d}, note="svg"))
    for family, make, widths in (("window-spatial", diagonal, args.spatial_widths),
                                 ("window-temporal", multi_diagonal, args.temporal_widths)):  # fmt: skip
        for w in widths:
            plan = Plan.uniform(transformer, make(w), warmup_steps=warmup, block_size=block)
            out.append(Method(f"{family}-{w:g}", "plan", plan, note=family))
    if not args.no_skip_only:
        out.append(searched("skip-only", "skip-only", candidates=["skip"]))
    return out


def environment(args) -> dict:
    import diffusers

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    return {"device": gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def pareto_plot(data: dict, path: Path) -> Path:
    """PSNR against measured attention speedup and against attention density, one colour per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["family"] != "dense"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    meaningful = data["speedup_meaningful"]
    for family in FAMILIES[1:]:
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        for ax, key in zip(axes, ("attention_speedup", "density")):
            pts = sorted(pts, key=lambda r: r[key])
            ax.plot([r[key] for r in pts], [min(r["psnr"], 99.0) for r in pts], "o-", label=family, alpha=0.85)
    axes[0].set_xlabel("measured attention speedup vs dense" + ("" if meaningful else " (CPU: NOT meaningful)"))
    axes[1].set_xlabel("attention FLOP density (share of dense)")
    axes[1].invert_xaxis()
    for ax in axes:
        ax.set_ylabel("PSNR vs dense (dB; identical = 99)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: {data['videos']} videos, {data['steps']} steps; {data['environment']['device']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    transformer, spec, what = load_model(args)
    videos = [(D.sample_scene(EVAL_DATA_SEED, i).caption, s) for i in range(args.captions) for s in args.seeds]
    print(f"{what}; {len(videos)} videos, {args.steps} steps, layout {layout_of(spec).describe()}, "
          f"block {args.block_size}, {args.device}", flush=True)  # fmt: skip
    todo = methods(args, transformer, spec)
    run = dict(steps=args.steps, spec=spec, backend=args.backend, block_size=args.block_size)
    if args.device.startswith("cuda"):  # compile kernels before anything is timed
        for m in todo:
            run_method(transformer, m, videos[:1], **{**run, "steps": 2}, progress=False)
    runs = [run_method(transformer, m, videos, **run) for m in todo]
    dense = runs[0]
    rows = []
    for r in runs:
        s = score(r, dense)
        rows.append({"method": r.method.name, "family": r.method.note, "psnr": s["psnr"], "ssim": s["ssim"],
                     "density": r.density, "flop_reduction": 1 / r.density if r.density else float("inf"),
                     "attention_speedup": dense.attention_seconds / r.attention_seconds,
                     "speedup": dense.seconds / r.seconds, "seconds": r.seconds,
                     "attention_seconds": r.attention_seconds, "psnr_per_video": s["psnr_per_video"],
                     "ssim_per_video": s["ssim_per_video"], **r.method.info})  # fmt: skip
    data = {"model": what, "videos": len(videos), "steps": args.steps, "block_size": args.block_size,
            "layout": layout_of(spec).describe(), "backend": args.backend, "dry_run": args.quick,
            "speedup_meaningful": args.device.startswith("cuda"), "environment": environment(args),
            "captions": sorted({c for c, _ in videos}), "seeds": args.seeds,
            "command": "python bench/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": time.perf_counter() - started, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2, default=float) + "\n")
    pareto_plot(data, args.plot)
    print(f"\nwrote {args.out} and {args.plot}\n")
    print(render_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
