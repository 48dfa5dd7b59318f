"""Sparse attention under context parallelism: real-size forward, dense vs sparse, 1 vs N GPUs.

    python bench/sp.py --gpus 1,4 [--models wan-14b,hunyuan,cogvideox1.5] [--cp ulysses|ring]
    python bench/sp.py --dry-run --gpus 1,2       # tiny models, CPU, gloo processes spawned here

One command: for each count in ``--gpus`` it runs ``torchrun --nproc-per-node N bench/sp.py ...``
(the same flags) one after the other, every run merging its rows into ``--out``, then prints the
table. Run under ``torchrun`` directly, it measures that world size only.

Each run builds the published diffusers config with random bf16 weights (``bench/models.py``'s
``build``, no download), enables context parallelism with
``sparse_vdit.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=N))`` (or
``ring_degree=N`` with ``--cp ring``: sparse-vdit then exchanges heads over the whole mesh, see
``integrations/diffusers/parallel.py``) when ``N > 1``, and times one denoising forward (median
of ``--repeats`` after a warm-up) for:

- ``dense``: ``sparse_vdit.apply`` with a dense plan (best dense kernel);
- ``sparse-NN``: a mixed plan of NN% attention density (``models.mixed_plan``; the same plan on 1 and
  N GPUs, each rank running the patterns of its own global heads in one launch per layer).

Reported per row (model, world, variant): forward seconds (the slowest rank's), attention
seconds per rank (their spread is the imbalance between ranks whose heads have different
densities), the sparse speedup against ``dense`` of the same world, and, when rows of world 1
exist in ``--out``, the N-GPU sparse speedup over the 1-GPU one (issue 8's target: within 10%),
and the N-GPU forward's speedup over the 1-GPU forward of the same variant.

Models: ``wan-14b`` (Wan2.1-T2V-14B, 1280x720, 81 frames: 75,600 tokens, 40 heads), ``wan-1.3b``,
``hunyuan`` (HunyuanVideo 720p, 129 frames: 118,800 video tokens + 256 text, 24 heads),
``cogvideox1.5`` (1360x768: 44,880 + 226 text, 48 heads), ``hunyuan1.5`` (HunyuanVideo 1.5 720p:
111,600 + 1,985 text, 16 heads), ``skyreels-v2-14b`` (1280x720, 121 frames: 111,600 tokens, 40
heads), ``ltx-video`` (1280x768, 161 frames: 20,160 tokens, 32 heads), ``mochi`` (848x480, 163
frames: 44,520 + 256 text, 24 heads), and the two Wan2.2-A14B experts. Text tokens stay whole on every rank.
The world size must divide the head count and the video token count (rows that do not fit are
skipped with a message).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
import common  # noqa: E402
import models  # noqa: E402

import sparse_vdit
from sparse_vdit import Plan
from sparse_vdit.timing import clock, seconds_between, synchronize

DEFAULT_MODELS = "wan-14b,hunyuan"


def say(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        common.say(*args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated subset of {', '.join(models.MODELS)}")
    p.add_argument("--densities", default="0.3,0.2", help="sparse plan densities")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant, after one warm-up")
    p.add_argument("--backend", default="auto", help="sparse backend")
    p.add_argument("--block-size", type=int, default=sparse_vdit.block_table.DEFAULT_BLOCK)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/sp.json)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this long")
    p.add_argument("--cp", choices=("ulysses", "ring"), default="ulysses", help="diffusers context parallelism kind")
    p.add_argument("--gpus", default="1", help="comma-separated world sizes, run one after the other (torchrun; "
                   "processes spawned here with --dry-run); ignored under torchrun")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (fp32, gloo)")
    args = p.parse_args(argv)
    args.gpus = [int(n) for n in args.gpus.split(",") if n.strip()]
    if not args.gpus or min(args.gpus) < 1:
        p.error("--gpus needs world sizes >= 1, e.g. 1,4")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(models.MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(models.MODELS)}")
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    if args.dry_run:
        args.block_size = min(args.block_size, 16)
        args.backend = "reference" if args.backend == "auto" else args.backend
    if args.out is None:
        folder = Path(tempfile.gettempdir()) if args.dry_run else Path(__file__).parent / "results"
        args.out = folder / ("sp-dry-run.json" if args.dry_run else "sp.json")
    return args


def setup(args) -> tuple[int, int, torch.device]:
    """Process group from torchrun's environment (nccl on GPUs, gloo on the CPU); rank, world, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench/sp.py needs CUDA GPUs (or --dry-run)")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world)
        if device.type == "cpu" and torch.accelerator.device_count() == 0:
            # diffusers picks its device as rank % torch.accelerator.device_count(): 0 on a CPU-only torch
            torch.accelerator.device_count = lambda: 1
    return rank, world, device


def synchronize_ranks(device) -> None:
    """Wait for this rank's device, then for every rank (a barrier when distributed)."""
    synchronize(device)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def measure(model, inputs, state, repeats: int, device) -> dict:
    times, attention = [], []
    for i in range(repeats + 1):
        state.reset_timings()
        synchronize_ranks(device)
        start = clock(inputs["hidden_states"])
        model(**inputs)
        synchronize_ranks(device)
        seconds = seconds_between(start, clock(inputs["hidden_states"]))
        if i:
            times.append(seconds)
            attention.append(sum(state.attention_seconds().values()))
    mine = [statistics.median(times), statistics.median(attention)]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    return {"seconds": max(p[0] for p in parts), "attention_seconds_per_rank": [p[1] for p in parts]}


def run_model(bench, args, world: int, device, dtype, rows: list, deadline: float) -> None:
    say(f"{bench.name}: building {bench.cls} on {device}, world {world}")
    model = models.build(bench, device, dtype)
    inputs = models.make_inputs(bench, model, device, dtype)
    layout = models.layout_of(bench, model, inputs)
    spec = sparse_vdit.integrations.diffusers.model_spec(model)
    if spec.num_heads % world or layout.video_tokens % world:
        say(f"{bench.name}: skipped: world {world} divides neither {spec.num_heads} heads nor "
            f"{layout.video_tokens} tokens")  # fmt: skip
        return
    if world > 1:
        from diffusers import ContextParallelConfig

        degree = {"ring_degree": world} if args.cp == "ring" else {"ulysses_degree": world}
        sparse_vdit.enable_context_parallel(model, ContextParallelConfig(**degree))
    plans = {"dense": Plan.dense(model, block_size=args.block_size, layout=layout)}
    for density in args.densities:
        plans[f"sparse-{round(density * 100)}"] = models.mixed_plan(spec, layout, density, args.block_size)
    for variant, plan in plans.items():
        if time.perf_counter() > deadline:
            say(f"{bench.name} {variant}: skipped, out of budget")
            continue
        state = sparse_vdit.apply(model, plan, backend=args.backend)
        state.timing = True
        try:
            result = measure(model, inputs, state, args.repeats, device)
        finally:
            sparse_vdit.remove(model)
            sparse_vdit.clear_caches()
        row = dict(model=bench.name, world=world, cp=args.cp if world > 1 else "none", variant=variant,
                   density=plan.density(layout), dry_run=args.dry_run, tokens=layout.num_tokens, **result)  # fmt: skip
        rows.append(row)
        say(f"{bench.name} world {world} {variant}: {row['seconds'] * 1e3:.1f} ms, attention per rank "
            f"{[round(a * 1e3, 1) for a in row['attention_seconds_per_rank']]} ms")  # fmt: skip


def _key(r: dict) -> tuple:
    return r["model"], r["world"], r.get("cp", "ulysses" if r["world"] > 1 else "none"), r["variant"]


def merge(path: Path, env: dict, rows: list) -> list:
    old = json.loads(path.read_text())["results"] if path.exists() else []
    keys = {_key(r) for r in rows}
    results = [r for r in old if _key(r) not in keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    return results


def table(results: list) -> str:
    """Per row: speedup vs dense of the same world; for N > 1, the sparse speedup relative to the
    1-GPU one and the forward's speedup over the same variant on 1 GPU."""
    by = {_key(r): r for r in results}
    lines = [("| model | world | cp | variant | density | forward ms | attention ms per rank (min-max) "
              "| speedup vs dense | vs 1-GPU speedup | forward vs 1 GPU |"),
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, world, cp, variant), r in sorted(by.items()):
        dense = by.get((model, world, cp, "dense"))
        speedup = dense["seconds"] / r["seconds"] if dense else None
        one, one_dense = by.get((model, 1, "none", variant)), by.get((model, 1, "none", "dense"))
        ratio = speedup / (one_dense["seconds"] / one["seconds"]) if speedup and one and one_dense and world > 1 else None
        scaling = one["seconds"] / r["seconds"] if one and world > 1 else None
        att = r["attention_seconds_per_rank"]
        lines.append(f"| {model} | {world} | {cp} | {variant} | {r['density']:.2f} | {r['seconds'] * 1e3:.1f} | "
                     f"{min(att) * 1e3:.1f}-{max(att) * 1e3:.1f} | {'' if speedup is None else f'{speedup:.2f}x'} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {'' if scaling is None else f'{scaling:.2f}x'} |")  # fmt: skip
    return "\n".join(lines)


def torchrun_command(world: int, argv: list) -> list:
    """The command that measures ``world`` GPUs with the same flags (``--gpus`` is ignored under torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            str(Path(__file__).resolve()), *argv]  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # one world size, under torchrun (or a process spawned below)
        return measure_world(args)
    failed = []
    for world in args.gpus:  # the driver: one run per world size, rows merged into --out
        say(f"--- world {world} ---")
        if args.dry_run and world == 1:
            measure_world(args)
        elif args.dry_run:
            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_spawned, args=(world, f"{tmp}/rendezvous", argv), nprocs=world, join=True)
        elif subprocess.run(torchrun_command(world, argv)).returncode:
            failed.append(world)
    results = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    print(table([r for r in results if r.get("dry_run", False) == args.dry_run and r["world"] in args.gpus]), flush=True)
    if failed:
        say(f"runs failed at world sizes {failed}")
    return 1 if failed else 0


def measure_world(args) -> int:
    """Measure every model at this process group's world size; rank 0 merges the rows into ``--out``."""
    rank, world, device = setup(args)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    env = common.environment(device)
    deadline = common.START + args.budget_s
    rows: list = []
    torch.manual_seed(0)
    try:
        for name in args.models:
            run_model((models.TINY if args.dry_run else models.MODELS)[name], args, world, device, dtype, rows, deadline)
        if rank == 0:
            merge(args.out, {**env, "world": world}, rows)
            say(f"wrote {args.out}")
        if dist.is_initialized():  # every rank done before any tears down (gloo aborted a peer otherwise, CI)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _spawned(rank: int, world: int, rendezvous: str, argv) -> None:
    """--dry-run: one of ``world`` local gloo processes (file rendezvous)."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    measure_world(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
