"""`sparse-vdit search`: find a plan by the Sparse-vDiT offline search and save it as JSON.

``--model organism`` searches the project's small Wan model (weights from ``--weights``, else the
shipped ones) through its own sampler; any other value is a diffusers pipeline folder or hub id
already in the cache. Prints the plan's summary at the end (``sparse-vdit show`` prints it again).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..methods.search import MODES, SearchSettings
from .common import ORGANISM_BLOCK, ORGANISM_STEPS, PIPELINE_BLOCK, PIPELINE_STEPS, CommandError, add_backend
from .common import add_device, add_dtype, add_threads, dtype_of, block_size, positive_int, set_threads, writable_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'organism', or a diffusers pipeline folder / cached hub id")
    parser.add_argument("--weights", type=Path, help="organism weights folder (default: the shipped weights)")
    parser.add_argument(
        "--random-weights", action="store_true", help="organism only: untrained weights, to try the command"
    )
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line ('#' comments), or a JSON list")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--scenes", type=positive_int, help="organism only: the captions of this many procedural scenes as prompts"
    )
    parser.add_argument("--out", type=Path, default=Path("plan.json"), help="the plan file to write")
    parser.add_argument("--steps", type=positive_int,
                        help=f"denoising steps of each run; generate with the same (default {PIPELINE_STEPS}; "
                             f"{ORGANISM_STEPS} on the organism)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds of each prompt")
    g = parser.add_argument_group("search settings (unset: the --mode's default)")
    g.add_argument("--mode", choices=MODES, default="ours", help="'paper': the paper's setting as one switch")
    g.add_argument("--epsilon", type=float)
    g.add_argument("--lam", type=float, help="weight of the cost in the loss (the paper's lambda)")
    g.add_argument("--error", choices=("relative", "absolute"))
    g.add_argument("--estimate", choices=("sampled", "full"))
    g.add_argument("--sample-blocks", type=positive_int, help="query blocks sampled per layer call (8, at most 1/8 of them)")
    tune = "search band widths and stripes placed by attention mass (ours), or the four fixed modes (--no-tune)"
    g.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None, help=tune)
    g.add_argument("--candidates", help="comma-separated, e.g. skip,diagonal:0.5,multi_diagonal:0.1,vertical,mass:0.1")
    g.add_argument("--cost", help="auto (measured on CUDA), blocks, measure, or a cost table JSON file")
    competes = "a sparse pick must also beat dense's own loss lam * 1 (ours), or only epsilon (paper)"
    g.add_argument("--dense-competes", action=argparse.BooleanOptionalAction, default=None, help=competes)
    g.add_argument(
        "--cost-cache", type=Path, help="folder of measured cost tables (default: ~/.cache/sparse-vdit/costs)"
    )
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--warmup-layers", type=int, default=0)
    g.add_argument("--buckets", type=positive_int, help="step ranges after the warm-up")
    g.add_argument("--block-size", type=block_size,
                   help=f"block size of the tables (default {PIPELINE_BLOCK}; {ORGANISM_BLOCK} on the organism)")
    add_backend(g)
    r = parser.add_argument_group("generation")
    add_device(r)
    add_threads(r)
    add_dtype(r)
    r.add_argument("--height", type=positive_int, help="pixels (default: the pipeline's)")
    r.add_argument("--width", type=positive_int, help="pixels (default: the pipeline's)")
    r.add_argument("--frames", type=positive_int, help="video frames (default: the pipeline's)")
    r.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    r.add_argument("--time-dense", action="store_true", help="also time one dense generation (search cost ratio)")
    r.add_argument("--no-progress", action="store_true")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The calibration prompts: ``--prompt`` values, those of ``--prompts`` (a JSON list, or one a line with
    ``#`` comments) and, for the organism, ``--scenes`` captions; CommandError when there are none."""
    prompts = list(args.prompt)
    if args.prompts is not None:
        try:
            text = args.prompts.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CommandError(f"{args.prompts} is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise CommandError(f"cannot read {args.prompts}: {err.strerror or err}") from None
        if args.prompts.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise CommandError(f"{args.prompts} is not valid JSON (line {err.lineno}, column {err.colno}: "
                                   f"{err.msg})") from None  # fmt: skip
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise CommandError(f"{args.prompts} must hold a JSON list of strings")
            prompts += data
        else:
            prompts += [
                line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
            ]
    if args.scenes:
        if args.model != "organism":
            raise CommandError("--scenes is for --model organism")
        from ..organism.data import sample_scene

        prompts += [sample_scene(4242, i).caption for i in range(args.scenes)]
    if not prompts:
        raise CommandError("give --prompts FILE, --prompt TEXT or (organism) --scenes N")
    return prompts


def load_model(args: argparse.Namespace, dtype: torch.dtype):
    """(model, sampler) for ``--model``."""
    from ..compare import organism_sampler
    from ..integrations.diffusers import pipeline_sampler

    if args.model == "organism":
        from ..organism import model as organism

        spec = organism.load_spec(args.weights)
        if args.random_weights:
            transformer = organism.build_organism(organism.organism_config(spec)).to(args.device, dtype).eval()
        else:
            try:
                transformer = organism.load_organism(args.weights, args.device, dtype)
            except FileNotFoundError as err:
                raise CommandError(f"{err} (or pass --random-weights to try the command)") from None
        extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
        return transformer, organism_sampler(transformer, spec, **extra)
    if args.random_weights or args.weights is not None:
        raise CommandError("--weights and --random-weights are for --model organism")
    from .generate import load_pipeline

    pipe = load_pipeline(args.model, dtype, args.device)
    extra = {k: v for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames),
                               ("guidance_scale", args.guidance_scale)) if v is not None}  # fmt: skip
    return pipe, pipeline_sampler(pipe, **extra)


def settings_from(args: argparse.Namespace) -> SearchSettings:
    """The search settings the command line asks for (a measured cost model on a GPU unless told otherwise)."""
    from ..methods.candidates import parse_candidate
    from ..methods.cost import MeasuredCost

    candidates = None
    if args.candidates:
        try:
            candidates = tuple(parse_candidate(c) for c in args.candidates.split(",") if c.strip())
        except ValueError as err:
            raise CommandError(f"{err}") from None
    cost = args.cost
    if cost in (None, "auto") and args.mode == "ours" and args.device.startswith("cuda"):
        cost = "measure"
    if cost == "measure":
        cost = MeasuredCost(args.cost_cache, progress=not args.no_progress)
    return SearchSettings(mode=args.mode, epsilon=args.epsilon, lam=args.lam, error=args.error, estimate=args.estimate,
                          sample_blocks=args.sample_blocks, tune=args.tune, candidates=candidates, cost=cost,
                          dense_competes=args.dense_competes,
                          warmup_steps=args.warmup_steps, warmup_layers=args.warmup_layers, buckets=args.buckets,
                          block_size=args.block_size or (ORGANISM_BLOCK if args.model == "organism" else PIPELINE_BLOCK),
                          backend=args.backend)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..integrations.diffusers import run_search
    from ..integrations.diffusers.search import searchers_for
    from ..plan_view import summary_text

    prompts = read_prompts(args)
    settings = settings_from(args)
    writable_file(args.out)
    set_threads(args.threads)
    steps = args.steps or (ORGANISM_STEPS if args.model == "organism" else PIPELINE_STEPS)
    dtype = dtype_of(args.dtype, args.device)
    model, sampler = load_model(args, dtype)
    try:
        searcher = searchers_for(model, prompts, steps=steps, seeds=args.seeds, settings=settings)  # one per expert
        plan = run_search(searcher, model, sampler, time_dense=args.time_dense, progress=not args.no_progress)
    except ValueError as err:  # bad settings, prompts the model cannot read, ...
        raise CommandError(str(err)) from None
    if args.model == "organism":
        plan = _named(plan, "organism")
    plan.save(args.out)
    for name, one in plan.items() if isinstance(plan, Mapping) else [(None, plan)]:
        print(summary_text(one) if name is None else f"{name}:\n{summary_text(one)}\n")
    print(f"\nwrote {args.out}")
    return 0


def _named(plan, name: str):
    """The plan with the model name recorded (the organism's config has no hub name)."""
    from dataclasses import replace

    if plan.spec.name:
        return plan
    return replace(plan, spec=replace(plan.spec, name=name))
