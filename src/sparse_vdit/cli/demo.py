"""`sparse-vdit demo`: the main job, end to end on the organism (the project's small Wan video DiT).

Generates one video (a fixed caption and seed) three ways: dense, with the offline plan (the
shipped ``organism/weights/plan.json``, found by the Sparse-vDiT search on this model) and with
SVG (online); writes them side by side, each under its label (MP4 and GIF), with a picture of the
plan and ``demo.json`` (strict JSON: dense's infinite PSNR against itself is null), and prints
time, attention density and PSNR / SSIM against dense. A bar follows each method's denoising
steps; torch's CPU threads are set to the physical cores (1 on a machine of <= 2 cores;
``--threads``), as torch's default oversubscribes a small busy machine. On a GPU the sparse layers run on the fastest
backend (``auto``).

``--model`` picks the shipped organism: ``small`` (2,048 tokens, the CPU demo) or ``fidelity`` (9,216
tokens, 20 steps, block 128: the model fidelity is judged on, too slow for a CPU demo); ``auto``
(default) takes ``fidelity`` on a GPU and ``small`` elsewhere. The fidelity organism ships no plan:
one is searched on the fly.

Without shipped weights it says so and runs the same path on a randomly initialised organism at
reduced size (so every piece runs, the numbers mean nothing about fidelity), with a plan searched
on the fly, then the kernel check of ``sparse-vdit check``. ``--quick`` is a tiny version for CI.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ..timing import device_name
from .common import FIDELITY_BLOCK, FIDELITY_STEPS, ORGANISM_BLOCK, ORGANISM_STEPS, CommandError, add_backend
from .common import add_device, add_threads, fraction, positive_int, set_threads, writable_folder

CAPTION = "red striped square moves right, blue plain disc bounces down, gradient background still"
SEED = 0
SEARCH_SCENES = (4242, 3)  # (data seed, count): captions the on-the-fly search runs on (not CAPTION)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("auto", "small", "fidelity"), default="auto",
                        help="shipped organism: small (2,048 tokens) or fidelity (9,216 tokens); default auto: "
                             "fidelity on a GPU, small elsewhere")  # fmt: skip
    parser.add_argument("--weights", type=Path, help="organism weights folder (default: --model's shipped weights)")
    parser.add_argument("--random-weights", action="store_true", help="untrained weights even if weights are shipped")
    parser.add_argument("--plan", help="plan JSON file, 'search' (search now) or 'uniform' (diagonal 1 frame); "
                                       "default: the plan beside the weights, else 'search'")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny random organism, 3 steps, no kernel check (CI)")
    parser.add_argument("--steps", type=positive_int,
                        help=f"denoising steps (default {ORGANISM_STEPS}; 8 with random weights; 3 with --quick)")
    parser.add_argument("--caption", default=CAPTION, help="what the video shows (the organism's vocabulary)")
    parser.add_argument("--seed", type=int, default=SEED, help="noise seed")
    parser.add_argument("--svg-density", type=fraction, default=0.25, help="SVG's share of blocks in a sparse layer")
    add_backend(parser)
    add_device(parser)
    add_threads(parser)
    parser.add_argument("--no-check", action="store_true", help="skip the kernel check (random weights only)")
    parser.add_argument("--out", type=Path, default=Path("sparse-vdit-demo"), help="folder for videos and pictures")


def shipped_model(args) -> str:
    """The shipped organism ``--model`` names: ``auto`` is ``fidelity`` on a GPU, ``small`` elsewhere."""
    if args.model != "auto":
        return args.model
    return "fidelity" if str(args.device).startswith("cuda") else "small"


def _weights(args) -> Path:
    from ..organism import model as M

    return Path(args.weights) if args.weights is not None else M.MODELS[shipped_model(args)]


def _model(args):
    """(transformer, spec, block size, what was loaded: one line)."""
    from ..organism import model as M

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.quick:
        spec = M.OrganismSpec(frames=4, height=32, width=32)
        config = M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
        return M.to_dtype(M.build_organism(config), dtype).to(args.device).eval(), spec, 16, "tiny random organism (--quick)"
    path = _weights(args)
    if not args.random_weights:
        try:
            spec = M.load_spec(path)
            _, h, w = spec.token_grid
            block = FIDELITY_BLOCK if h * w >= 4 * FIDELITY_BLOCK else ORGANISM_BLOCK  # frames of >= 4 blocks
            return M.load_organism(path, args.device, dtype), spec, block, f"organism weights from {path}"
        except FileNotFoundError:
            if args.weights is not None:
                raise CommandError(f"no organism weights in {path}") from None
            print(f"No organism weights shipped in {path} yet (trained on a GPU: `sparse-vdit train-organism`): "
                  "running the demo path on a RANDOMLY INITIALISED organism at reduced size (4 of 8 layers); "
                  "its videos are noise and its PSNR/SSIM say nothing about fidelity.")  # fmt: skip
    spec = M.OrganismSpec()
    transformer = M.to_dtype(M.build_organism(M.organism_config(spec, num_layers=4)), dtype).to(args.device).eval()
    return transformer, spec, ORGANISM_BLOCK, "random organism, 4 layers (no trained weights)"


def _plan(args, transformer, spec, block: int, steps: int, trained: bool):
    """(plan, label) as ``--plan`` says; default: ``plan.json`` beside trained weights, else a search now."""
    from ..organism.data import sample_scene
    from ..patterns import diagonal
    from ..plan import Plan

    choice = args.plan
    shipped = _weights(args) / "plan.json"  # the plan found on these weights
    if choice is None:
        choice = str(shipped) if trained and shipped.exists() else "search"
    if choice == "uniform":
        return Plan.uniform(transformer, diagonal(1.0), block_size=block, warmup_steps=1), "uniform diagonal(1 frame)"
    if choice == "search":
        from ..compare import search_plan

        seed, count = SEARCH_SCENES
        captions = [sample_scene(seed, i).caption for i in range(count)]
        print(f"searching a plan now ({count} captions x 1 seed, {steps} steps; not a shipped plan) ...")
        plan = search_plan(transformer, spec, captions, steps=steps, block_size=block, backend=args.backend)
        return plan, f"searched now ({count} captions, {steps} steps)"
    plan = args.plan_loaded or Plan.load(choice)  # a --plan file was read before the model
    plan.check(transformer)
    label = f"plan {choice}" if Path(choice) != shipped else "shipped plan" if args.weights is None else "plan beside weights"
    return plan, label


def _finite(value):
    """``value`` with every non-finite float (dense's PSNR against itself) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from ..compare import Method, layout_of, run_method, score, side_by_side
    from ..plan import Plan
    from ..plan_view import draw_plan

    started = time.perf_counter()
    threads = set_threads(args.threads)
    writable_folder(args.out)
    # a --plan file is read before the (slow) model: a bad one fails at once
    args.plan_loaded = Plan.load(args.plan) if args.plan not in (None, "search", "uniform") else None
    transformer, spec, block, loaded = _model(args)
    trained = loaded.startswith("organism weights")
    default_steps = FIDELITY_STEPS if block == FIDELITY_BLOCK else ORGANISM_STEPS
    steps = args.steps or (default_steps if trained else 3 if args.quick else 8)
    plan, plan_label = _plan(args, transformer, spec, block, steps, trained)
    layout = layout_of(spec)
    print(f"{loaded}; layout {layout.describe()}, block {plan.block_size}; {steps} steps; "
          f"device {args.device}, backend {args.backend}, {threads} torch thread{'s' * (threads > 1)}")  # fmt: skip
    print(f'caption "{args.caption}", seed {args.seed}')

    methods = [
        Method("dense", "dense"),
        Method("offline plan", "plan", plan, note=plan_label),
        Method(f"SVG {args.svg_density:.0%}", "svg", svg={"density": args.svg_density}, note="online"),
    ]
    video = [(args.caption, args.seed)]
    if args.device.startswith("cuda"):  # compile kernels and fill caches before timing
        for m in methods:
            run_method(transformer, m, video, steps=2, spec=spec, backend=args.backend, block_size=block, progress=False)
    runs = [run_method(transformer, m, video, steps=steps, spec=spec, backend=args.backend, block_size=plan.block_size)
            for m in methods]  # fmt: skip

    labels = ["dense", "plan", f"SVG {args.svg_density:.0%}"]
    gif = side_by_side(runs, args.out / "dense_plan_svg.gif", labels=labels)
    mp4 = side_by_side(runs, args.out / "dense_plan_svg.mp4", labels=labels)
    picture = draw_plan(plan, args.out / "plan.png", layout, title=f"offline plan: {plan_label}")
    rows = []
    for r in runs:
        s = score(r, runs[0])
        rows.append({"method": r.method.name, "note": r.method.note, "seconds": r.seconds,
                     "attention_seconds": r.attention_seconds, "density": r.density, "psnr": s["psnr"],
                     "ssim": s["ssim"]})  # fmt: skip
    info = {"model": loaded, "layout": layout.describe(), "steps": steps, "caption": args.caption, "seed": args.seed,
            "device": device_name(args.device), "backend": args.backend, "plan": plan_label, "rows": rows}  # fmt: skip
    (args.out / "demo.json").write_text(json.dumps(_finite(info), indent=2, allow_nan=False) + "\n")

    print(f"\n{'method':<14} {'time s':>7} {'attn s':>7} {'density':>8} {'PSNR dB':>8} {'SSIM':>6}  note")
    for r in rows:
        print(f"{r['method']:<14} {r['seconds']:>7.2f} {r['attention_seconds']:>7.2f} {r['density']:>8.1%} "
              f"{r['psnr']:>8.2f} {r['ssim']:>6.3f}  {r['note']}")  # fmt: skip
    print("(PSNR is inf where a video equals the dense one: null in demo.json)")
    if not args.device.startswith("cuda"):
        print("(CPU: sparse layers run the plain-torch reference kernel, so times are not speedups)")
    print(f"\nvideos side by side (dense | plan | SVG): {mp4} and {gif}; plan picture: {picture}; "
          f"numbers: {args.out}/demo.json")  # fmt: skip
    print(f"demo took {time.perf_counter() - started:.0f} s")

    if trained or args.quick or args.no_check:
        return 0
    print("\nKernel check (sparse-vdit check): every pattern through every backend against the reference")
    from . import check

    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    return check.run(parser.parse_args(["--device", args.device, "--out", str(args.out / "check")]))
