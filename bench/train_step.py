"""One training step of real-size video transformers with a sparse plan in place: what fine-tuning pays (#18).

    python bench/train_step.py [--models wan-1.3b] [--modes eager,compiled] [--densities 0.25,0.1]
                               [--trainable attention|all] [--no-checkpointing] [--no-unpatched] [--repeats 3]
                               [--profile DIR]
    python bench/train_step.py --dry-run          # tiny models on the CPU (results to a temp file)

Models as in ``bench/e2e.py`` (published configs, random weights, bf16, no download). A step is the
forward, an MSE loss against a fixed random target and the backward; no optimizer update (the same
in every variant). ``--trainable attention`` (default): only the weights of ``to_q``, ``to_k``,
``to_v`` and ``to_out.0`` train, the layers a LoRA adapts, so gradients flow through every block as
in LoRA fine-tuning; ``all``: every parameter. Gradient checkpointing is on unless
``--no-checkpointing`` (real sizes need it: the backward reruns each block's forward, the sparse
attention included). Variants in each mode (``eager``; ``compiled``: every block compiled, fullgraph):
``unpatched`` (diffusers' SDPA, cuDNN first), ``dense`` (our integration, dense plan) and
``sparse-NN`` (``models.mixed_plan`` at NN% attention density). Reported: median step time over
``--repeats`` after one warm-up (CUDA events), peak memory of a step, speedup against ``unpatched``
and ``dense``. Results merge into ``--out`` by (model, mode, variant, trainable, checkpointing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import (START, device_and_dtype, environment, merge_results, out_of_memory_said, profile_to,  # noqa: E402
                    results_path, say)
from models import (MODELS, TINY, build, compile_blocks, cudnn_first, layout_of, make_inputs, mixed_plan,  # noqa: E402
                    mode_names, model_names, transformer_blocks)

import sparse_vdit  # noqa: E402
from sparse_vdit import Plan  # noqa: E402
from sparse_vdit.integrations.diffusers import model_spec  # noqa: E402
from sparse_vdit.timing import clock, seconds_between  # noqa: E402

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def set_trainable(model, which: str) -> int:
    """``attention``: the weights of the attention projections train (LoRA's usual targets), ``all``: every
    parameter; the rest frozen. Returns the number of trainable parameters."""
    model.requires_grad_(which == "all")
    if which == "attention":
        for name, module in model.named_modules():
            if name.endswith(ATTENTION_PROJECTIONS) and isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not count:
        raise ValueError(f"no parameter of {type(model).__name__} is trainable with --trainable {which}")
    return count


def train_step(model, inputs: dict, target: torch.Tensor) -> None:
    """Forward, MSE loss against ``target``, backward (gradients of the last step dropped first)."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    torch.nn.functional.mse_loss(out.float(), target).backward()


def measure(model, inputs: dict, target: torch.Tensor, repeats: int, trace: Path | None = None) -> dict:
    """One warm-up step (compilation, tables), then ``repeats`` timed ones: median seconds and peak memory.
    ``trace``: one more step under torch.profiler, its operator tables written there."""
    hidden = inputs["hidden_states"]
    cuda = hidden.device.type == "cuda"
    times = []
    with cudnn_first() if cuda else contextlib.nullcontext():
        for i in range(repeats + 1):
            if cuda and i == 1:
                torch.cuda.reset_peak_memory_stats(hidden.device)
            start = clock(hidden)
            train_step(model, inputs, target)
            if i:
                times.append(seconds_between(start, clock(hidden)))
        if trace is not None:
            profile_to(trace, lambda: train_step(model, inputs, target), trace.stem)
    peak = torch.cuda.max_memory_allocated(hidden.device) / 2**30 if cuda else None
    return {"seconds": statistics.median(times), "all_seconds": times, "peak_gib": peak}


def run_model(name: str, args, device, dtype, rows: list, deadline: float) -> None:
    bench = (TINY if args.dry_run else MODELS)[name]
    say(f"{name}: building {bench.cls} ({'tiny' if args.dry_run else 'published config'}) on {device}")
    model = build(bench, device, dtype)
    inputs = make_inputs(bench, model, device, dtype)
    model.train()
    trainable = set_trainable(model, args.trainable)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    with torch.no_grad():
        shape = model(**inputs)[0].shape
    target = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(2), device=device)
    spec, layout = model_spec(model), layout_of(bench, model, inputs)
    probe = torch.empty(1, 1, 1, model.config.attention_head_dim, device=device, dtype=dtype)
    backend = sparse_vdit.kernels.resolve_backend(args.backend, probe)
    plans = {"dense": Plan.dense(spec, block_size=args.block_size)} if args.dense else {}
    for d in args.densities:
        plans[f"sparse-{round(d * 100):02d}"] = mixed_plan(spec, layout, d, args.block_size, seed=bench.seed)
    say(f"{name}: {trainable / 1e6:.1f}M trainable ({args.trainable}), checkpointing {args.checkpointing}, layout "
        f"{layout.describe()}; plans " + ", ".join(f"{k} {p.density(layout):.1%}" for k, p in plans.items()))
    for mode in args.modes:
        if mode == "compiled":
            torch._dynamo.reset()
            compile_blocks(model, "inductor")
        try:
            base: dict = {}
            variants = [("unpatched", None)] * args.unpatched + list(plans.items())
            for variant, plan in variants:
                if rows and rows[-1]["seconds"] * (args.repeats + 1) + time.perf_counter() > deadline:
                    say(f"{name} {mode}: {variant} and after skipped (budget)")
                    break
                if plan is not None:
                    sparse_vdit.apply(model, plan, backend=args.backend)
                try:
                    trace = None if args.profile is None else args.profile / f"{name}-{mode}-{variant}.txt"
                    result = measure(model, inputs, target, args.repeats, trace)
                finally:
                    if plan is not None:
                        sparse_vdit.remove(model)
                        sparse_vdit.clear_caches()
                row = {"model": name, "mode": mode, "variant": variant, "trainable": args.trainable,
                       "checkpointing": args.checkpointing, "density": 1.0 if plan is None else plan.density(layout),
                       "backend": None if plan is None else backend, "dry_run": args.dry_run, **result}  # fmt: skip
                base.setdefault(variant, result["seconds"])
                for ref in ("unpatched", "dense"):
                    if ref in base:
                        row[f"speedup_vs_{ref}"] = base[ref] / result["seconds"]
                rows.append(row)
                say(f"{name} {mode} {variant}: {result['seconds'] * 1e3:.1f} ms a step")
        finally:
            if mode == "compiled":
                for block in transformer_blocks(model):
                    block._compiled_call_impl = None
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list) -> str:
    head = (f"{'model':<13} {'mode':<9} {'variant':<10} {'density':>8} {'ms/step':>10} {'peak GiB':>9} "
            f"{'x unpatched':>12} {'x dense':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        vs_u = f"{r['speedup_vs_unpatched']:.2f}" if "speedup_vs_unpatched" in r else ""
        vs_d = f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else ""
        lines.append(f"{r['model']:<13} {r['mode']:<9} {r['variant']:<10} {r['density']:>8.1%} "
                     f"{r['seconds'] * 1e3:>10.1f} {peak:>9} {vs_u:>12} {vs_d:>8}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="wan-1.3b", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--modes", default=None, help="eager,compiled (default both; eager only with --dry-run)")
    p.add_argument("--densities", default="0.25,0.1")
    p.add_argument("--trainable", choices=("attention", "all"), default="attention")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--no-unpatched", dest="unpatched", action="store_false",
                   help="no unpatched row (HunyuanVideo's masked SDPA trains far slower than our dense plan)")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="no dense-plan row (sparse rows only, e.g. where one call cannot hold every variant)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant, after one warm-up")
    p.add_argument("--backend", default="auto", help="sparse backend of our integration")
    p.add_argument("--block-size", type=int, default=sparse_vdit.block_table.DEFAULT_BLOCK)
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results/train_step.json; a temp file with --dry-run)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this long")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (fp32), to check the script")
    p.add_argument("--profile", type=Path, default=None,
                   help="folder: after each variant's timing, one more step under torch.profiler (operator tables)")
    args = p.parse_args(argv)
    args.models = model_names(p, args.models)
    args.modes = mode_names(p, args.modes, args.dry_run)
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    if any(not 0 < d < 1 for d in args.densities):
        p.error("--densities are shares of the attention, between 0 and 1")
    if args.dry_run:
        args.block_size = min(args.block_size, 16)
    args.out = args.out or results_path("train_step", args.dry_run)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.dry_run, "bench/train_step.py")
    env = environment(device)
    say(f"train_step on {env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}; "
        f"models {args.models}, modes {args.modes}, densities {args.densities}")
    rows: list = []
    for name in args.models:
        with out_of_memory_said(name):
            run_model(name, args, device, dtype, rows, START + args.budget_s)
    results = merge_results(args.out, env, rows,
                            key=lambda r: (r["model"], r["mode"], r["variant"], r["trainable"], r["checkpointing"],
                                           r.get("dry_run")))  # fmt: skip
    say(f"wrote {args.out}")
    print(table([r for r in results if r.get("dry_run", False) == args.dry_run]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
