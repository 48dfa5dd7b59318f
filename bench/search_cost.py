"""Search cost at real model size: the Sparse-vDiT offline search against one dense generation.

Issue 4's target: search cost <= 1.5x one dense generation of the same video on the same GPU
(report both). So far measured only on the 2,048-token organism, where python overhead dominates
(2.5-15x); this script measures it on real-size diffusers transformers.

    python bench/search_cost.py [--models wan-1.3b] [--modes ours[,paper]] [--steps 10] [--prompts 1]
                                [--seeds 0] [--repeats 2] [--out bench/results/search_cost.json] [--budget-s 480]
    python bench/search_cost.py --dry-run    # tiny models on the CPU, fp32, reference backend, 2 steps

Models: ``bench/models.py``'s (as bench/e2e.py uses them): published diffusers configs, random
bf16 weights materialised on the GPU, its latents shape and text tokens (``wan-1.3b`` 480p x 81
frames, ``wan-14b`` 720p, ``hunyuan`` 720p x 129 frames, ``cogvideox1.5`` 768p); ``--dry-run``
uses its tiny configs.

Sampler (a bare transformer: no VAE, no text encoder): a real denoising loop of ``--steps`` steps
with diffusers' ``FlowMatchEulerDiscreteScheduler`` (flow shift per model; CogVideoX really uses a
v-prediction DDIM/DPM scheduler, which costs the same per step), initial latents drawn from the
seed on a CPU generator, and fixed random prompt embeddings (prompt ``embedding-i`` = the i-th of
``--prompts`` fixed random text embeddings; HunyuanVideo also its pooled projection). The
transformer is called as e2e.py calls it per family (HunyuanVideo: bf16 timestep, embedded
guidance, padded-text mask; CogVideoX: 3-D rotary embedding). **Classifier-free guidance is off**:
one forward per step. Wan and CogVideoX pipelines run two forwards per step with CFG; that doubles
both the search and the dense generation, so the ratio is about the same.

Per model: a 1-step unpatched warm-up, then one timed ``unpatched`` generation (diffusers SDPA,
cuDNN first; ``--no-unpatched`` skips it); then per mode (``ours``: our defaults; ``paper``: the
paper's setting, one prompt and one seed only) ``--repeats`` times ``sparse_vdit.search(transformer,
prompts, steps=, sampler=, seeds=, time_dense=True, backend=, block_size=128)``. The cost-table
cache (``SPARSE_VDIT_CACHE``) is a fresh temp folder per invocation (``--keep-cache`` keeps the
usual one), so the first ``ours`` search measures its cost table (``cost_table_seconds``, inside
its first run) and includes the first compilation of the sparse kernels; later repeats are warm.

Reported per search (rows merge into ``--out`` by model, mode, repeat, dry_run; a table is printed
last): ``search_seconds`` (all prompt x seed runs), ``run_seconds``, ``cost_table_seconds``,
``dense_seconds`` (one generation through our dense path, timed by ``search`` right after it),
``unpatched_seconds``; ``ratio`` = search / dense (the issue's number), ``ratio_no_table`` =
(search - cost table) / dense, ``run_ratio`` = mean run / dense, ``ratio_vs_unpatched``; the plan's
``density`` and ``expected_speedup`` (attention only, from the plan's stats). ``--save-plans DIR``
keeps every searched plan as JSON.

Random weights give near-uniform attention, so at the default ``epsilon`` most heads may stay
dense (see ``density``). The probing costs the same either way, but a dense pick makes the rest
of that layer call dearer than a sparse one would, so a mostly-dense search is an upper bound on
the search time of a trained model; ``--epsilon`` / ``--lam`` loosen the choice to see a sparser
mix. ``--budget-s`` stops starting models / searches that would not fit the time left (one
10-minute GPU call).

GPU (next session, H100): diffusers is not on the GPU image; carry it as a wheel and source
``bench/gpu_env.sh`` (it installs carried wheels to /tmp/site). Diffusers alone (``.whl3``: diffusers
0.42.1 + importlib_metadata; backend ``auto`` then picks Triton, FA4 being absent), one call::

    run(kind="nvidia-h100-x1", carry=[".whl3"], timeout_s=600, command="source bench/gpu_env.sh &&
        export TQDM_DISABLE=1 && python3 bench/search_cost.py --models wan-1.3b --modes ours,paper
        --repeats 2 --budget-s 480 --save-plans $OUT/plans; cp bench/results/search_cost.json $OUT/")

With FA4 (what ``auto`` picks on an H100, and what the e2e numbers used), three calls back to back
while the machine is warm, the cu13 wheel travelling in parts: ``carry=[".whlA"]`` with
``mkdir -p /tmp/wheels && cp .whlA/* /tmp/wheels/``; ``carry=[".whlB"]`` with ``cp .whlB/*
/tmp/wheels/``; then ``carry=[".whlC"]`` with the command above. The JSON is written after every
search (a timeout keeps what was measured) and merges into the tracked
``bench/results/search_cost.json``, so copy the returned file over it. Other models, one call
each (e2e dense forwards on the H100: Wan-1.3B 0.61 s, CogVideoX1.5 3.2 s, Wan-14B 11.2 s,
HunyuanVideo 20.2 s): ``--models cogvideox1.5``; ``--models wan-14b --repeats 1 --no-unpatched``;
``--models hunyuan --steps 5 --repeats 1 --no-unpatched``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import sparse_vdit


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling bench scripts
import common  # noqa: E402  (the bench library: clocks, results, environment)
import models  # noqa: E402  (the models, builder, inputs)
from sparse_vdit.timing import synchronize  # noqa: E402
MODELS, TINY, say = models.MODELS, models.TINY, common.say
# flow shift of each model's scheduler (Wan 480p 3.0, 720p 5.0; HunyuanVideo 7.0; CogVideoX none)
SHIFT = {"wan-1.3b": 3.0, "wan-14b": 5.0, "hunyuan": 7.0, "cogvideox1.5": 1.0}
# inputs of models.make_inputs that are per prompt (redrawn per embedding) or per step
PER_PROMPT = ("encoder_hidden_states", "pooled_projections")
PER_STEP = ("hidden_states", "timestep")


# --- the sampler -------------------------------------------------------------------------------


def prompt_names(count: int) -> list[str]:
    return [f"embedding-{i}" for i in range(count)]


def bare_sampler(bench, model, device: torch.device, dtype: torch.dtype, prompts: int):
    """``fn(prompt, seed, steps)``: one generation of ``model`` (a bare transformer), CFG off.

    ``prompt`` names one of ``prompts`` fixed random embeddings (:func:`prompt_names`); the
    other inputs (masks, guidance, rotary embedding) are e2e.py's. Returns the final latents.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = models.make_inputs(bench, model, device, dtype)
    fixed = {k: v for k, v in base.items() if k not in PER_PROMPT + PER_STEP}
    embeddings = {}
    for i, name in enumerate(prompt_names(prompts)):
        g = torch.Generator("cpu").manual_seed(10_000 + i)
        embeddings[name] = {k: torch.randn(base[k].shape, generator=g).to(device, dtype) for k in PER_PROMPT if k in base}
    # HunyuanVideo takes the timestep in the model dtype (as its pipeline and e2e.py do); the rest float32
    time_dtype = dtype if base["timestep"].is_floating_point() else torch.float32
    shift = SHIFT.get(bench.name, 1.0)

    @torch.no_grad()
    def run(prompt, seed: int, steps: int):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps.to(time_dtype)
        if steps > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):  # the step hook needs them falling
            raise ValueError(f"{steps} steps with shift {shift} repeat a timestep in {time_dtype}: use fewer steps")
        g = torch.Generator("cpu").manual_seed(int(seed))
        latents = torch.randn(bench.latent, generator=g).to(device, dtype)
        for t, t_model in zip(scheduler.timesteps, timesteps):
            out = model(hidden_states=latents, timestep=t_model.expand(latents.shape[0]), **embeddings[prompt], **fixed)
            latents = scheduler.step(out[0], t, latents, return_dict=False)[0]
        return latents

    return run


def time_generation(sampler, model, prompt: str, seed: int, steps: int) -> float:
    """Seconds of one unpatched generation (cuDNN SDPA first on CUDA), synchronised."""
    device = next(model.parameters()).device
    with models.cudnn_first() if device.type == "cuda" else contextlib.nullcontext():
        synchronize(device)
        t0 = time.perf_counter()
        sampler(prompt, seed, steps)
        synchronize(device)
    return time.perf_counter() - t0


# --- one model ---------------------------------------------------------------------------------


def row_of(plan, *, model: str, mode: str, repeat: int, args, backend: str, unpatched: float | None) -> dict:
    made, stats = plan.made_by, plan.made_by["stats"]
    search_s, dense_s = stats["search_seconds"], stats["dense_seconds"]
    table_s, runs = stats.get("cost_table_seconds", 0.0), stats["run_seconds"]
    row = {
        "model": model, "mode": mode, "repeat": repeat, "dry_run": args.dry_run, "backend": backend,
        "steps": args.steps, "prompts": args.prompts, "seeds": list(args.seeds), "block_size": args.block_size,
        "search_seconds": search_s, "run_seconds": runs, "cost_table_seconds": table_s,
        "dense_seconds": dense_s, "unpatched_seconds": unpatched,
        "ratio": search_s / dense_s, "ratio_no_table": (search_s - table_s) / dense_s,
        "run_ratio": statistics.mean(runs) / dense_s,
        "ratio_vs_unpatched": None if unpatched is None else search_s / unpatched,
        "density": stats["density"], "expected_speedup": stats.get("expected_speedup"),
        "speedup_basis": stats.get("speedup_basis"), "layer_calls": stats.get("layer_calls"),
        "stability": stats.get("stability"), "layout": plan.layout.describe() if plan.layout else None,
        "epsilon": made.get("epsilon"), "lam": made.get("lam"), "warmup_steps": made.get("warmup_steps"),
        "estimate": made.get("estimate"), "error": made.get("error"),
        "cost_model": made.get("cost"), "candidate_costs": made.get("candidate_costs"),
    }  # fmt: skip
    return row


def run_model(bench, args, device, dtype, rows: list, deadline: float, save=lambda: None) -> None:
    say(f"{bench.name}: building {bench.cls} ({'tiny' if args.dry_run else 'published config'}) on {device}")
    model = models.build(bench, device, dtype)
    sampler = bare_sampler(bench, model, device, dtype, args.prompts)
    prompts = prompt_names(args.prompts)
    probe = torch.empty(1, 1, 1, model.config.attention_head_dim, device=device, dtype=dtype)
    backend = sparse_vdit.kernels.resolve_backend(args.backend, probe)
    warm = time_generation(sampler, model, prompts[0], args.seeds[0], 1)  # CUDA context, cuBLAS, allocator
    say(f"{bench.name}: warm-up step {warm:.2f} s; sparse backend {backend}")
    unpatched, estimate = None, warm * args.steps
    if args.unpatched and time.perf_counter() + estimate <= deadline:
        unpatched = estimate = time_generation(sampler, model, prompts[0], args.seeds[0], args.steps)
        say(f"{bench.name}: unpatched generation ({args.steps} steps) {unpatched:.2f} s")
    runs = args.prompts * len(args.seeds)
    next_search = estimate * (runs * 1.5 + 1)  # the first search (at the target) + its dense timing
    for mode in args.modes:
        if mode == "paper" and runs > 1:
            say(f"{bench.name} paper: skipped, the paper's setting searches one prompt with one seed ({runs} runs)")
            continue
        for repeat in range(args.repeats):
            if time.perf_counter() + next_search > deadline:
                say(f"{bench.name} {mode} #{repeat}: skipped, about {next_search:.0f} s would pass the budget")
                break
            plan = search(model, prompts, sampler, args, mode, time_dense=True, progress=args.progress)
            row = row_of(plan, model=bench.name, mode=mode, repeat=repeat, args=args, backend=backend,
                         unpatched=unpatched)  # fmt: skip
            rows.append(row)
            save()
            next_search = row["search_seconds"] + row["dense_seconds"]
            if args.save_plans:
                path = Path(args.save_plans) / f"{bench.name}-{mode}-{repeat}{'-dry-run' if args.dry_run else ''}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                plan.save(path)
            say(f"{bench.name} {mode} #{repeat}: search {row['search_seconds']:.2f} s (cost table "
                f"{row['cost_table_seconds']:.2f} s), dense {row['dense_seconds']:.2f} s, ratio {row['ratio']:.2f} "
                f"({row['ratio_no_table']:.2f} without the table), density {row['density']:.1%}")  # fmt: skip
            sparse_vdit.clear_caches()
        if args.profile and mode == args.modes[0]:
            profile_search(model, prompts, sampler, args, mode, Path(args.profile) / f"{bench.name}-{mode}.txt")
    del model, sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()


def search(model, prompts, sampler, args, mode: str, **kwargs):
    """``sparse_vdit.search`` with this script's settings (``kwargs``: time_dense, progress)."""
    return sparse_vdit.search(model, prompts, steps=args.steps, seeds=args.seeds, sampler=sampler, mode=mode,
                              epsilon=args.epsilon, lam=args.lam, backend=args.backend, block_size=args.block_size,
                              **kwargs)  # fmt: skip


def profile_search(model, prompts, sampler, args, mode: str, path: Path) -> None:
    """One more (warm) search under ``torch.profiler``; its top operators by self CUDA and self
    CPU time go to ``path`` and the log (where a search's time goes, beside the dense run)."""
    text = common.profile_to(path, lambda: search(model, prompts, sampler, args, mode, progress=False),
                             f"one {mode} search")
    say(text)


# --- output ------------------------------------------------------------------------------------


def table(rows: list) -> str:
    head = (f"{'model':<13} {'mode':<6} {'rep':>3} {'runs':>4} {'search s':>9} {'table s':>8} {'dense s':>8} "
            f"{'unpatch s':>9} {'ratio':>6} {'no tbl':>6} {'per run':>7} {'density':>8} {'exp x':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        unp = "" if r.get("unpatched_seconds") is None else f"{r['unpatched_seconds']:.2f}"
        exp = "" if r.get("expected_speedup") is None else f"{r['expected_speedup']:.2f}"
        lines.append(f"{r['model']:<13} {r['mode']:<6} {r['repeat']:>3} {len(r['run_seconds']):>4} "
                     f"{r['search_seconds']:>9.2f} {r['cost_table_seconds']:>8.2f} {r['dense_seconds']:>8.2f} "
                     f"{unp:>9} {r['ratio']:>6.2f} {r['ratio_no_table']:>6.2f} {r['run_ratio']:>7.2f} "
                     f"{r['density']:>8.1%} {exp:>6}")  # fmt: skip
    return "\n".join(lines)


def merge(path: Path, env: dict, rows: list, old: dict | None = None) -> list:
    """Merge rows into the JSON at ``path`` (or into ``old``, its earlier content) by (model, mode,
    repeat, dry_run); returns all rows."""
    order = {name: i for i, name in enumerate(MODELS)}
    return common.merge_results(
        path, env, rows, key=lambda r: (r["model"], r["mode"], r["repeat"], r.get("dry_run")),
        order=lambda r: (r.get("dry_run", False), order.get(r["model"], 99), r["mode"] != "ours", r["repeat"]), old=old,
    )  # fmt: skip


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="wan-1.3b", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--modes", default="ours", help="ours and/or paper, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; 2 with --dry-run)")
    p.add_argument("--prompts", type=int, default=1, help="fixed random prompt embeddings searched")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the search runs")
    p.add_argument("--repeats", type=int, default=2, help="searches per mode (the first cold, the rest warm)")
    p.add_argument("--backend", default=None, help="sparse backend (default auto; reference with --dry-run)")
    p.add_argument("--block-size", type=int, default=sparse_vdit.block_table.DEFAULT_BLOCK)
    p.add_argument("--epsilon", type=float, default=None, help="search epsilon (default: the mode's)")
    p.add_argument("--lam", type=float, default=None, help="search lambda (default: the mode's)")
    p.add_argument("--no-unpatched", dest="unpatched", action="store_false", help="skip the unpatched generation")
    p.add_argument("--keep-cache", action="store_true", help="use the usual cost-table cache, not a fresh one")
    p.add_argument("--save-plans", type=Path, default=None, help="folder for the searched plans (JSON)")
    p.add_argument("--profile", type=Path, default=None,
                   help="folder: profile one more search of the first mode (torch.profiler tables, per model)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results/search_cost.json; a temp file with --dry-run)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting models / searches after this long")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (fp32, reference, 2 steps)")
    args = p.parse_args(argv)
    args.models = models.model_names(p, args.models)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"ours", "paper"}:
        p.error("--modes takes ours and/or paper")
    if args.steps is None:
        args.steps = 2 if args.dry_run else 10
    if args.backend is None:
        args.backend = "reference" if args.dry_run else "auto"
    if args.dry_run:
        args.block_size = min(args.block_size, 16)
    if args.steps < 1 or args.prompts < 1 or args.repeats < 1:
        p.error("--steps, --prompts and --repeats must be >= 1")
    args.out = args.out or common.results_path("search_cost", args.dry_run)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = common.device_and_dtype(args.dry_run, "bench/search_cost.py")
    env = common.environment(device)
    env["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    say(f"search cost on {env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}, "
        f"flash_attn {env['flash_attn']}; models {args.models}, modes {args.modes}, {args.steps} steps, "
        f"{args.prompts} prompt(s) x seeds {args.seeds}, {args.repeats} repeat(s), backend {args.backend}")  # fmt: skip
    deadline = common.START + args.budget_s
    rows: list = []
    old = json.loads(args.out.read_text()) if args.out.exists() else {"runs": [], "results": []}

    def save() -> list:  # after every search, so a timeout keeps what was measured
        return merge(args.out, env, rows, old)

    saved = os.environ.get("SPARSE_VDIT_CACHE")
    with tempfile.TemporaryDirectory(prefix="search-cost-cache-") as cache:
        if not args.keep_cache:  # a fresh cost-table cache: the first search measures its table
            os.environ["SPARSE_VDIT_CACHE"] = cache
        try:
            for name in args.models:
                if time.perf_counter() > deadline:
                    say(f"{name}: skipped, over the {args.budget_s:.0f} s budget")
                    continue
                with common.out_of_memory_said(name):
                    run_model((TINY if args.dry_run else MODELS)[name], args, device, dtype, rows, deadline, save)
        finally:
            if saved is None:
                os.environ.pop("SPARSE_VDIT_CACHE", None)
            else:
                os.environ["SPARSE_VDIT_CACHE"] = saved
    results = save()
    say(f"wrote {args.out}")
    print(table([r for r in results if r.get("dry_run", False) == args.dry_run]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
