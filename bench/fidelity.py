"""Fidelity benchmark: how close each method's videos stay to dense on the organism, at what cost.

    python bench/fidelity.py                     # shipped organism, 8 captions x 2 seeds = 16 videos
    python bench/fidelity.py --plans a.json b.json --epsilons ""    # offline plans loaded, not searched
    python bench/fidelity.py --quick             # tiny random organism on the CPU (results to a temp file)
    python bench/fidelity.py --model fidelity    # the 9,216-token fidelity organism (block 128; a GPU run)

Methods (every one through the diffusers integration on the same captions x seeds):

- ``dense``: every head dense (our dense path; the reference the others are scored against);
- ``offline-eps=E``: Sparse-vDiT search (``sparse_vdit.search``, our default setting) at each
  ``--epsilons`` value, run on held-out captions (``--search-captions``), or ``--plans`` files;
- ``svg-NN``: Sparse VideoGen online at each ``--svg-densities``, as its authors' code runs it
  (``mode="reference"``: their widths, sink, profile masks, row sampling, warm-up);
  ``svg-NN-V`` (``--svg-variants``): the same with one difference, ``V`` either ``ours`` (the mode
  this package ran before) or one named option ``name=value`` of :class:`~sparse_vdit.methods.svg.SVG`
  (e.g. ``profile_masks=executed``), so each choice's cost in fidelity is a row of its own;
- ``window-spatial-W``: every head ``diagonal(W frames)``; ``window-temporal-W``: every head
  ``multi_diagonal(W)`` (share of the token-major sequence); both after ``--warmup-steps`` dense steps;
- ``offline-out-eps=E`` (``--output-epsilons``): the search scoring each head's error through the
  layer's output projection, relative to the layer's mean head (``error="output"``), so a head
  whose contribution is small can be skipped; each row says how many heads its plan skips;
- ``skip-only``: the search with ``skip`` as its only candidate (heads dense or skipped);
- ``oracle-static-NN`` / ``oracle-per-call-NN`` (``--oracle-densities``): the best block masks at
  that share of key blocks per query block (:mod:`sparse_vdit.methods.oracle`), after the same
  dense warm-up as the windows: one mask per (layer, head) from the attention mass of dense
  generations of the search captions, or each call's own top blocks. Upper bounds, not methods:
  the per-call oracle computes the full attention scores to decide (its time means nothing);
- ``top-p-P`` (``--online-ps``): online top-p block selection from mean-pooled q/k
  (:class:`sparse_vdit.methods.online.TopP`: each query block keeps the key blocks holding share P
  of the pooled mass, its own block and text always, between ``--online-min-density`` and
  ``--online-max-density`` of the key blocks), after the windows' dense warm-up, recomputed every
  ``--online-every`` steps; ``top-k-NN`` (``--topk-densities``): the same rule with min = max = NN%
  of the key blocks (a fixed budget, for comparison at equal density); ``top-k-NN-gG``
  (``--topk-key-groups``, default 2): the same top-k on aligned groups of G key blocks (summed
  mass; kept blocks in runs, cheaper for the Triton kernel); ``top-p-P-clustered``
  (``--cluster-ps``): top-p after SVG2-style k-means of each (sample, head)'s queries and keys
  (``--cluster-iters`` rounds, centroids kept between steps; :mod:`sparse_vdit.methods.cluster`);
- ``hybrid-eps=E-p=P`` (``--hybrid-epsilons`` x ``--hybrid-ps``): the offline plan of epsilon E with
  its sparse (stable) heads as planned and its dense heads selected online by top-p P
  (:class:`sparse_vdit.methods.online.Hybrid`; the plan's warm-up); ``hybrid-eps=E-k=NN``
  (``--hybrid-densities``): the same with the online heads at a fixed NN% of the key blocks (top-k);
- ``offline-paper`` (``--paper``): the search in the paper's setting (``mode="paper"``: one caption,
  one seed, absolute MSE, full outputs, the four fixed modes, block-count cost, epsilon 1, lambda 0.5).

``--save-plans DIR`` writes every searched plan there (``<method>.json``); the rows carry each
search's wall time and its cost per video against one dense generation (``search_cost_vs_dense``).

Per method: PSNR and SSIM against dense (mean over videos), attention FLOP density (computed share
of blocks over all steps, warm-up included), measured attention speedup (dense attention time /
the method's, SVG profiling included) and generation speedup. Speedups are meaningful on a GPU
only; on the CPU sparse layers run the plain-torch reference kernel (``speedup_meaningful``: false).
Writes ``--out`` (JSON, rewritten after every method, so a run cut short keeps what it measured;
methods not started within ``--budget-s`` are listed under ``not_run``), a Pareto plot (``--plot``:
PSNR and SSIM vs density, PSNR vs speedup) and ``--out`` with ``.md`` (the table, printed too;
``python bench/report.py`` puts it in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/report.py renders the table
try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(HERE.parent / "src"))

from common import environment  # noqa: E402
from report import fidelity as render_table  # noqa: E402

from sparse_vdit import Plan  # noqa: E402
from sparse_vdit.compare import Method, layout_of, oracle_mass, run_method, score, search_plan  # noqa: E402
from sparse_vdit.methods.online import Hybrid, TopP  # noqa: E402
from sparse_vdit.methods.oracle import PerCallOracle, StaticOracle  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.patterns import diagonal, multi_diagonal  # noqa: E402

EVAL_DATA_SEED, SEARCH_DATA_SEED = 777, 4242  # evaluation captions and (held-out) search captions
FAMILIES = ("dense", "offline", "offline-out", "offline-paper", "svg", "window-spatial", "window-temporal",
            "skip-only", "online-top-p", "online-top-k", "online-clustered", "hybrid", "oracle-static", "oracle-per-call")  # fmt: skip
MODELS = M.MODELS


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def svg_variant(text: str) -> tuple[str, dict]:
    """``--svg-variants`` item -> (row label, SVG options): ``ours`` or one ``NAME=VALUE`` of :data:`svg.CHOICES`."""
    from sparse_vdit.methods.svg import CHOICES, MODES

    if text in MODES:
        return text, {"mode": text}
    name, _, value = text.partition("=")
    if name == "sink" and value.lower() in ("true", "false"):
        return text, {"sink": value.lower() == "true"}
    if name not in CHOICES or value not in CHOICES[name]:
        options = ", ".join(f"{n}={'|'.join(v)}" for n, v in CHOICES.items()) + ", sink=true|false"
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(MODES)} or {options}")
    return text, {name: value}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                   help="tiny random organism on the CPU, 2 videos, 3 steps, one setting per family")  # fmt: skip
    p.add_argument("--model", choices=tuple(MODELS), default="small",
                   help="shipped organism: small (8 x 16 x 16 tokens, the default) or fidelity (12 x 24 x 32, block 128)")
    p.add_argument("--weights", type=Path, help="organism weights folder (default: --model's)")
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
    p.add_argument("--svg-variants", nargs="*", default=[], type=svg_variant,
                   help="extra SVG rows at each density: 'ours' (mode) or one option NAME=VALUE, "
                        "e.g. profile_masks=executed row_sampling=stratified widths=fitted sink=false")  # fmt: skip
    p.add_argument("--spatial-widths", type=floats, default=floats("4,2,1"), help="window-spatial, frames")
    p.add_argument("--temporal-widths", type=floats, default=floats("0.4,0.2,0.1"),
                   help="window-temporal, share of the token-major sequence")  # fmt: skip
    p.add_argument("--output-epsilons", type=floats, default=floats(""),
                   help="offline searches with error='output' (heads may be skipped), lambda as --lam")
    p.add_argument("--no-skip-only", action="store_true")
    p.add_argument("--online-ps", type=floats, default=floats("0.95,0.9,0.8"), help="online top-p rows (mass shares)")
    p.add_argument("--topk-densities", type=floats, default=floats("0.25"),
                   help="online top-k rows (the top-p rule with a fixed budget: shares of the key blocks)")
    p.add_argument("--topk-key-groups", type=lambda t: [int(g) for g in t.split(",") if g.strip()], default=[2],
                   help="top-k-NN-gG rows: the top-k rule on aligned groups of G key blocks (TopP key_group)")
    p.add_argument("--online-min-density", type=float, default=0.05, help="top-p budget: fewest key blocks (share)")
    p.add_argument("--online-max-density", type=float, default=0.5, help="top-p budget: most key blocks (share)")
    p.add_argument("--online-every", type=int, default=1, help="top-p: recompute the tables every this many steps")
    p.add_argument("--cluster-ps", type=floats, default=floats("0.9"), help="clustered top-p rows (mass shares)")
    p.add_argument("--cluster-iters", type=int, default=2, help="k-means rounds of the clustered rows")
    p.add_argument("--hybrid-epsilons", type=floats, default=None,
                   help="offline plans (search epsilons) of the hybrid rows (default: --epsilons)")
    p.add_argument("--hybrid-ps", type=floats, default=floats("0.9"), help="top-p of the hybrid's online heads")
    p.add_argument("--hybrid-densities", type=floats, default=floats(""),
                   help="hybrid rows whose online heads keep this share of key blocks (top-k)")
    p.add_argument("--oracle-densities", type=floats, default=floats("0.5,0.25"),
                   help="static and per-call oracle masks at these shares of key blocks (empty: none)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no method after this many seconds (the rest are listed under not_run)")
    p.add_argument("--search-cost", default="blocks",
                   help="cost in the search's loss: blocks (default: at the organism's 2,048 tokens kernels are "
                        "launch-bound, so measured times say nothing), auto, or a cost table JSON")  # fmt: skip
    p.add_argument("--paper", action="store_true", help="add the search in the paper's setting (offline-paper)")
    p.add_argument("--save-plans", type=Path, help="folder for the searched plans (<method>.json)")
    p.add_argument("--warmup-steps", type=int, help="dense steps of the window baselines (default: 10%% of the steps)")
    p.add_argument("--block-size", type=int, help="table block (default 64; 128 with --model fidelity)")
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
        args.output_epsilons, args.oracle_densities = args.output_epsilons[:1], args.oracle_densities[:1]
        args.online_ps, args.topk_densities = middle(args.online_ps, 1), args.topk_densities[:1]
        args.topk_key_groups = args.topk_key_groups[:1]
        args.hybrid_ps, args.cluster_ps = args.hybrid_ps[:1], args.cluster_ps[:1]
        args.hybrid_densities = args.hybrid_densities[:1]
        args.hybrid_epsilons = (args.epsilons if args.hybrid_epsilons is None else args.hybrid_epsilons)[:1]
        args.block_size, args.random_weights = 16, True
        args.out = args.out or Path(tempfile.mkdtemp(prefix="fidelity-")) / "fidelity.json"
    args.hybrid_epsilons = args.epsilons if args.hybrid_epsilons is None else args.hybrid_epsilons
    args.block_size = args.block_size or (128 if args.model == "fidelity" else 64)
    args.out = args.out or HERE / "results" / ("fidelity.json" if args.model == "small" else f"fidelity-{args.model}.json")
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
        spec, shape = (M.FIDELITY_SPEC, M.FIDELITY_MODEL) if args.model == "fidelity" else (M.OrganismSpec(), {})
        model, what = M.build_organism(M.organism_config(spec, **shape)), f"random {args.model} organism (untrained)"
    else:
        path = args.weights or MODELS[args.model]
        try:
            return M.load_organism(path, args.device, dtype), M.load_spec(path), f"organism weights {path}"
        except FileNotFoundError as err:
            raise SystemExit(f"bench/fidelity.py: {err} (or --random-weights / --quick to try the script)") from None
    return M.to_dtype(model, dtype).to(args.device).eval(), spec, what


def scene_captions(seed: int, count: int, spec) -> list[str]:
    """Captions of scenes ``0..count-1`` of data seed ``seed`` at the organism's frames and aspect."""
    return [D.sample_scene(seed, i, spec.frames, spec.width / spec.height).caption for i in range(count)]


def methods(args, transformer, spec) -> list[tuple[str, str, Callable[[], Method]]]:
    """``(name, family, build)`` of every method of the run, dense first; ``build()`` searches or
    calibrates when the method's turn comes (so a time budget can stop before a costly search)."""
    steps, block = args.steps, args.block_size
    warmup = round(0.1 * steps) if args.warmup_steps is None else args.warmup_steps
    search_captions = scene_captions(SEARCH_DATA_SEED, args.search_captions, spec)
    search = dict(steps=steps, seeds=args.search_seeds, block_size=block, backend=args.backend, progress=True,
                  cost=args.search_cost)  # fmt: skip
    out = [("dense", "dense", lambda: Method("dense", "dense", note="dense"))]
    plans: dict[str, Plan] = {}  # searched plans by method name (the hybrid rows reuse them)

    def searched(name: str, family: str, captions=search_captions, **settings):
        def build() -> Method:
            print(f"searching {name} ...", flush=True)
            plan = plans[name] = search_plan(transformer, spec, captions, time_dense=True, **{**search, **settings})
            if args.save_plans:
                args.save_plans.mkdir(parents=True, exist_ok=True)
                plan.save(args.save_plans / f"{name}.json")
            stats = plan.made_by["stats"]
            runs = len(stats["run_seconds"])  # search cost per video against one dense generation of it
            info = {"search_seconds": stats["search_seconds"], "search_runs": runs,
                    "search_cost_vs_dense": stats["search_seconds"] / runs / stats["dense_seconds"]}  # fmt: skip
            return Method(name, "plan", plan, note=family, info=info)

        return name, family, build

    def fixed(name: str, family: str, **fields):
        return name, family, lambda: Method(name, note=family, **fields)

    for eps in args.epsilons:
        lam = eps if args.lam == "epsilon" else float(args.lam)
        out.append(searched(f"offline-eps={eps:g}", "offline", epsilon=eps, lam=lam))
    for eps in args.output_epsilons:
        lam = eps if args.lam == "epsilon" else float(args.lam)
        out.append(searched(f"offline-out-eps={eps:g}", "offline-out", epsilon=eps, lam=lam, error="output"))
    if args.paper:
        out.append(searched("offline-paper", "offline-paper", search_captions[:1], mode="paper",
                            seeds=args.search_seeds[:1]))  # fmt: skip
    for path in args.plans:
        out.append(fixed(f"offline-{path.stem}", "offline", kind="plan", plan=Plan.load(path, transformer)))
    for d in args.svg_densities:
        for label, options in [("", {}), *args.svg_variants]:
            svg = {"density": d, **options}
            name = f"svg-{round(d * 100):02d}" + (f"-{label}" if label else "")
            out.append(fixed(name, "svg", kind="svg", svg=svg, info={"svg_options": svg}))
    for family, make, widths in (("window-spatial", diagonal, args.spatial_widths),
                                 ("window-temporal", multi_diagonal, args.temporal_widths)):  # fmt: skip
        for w in widths:
            plan = Plan.uniform(transformer, make(w), warmup_steps=warmup, block_size=block)
            out.append(fixed(f"{family}-{w:g}", family, kind="plan", plan=plan))
    online = dict(min_density=args.online_min_density, max_density=args.online_max_density, every=args.online_every,
                  block_size=block)  # fmt: skip
    for p_ in args.online_ps:
        out.append(fixed(f"top-p-{p_:g}", "online-top-p", kind="source", info={"p": p_, **online},
                         source=lambda p_=p_: TopP(p_, warmup_steps=warmup, **online)))  # fmt: skip
    for d in args.topk_densities:
        topk = {**online, "min_density": d, "max_density": d}
        out.append(fixed(f"top-k-{round(d * 100):02d}", "online-top-k", kind="source", info={"p": 1.0, **topk},
                         source=lambda topk=topk: TopP(1.0, warmup_steps=warmup, **topk)))  # fmt: skip
        for g in args.topk_key_groups:  # the rule on aligned groups of g key blocks (runs for the kernel)
            grouped = {**topk, "key_group": g}
            out.append(fixed(f"top-k-{round(d * 100):02d}-g{g}", "online-top-k", kind="source",
                             info={"p": 1.0, **grouped},
                             source=lambda grouped=grouped: TopP(1.0, warmup_steps=warmup, **grouped)))  # fmt: skip

    for p_ in args.cluster_ps:
        clustered = {**online, "cluster_iters": args.cluster_iters}
        out.append(fixed(f"top-p-{p_:g}-clustered", "online-clustered", kind="source", info={"p": p_, **clustered},
                         source=lambda p_=p_: TopP(p_, warmup_steps=warmup, **clustered)))  # fmt: skip

    def hybrid(name: str, eps: float, p_: float, settings: dict) -> Method:
        plan_name = f"offline-eps={eps:g}"
        if plan_name not in plans:  # its offline row did not run first: search now
            lam = eps if args.lam == "epsilon" else float(args.lam)
            searched(plan_name, "offline", epsilon=eps, lam=lam)[2]()
        plan = plans[plan_name]
        info = {"p": p_, "epsilon": eps, **settings, "plan_density": plan.density(layout_of(spec), steps)}
        return Method(name, "source", source=lambda: Hybrid(plan, TopP(p_, **settings)), note="hybrid", info=info)

    for eps in args.hybrid_epsilons:
        for p_ in args.hybrid_ps:
            name = f"hybrid-eps={eps:g}-p={p_:g}"
            out.append((name, "hybrid", lambda name=name, eps=eps, p_=p_: hybrid(name, eps, p_, online)))
        for d in args.hybrid_densities:
            name, topk = f"hybrid-eps={eps:g}-k={round(d * 100):02d}", {**online, "min_density": d, "max_density": d}
            out.append((name, "hybrid", lambda name=name, eps=eps, topk=topk: hybrid(name, eps, 1.0, topk)))
    calibration: dict = {}

    def static_mass() -> dict:  # dense generations of the search captions, once for every density
        if not calibration:
            print("calibrating the static oracle ...", flush=True)
            started = time.perf_counter()
            calibration["mass"] = oracle_mass(transformer, spec, search_captions, steps=steps, seeds=args.search_seeds,
                                              block_size=block, from_step=warmup)  # fmt: skip
            calibration["seconds"] = time.perf_counter() - started
        return calibration["mass"]

    def static_oracle(name: str, density: float) -> Method:
        mass = static_mass()
        info = {"mask_density": density, "calibration_seconds": calibration["seconds"]}
        return Method(name, "source", source=lambda: StaticOracle(mass, density, block, warmup), note="oracle-static",
                      info=info)  # fmt: skip

    for d in args.oracle_densities:
        tag = f"{round(d * 100):02d}"
        out.append((f"oracle-static-{tag}", "oracle-static", lambda d=d, tag=tag: static_oracle(f"oracle-static-{tag}", d)))
        out.append(fixed(f"oracle-per-call-{tag}", "oracle-per-call", kind="source", info={"mask_density": d},
                         source=lambda d=d: PerCallOracle(d, block, warmup)))  # fmt: skip
    if not args.no_skip_only:
        out.append(searched("skip-only", "skip-only", candidates=["skip"]))
    return out


def skipped(plan: Plan | None, steps: int) -> dict:
    """How many (layer, head) a plan skips in some step, and the share of head-steps skipped."""
    if plan is None:
        return {}
    heads, skips = set(), 0
    for step in range(steps):
        for layer in range(plan.num_layers):
            if plan.is_dense(step, layer):
                continue
            for h, p in enumerate(plan.patterns_for(step, layer)):
                if p.name == "skip":
                    heads.add((layer, h))
                    skips += 1
    return {"skipped_heads": len(heads), "skipped_share": skips / (steps * plan.num_layers * plan.num_heads)}


def pareto_plot(data: dict, path: Path) -> Path:
    """PSNR and SSIM against attention density, and PSNR against measured attention speedup; one
    colour per family, oracles (upper bounds) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["family"] != "dense"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = (("density", "psnr"), ("density", "ssim"), ("attention_speedup", "psnr"))
    for family in FAMILIES[1:]:
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        style = "s--" if family.startswith("oracle") else "o-"
        for ax, (x, y) in zip(axes, panels):
            pts = sorted(pts, key=lambda r: r[x])
            ax.plot([r[x] for r in pts], [min(r[y], 99.0) for r in pts], style, label=family, alpha=0.85)
    meaningful = data["speedup_meaningful"]
    axes[0].set_xlabel("attention FLOP density (share of dense, warm-up included)")
    axes[1].set_xlabel("attention FLOP density (share of dense, warm-up included)")
    axes[2].set_xlabel("measured attention speedup vs dense" + ("" if meaningful else " (CPU: NOT meaningful)"))
    axes[0].set_ylabel("PSNR vs dense (dB; identical = 99)")
    axes[1].set_ylabel("SSIM vs dense")
    axes[2].set_ylabel("PSNR vs dense (dB; identical = 99)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: {data['videos']} videos, {data['steps']} steps, block {data['block_size']}; "
                 f"{data['environment']['device']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    transformer, spec, what = load_model(args)
    videos = [(c, s) for c in scene_captions(EVAL_DATA_SEED, args.captions, spec) for s in args.seeds]
    print(f"{what}; {len(videos)} videos, {args.steps} steps, layout {layout_of(spec).describe()}, "
          f"block {args.block_size}, {args.device}", flush=True)  # fmt: skip
    todo = methods(args, transformer, spec)
    run = dict(steps=args.steps, spec=spec, backend=args.backend, block_size=args.block_size)
    data = {"model": what, "weights": weights_info(args), "videos": len(videos), "steps": args.steps,
            "block_size": args.block_size, "layout": layout_of(spec).describe(), "backend": args.backend,
            "dry_run": args.quick, "speedup_meaningful": args.device.startswith("cuda"),
            "environment": environment(args.device), "captions": sorted({c for c, _ in videos}), "seeds": args.seeds,
            "command": "python bench/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "rows": [], "not_run": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dense = None
    for i, (name, family, build) in enumerate(todo):
        if time.perf_counter() - started > args.budget_s and dense is not None:
            data["not_run"].append(name)
            print(f"[{i + 1}/{len(todo)}] {name}: not run (past --budget-s {args.budget_s:g})", flush=True)
            continue
        method = build()
        if args.device.startswith("cuda"):  # compile kernels before anything is timed
            run_method(transformer, method, videos[:1], **{**run, "steps": 2}, progress=False)
        result = run_method(transformer, method, videos, **run)
        dense = dense or result
        data["rows"].append(row(result, dense, args.steps))
        r = data["rows"][-1]
        print(f"[{i + 1}/{len(todo)}] {name}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, density {r['density']:.1%} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        data["wall_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(data, indent=2, default=float) + "\n")
    data["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(data, indent=2, default=float) + "\n")
    pareto_plot(data, args.plot)
    table = render_table(data)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {args.out}, {args.plot} and {args.out.with_suffix('.md')}\n")
    print(table)
    return 0


def row(result, dense, steps: int) -> dict:
    """One method's scores against dense, its cost, and what its plan skips."""
    s = score(result, dense)
    return {"method": result.method.name, "family": result.method.note, "psnr": s["psnr"], "ssim": s["ssim"],
            "density": result.density, "flop_reduction": 1 / result.density if result.density else float("inf"),
            "attention_speedup": dense.attention_seconds / result.attention_seconds,
            "speedup": dense.seconds / result.seconds, "seconds": result.seconds,
            "attention_seconds": result.attention_seconds, "psnr_per_video": s["psnr_per_video"],
            "ssim_per_video": s["ssim_per_video"], **skipped(result.method.plan, steps),
            **result.method.info}  # fmt: skip


def weights_info(args) -> dict:
    """Where the weights came from and how long they were trained (their train_info.json)."""
    if args.quick or args.random_weights:
        return {"path": None}
    path = Path(args.weights or MODELS[args.model])
    info = {"path": str(path)}
    train = path / "train_info.json"
    if train.exists():
        t = json.loads(train.read_text())
        info.update({k: t.get(k) for k in ("total_steps", "total_videos_seen", "final_loss", "parameters")})
    return info


if __name__ == "__main__":
    sys.exit(main())
