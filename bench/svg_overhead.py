"""What an SVG layer costs over its attention (issue 16): ``python bench/svg.py --overhead``.

For each shape, mode, density and step-path variant (``--variants``; ``after`` also at every
``--tiles`` x ``--programs-per-sm`` launch of the profiling kernel, ``before`` at the first of
each), three parts of one SVG layer decided on the device
(:class:`~sparse_vdit.methods.svg.SVG` with ``decide="device"``, the Triton select kernel), each
timed on the GPU alone (queued behind a sleep kernel, so the host's launch time is hidden as behind
a model's projections) and interleaved rep by rep (clock drift hits all three alike):

- ``attn``: :func:`~sparse_vdit.kernels.select_attention` with each input set's *own* choice
  (decided once beforehand): the attention alone, exactly the attention the layer runs;
- ``profile``: the decision alone (sampled rows, profiling kernel, merge, errors and choice);
- ``layer``: both, as the integration runs them.

Ratios: ``layer / attn`` (issue 16: <= 1.05 at 25% on Wan-1.3B 480p and Wan-14B 720p) and
``profile / attn`` (<= 3%); ``other`` = layer - attn - profile. Then, per variant, the CUDA kernels of
one layer call (torch.profiler, summed over the input sets): what runs, how often, how long.

Variants (the step path's switches; what cannot be switched back is always on):

- ``after``: the current path (the merge's rows per program shrink until the GPU gets two
  programs per SM; errors and choice in one Triton launch);
- ``before``: ``sampled.TUNING["merge_rows"] = 16`` and ``svg_profile.FUSED_CHOICE = False``
  (errors and argmin through six torch operations), as the merged issue-16 code ran them. Resident
  per-position ranges and the cached int8 flags stay on (host work and one small cast only).

``python bench/svg.py --kernel-sweep`` (:func:`kernel_sweep`): the profiling kernel at each
``--tiles`` (default :data:`SWEEP`) x ``--programs-per-sm``, the profile alone timed for every point
(interleaved, queued as above), each point's choice compared with the launch rule's on the same
inputs; then attention / profile / layer for the rule and the ``--finalists`` fastest points. Prints
the table and the fastest point as a ``LAUNCH_RULES`` entry.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from types import SimpleNamespace

import torch

import common
from sparse_vdit.kernels import select_attention
from sparse_vdit.methods import svg_profile
from sparse_vdit.methods.svg import SVG

VARIANTS = ("before", "after")
PARTS = ("attn", "profile", "layer")


@contextlib.contextmanager
def variant(name: str):
    """The step path's switches for one variant (restored after)."""
    from sparse_vdit.kernels.triton import sampled

    saved = dict(sampled.TUNING), svg_profile.FUSED_CHOICE
    if name == "before":
        sampled.TUNING.update(merge_rows=16)
        svg_profile.FUSED_CHOICE = False
    try:
        yield
    finally:
        sampled.TUNING.clear()
        sampled.TUNING.update(saved[0])
        svg_profile.FUSED_CHOICE = saved[1]


def interleaved(fns: dict, count: int, reps: int, on_gpu: bool, hold_cycles: int = 10_000_000) -> dict:
    """Median ms of each ``fns[name](i)`` (``i`` = input set), the parts alternating rep by rep.

    On the GPU each call is timed with CUDA events after a sleep kernel of ``hold_cycles`` (about
    5 ms), so that its launches are all queued before it starts (GPU time only); on the CPU (dry
    runs) with the host clock."""
    for name, fn in fns.items():  # warm-up: compilation, caches
        for i in range(count):
            fn(i)
    if on_gpu:
        torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for rep in range(reps):
        i = rep % count
        for name, fn in fns.items():
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(hold_cycles)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(i)
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_table(fn, count: int, on_gpu: bool, limit: int = 12) -> list[dict]:
    """The device kernels of ``fn(i)`` for every input set (torch.profiler): name, calls, total us."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for i in range(count):
            fn(i)
        if on_gpu:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if on_gpu:  # the kernels themselves (the aten ops that launch them have no self device time)
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
            if not us:
                continue
        else:
            us = e.self_cpu_time_total
        if not on_gpu and not e.key.startswith(("aten::", "sparse_vdit::")):
            continue
        rows.append({"kernel": e.key[:90], "calls": e.count, "us": float(us or 0)})
    rows.sort(key=lambda r: -r["us"])
    return rows[:limit]


def run(shapes: dict, args, device, dtype, record, over_budget, launch_setting) -> None:
    """Every (shape, mode, density, variant, programs per SM): the three parts and the kernel table."""
    on_gpu = device.type == "cuda"
    backend = "triton" if on_gpu else "reference"
    block = 16 if args.dry_run else common.BLOCK
    for name in args.shapes:
        shape = shapes[name]
        layout = shape.layout
        sets = common.random_sets(shape, args.sets, device, dtype)
        print(f"== overhead {name}: {layout.describe()}, {shape.heads} heads x {shape.dim}, select on {backend}",
              flush=True)  # fmt: skip
        for mode in args.modes:
            for density in args.densities:
                for var, tiles, per_sm in points(args):
                    if over_budget(f"overhead/{name}/{mode}/{density}/{var}/{tiles}/{per_sm}"):
                        return
                    with variant(var), launch_setting(tiles if on_gpu else None, per_sm if on_gpu else None):
                        one(shape, sets, mode, density, var, tiles, per_sm, args, block, backend, on_gpu, record)
        del sets
        if on_gpu:
            torch.cuda.empty_cache()


def points(args) -> list[tuple[str, str, int]]:
    """(variant, tiles, programs per SM) to run: ``before`` at the first of each (the old default
    launch), ``after`` at every ``--tiles`` x ``--programs-per-sm``."""
    first = (args.tiles[0], args.programs_per_sm[0])
    sweep = [(t, p) for t in args.tiles for p in args.programs_per_sm]
    return [(v, *point) for v in args.variants for point in (sweep if v == "after" else [first])]


def one(shape, sets, mode, density, var, tiles, per_sm, args, block, backend, on_gpu, record) -> None:
    layout = shape.layout
    svg = SVG(density, mode=mode, warmup_steps=0, warmup_layers=0, decide="device", block_size=block,
              profile_backend="triton" if on_gpu or "triton" in args.profile_backends else "torch")  # fmt: skip
    calls = [SimpleNamespace(step=0, layer=i, q=q, k=k, v=v, layout=layout) for i, (q, k, v) in enumerate(sets)]
    choices = [svg(c) for c in calls]  # each set's own choice: the attention the layer will run
    table = choices[0].table(layout, block, sets[0][0].device)

    def attend(i, choice):
        q, k, v = sets[i]
        return select_attention(q, k, v, table, choice.selected, backend=backend)

    fns = {"attn": lambda i: attend(i, choices[i]), "profile": lambda i: svg(calls[i]),
           "layer": lambda i: attend(i, svg(calls[i]))}  # fmt: skip
    ms = interleaved(fns, len(sets), args.reps, on_gpu)
    temporal = sum(int(c.selected.sum()) for c in choices) / sum(c.selected.numel() for c in choices)
    base = dict(shape=shape.name, tokens=layout.num_tokens, heads=shape.heads, dim=shape.dim, mode=mode,
                density=density, table_density=table.density, variant=var, tiles=tiles, programs_per_sm=per_sm,
                profile_backend=svg.last_profile_backend, temporal_share=temporal, reps=args.reps)  # fmt: skip
    for part in PARTS:
        record(**base, part=f"overhead-{part}", ms=ms[part], backend=backend)
    kernels = kernel_table(fns["layer"], len(sets), on_gpu)
    record(**base, part="overhead-kernels", kernels=kernels)
    print(f"  kernels of {len(sets)} layer calls ({var}, tiles {tiles}, {per_sm}/SM):", flush=True)
    for k in kernels:
        print(f"    {k['calls']:4d} x {k['us'] / k['calls']:9.1f} us  {k['kernel']}", flush=True)


def summarise(rows: list) -> list:
    """One line per (shape, mode, density, variant, programs per SM): the three parts and the ratios."""
    key = lambda r: (r["shape"], r["mode"], r["density"], r["variant"], r["tiles"], r["programs_per_sm"])  # noqa: E731
    timed = [r for r in rows if r.get("part", "").startswith("overhead-") and "ms" in r]
    out = []
    for k in dict.fromkeys(key(r) for r in timed):
        ms = {r["part"].removeprefix("overhead-"): r["ms"] for r in timed if key(r) == k}
        first = next(r for r in timed if key(r) == k)
        attn, profile, layer = ms["attn"], ms["profile"], ms["layer"]
        out.append(dict(zip(("shape", "mode", "density", "variant", "tiles", "programs_per_sm"), k), attn_ms=attn,
                        profile_ms=profile, layer_ms=layer, layer_over_attn=layer / attn, profile_share=profile / attn,
                        other_ms=layer - attn - profile, temporal_share=first["temporal_share"],
                        table_density=first["table_density"]))  # fmt: skip
    return out


def print_summary(summary: list) -> None:
    print(f"\n{'shape':14s} {'mode':9s} {'dens':>5s} {'variant':7s} {'tiles':>11s} {'/SM':>3s} {'attn ms':>9s} {'profile':>8s} "
          f"{'layer ms':>9s} {'layer/attn':>10s} {'profile/attn':>12s} {'other ms':>8s} {'temporal':>8s}")  # fmt: skip
    for s in summary:
        print(f"{s['shape']:14s} {s['mode']:9s} {s['density']:5.2f} {s['variant']:7s} {s['tiles']:>11s} {s['programs_per_sm']!s:>3s} "
              f"{s['attn_ms']:9.3f} {s['profile_ms']:8.3f} {s['layer_ms']:9.3f} {s['layer_over_attn']:10.3f} "
              f"{s['profile_share']:12.1%} {s['other_ms']:8.3f} {s['temporal_share']:8.0%}")  # fmt: skip


# --- the profiling kernel's launches (``--kernel-sweep``) ------------------------------------------

# Tiles (block_m,block_n,num_warps,num_stages) swept at each --programs-per-sm: the launch rule's tile
# (4 warps), 8 warps, and both with 64-key tiles. Compiled for sm_90 by Triton 3.9 (CPU, cuobjdump
# -res-usage; 254-255 registers each), bytes of stack (spills): 672, 0, 1832, 80. The H200 sweep of
# 2026-12-03 (bench/results/svg-kernel-sweep-h200.json) also timed kernel variants since removed
# (fold, hull, gate, lazy rescale, all at 8 warps): the fastest of them took 1.34x (Wan-1.3B, lazy)
# and 1.35x (Wan-14B, hull) the rule tile's profile; fold at 4 warps (an earlier run,
# svg-overhead-h200.json) 1.6-1.8x.
SWEEP = ("64,32,4,3", "64,32,8,3", "64,64,4,3", "64,64,8,3")
SWEEP_PROGRAMS = (1, 2, 4, 8)


def kernel_sweep(shapes: dict, args, device, dtype, record, over_budget, launch_setting) -> None:
    """Per shape: every (tiles, programs per SM) point's profile (sampled rows, kernel, merge, errors and
    choice) timed alone, all points interleaved rep by rep; then, for the launch rule and the
    ``--finalists`` fastest points, attention alone, profile and layer interleaved (as ``--overhead``).
    Each point's choice is compared with the launch rule's on the same inputs (``same_choice``)."""
    on_gpu = device.type == "cuda"
    backend = "triton" if on_gpu else "reference"
    block = 16 if args.dry_run else common.BLOCK
    points = [(tiles, per_sm) for tiles in args.tiles for per_sm in args.programs_per_sm]
    for name in args.shapes:
        if over_budget(f"kernel-sweep/{name}"):
            return
        shape = shapes[name]
        layout = shape.layout
        sets = common.random_sets(shape, args.sets, device, dtype)
        print(f"== kernel sweep {name}: {layout.describe()}, {shape.heads} heads x {shape.dim}, {len(points)} points",
              flush=True)  # fmt: skip
        for density in args.densities:
            svg = SVG(density, mode=args.modes[0], warmup_steps=0, warmup_layers=0, decide="device", block_size=block,
                      profile_backend="triton" if on_gpu or "triton" in args.profile_backends else "torch")  # fmt: skip
            calls = [SimpleNamespace(step=0, layer=i, q=q, k=k, v=v, layout=layout) for i, (q, k, v) in enumerate(sets)]
            rule = [svg(c) for c in calls]  # the launch rule's choices: every point must choose the same
            base = dict(shape=name, tokens=layout.num_tokens, heads=shape.heads, dim=shape.dim, mode=args.modes[0],
                        density=density, reps=args.reps, backend=backend)  # fmt: skip

            def profile_at(point):
                def fn(i):
                    with launch_setting(*point):
                        return svg(calls[i])
                return fn

            fns, same = {}, {}
            for point in points:  # compile and check each point before timing any
                if over_budget(f"kernel-sweep/{name}/{point}"):
                    break
                try:
                    chosen = [profile_at(point)(i) for i in range(len(calls))]
                except Exception as err:  # noqa: BLE001 - a point that does not compile or run: skipped, noted
                    print(f"  {point}: failed ({type(err).__name__}: {str(err)[:200]})", flush=True)
                    record(**base, part="kernel-sweep-failed", tiles=point[0], programs_per_sm=point[1],
                           error=f"{type(err).__name__}: {str(err)[:500]}")  # fmt: skip
                    continue
                same[point] = all(torch.equal(a.selected, b.selected) for a, b in zip(chosen, rule))
                fns[point] = profile_at(point)
            ms = interleaved(fns, len(sets), args.reps, on_gpu)
            for point, t in ms.items():
                record(**base, part="kernel-sweep-profile", tiles=point[0], programs_per_sm=point[1], ms=t,
                       same_choice=same[point])  # fmt: skip
            finalists = [(None, None)] + sorted(ms, key=ms.get)[: args.finalists]
            table = rule[0].table(layout, block, sets[0][0].device)
            for point in finalists:
                if over_budget(f"kernel-sweep/{name}/layer/{point}"):
                    break

                def attend(i, choice):
                    q, k, v = sets[i]
                    return select_attention(q, k, v, table, choice.selected, backend=backend)

                prof = profile_at(point)
                parts = {"attn": lambda i: attend(i, rule[i]), "profile": prof, "layer": lambda i: attend(i, prof(i))}
                timed = interleaved(parts, len(sets), args.reps, on_gpu)
                label = dict(tiles=point[0] or "rule", programs_per_sm=point[1])
                for part, t in timed.items():
                    record(**base, **label, part=f"kernel-layer-{part}", ms=t)
        del sets
        if on_gpu:
            torch.cuda.empty_cache()


def summarise_sweep(rows: list) -> list:
    """One line per (shape, density, tiles, programs per SM): the sweep's profile ms and, for
    the launch rule and the finalists, attention, profile and layer timed together (``layer_*``);
    ``profile_share`` divides by the shape's median attention time."""
    out = []
    keys = dict.fromkeys((r["shape"], r["density"]) for r in rows if r.get("part", "").startswith("kernel-"))
    for shape, density in keys:
        mine = [r for r in rows if r.get("shape") == shape and r.get("density") == density and "ms" in r]
        attn = [r["ms"] for r in mine if r["part"] == "kernel-layer-attn"]
        attn_ms = statistics.median(attn) if attn else None
        point = lambda r: (r["tiles"], r["programs_per_sm"])  # noqa: E731
        layer = {}
        for r in mine:
            if r["part"].startswith("kernel-layer-"):
                layer.setdefault(point(r), {})[r["part"].removeprefix("kernel-layer-")] = r["ms"]
        swept = {point(r): r for r in mine if r["part"] == "kernel-sweep-profile"}
        for key in dict.fromkeys([*swept, *layer]):
            own = layer.get(key, {})
            profile = swept[key]["ms"] if key in swept else own.get("profile")
            if profile is None:
                continue
            out.append(dict(shape=shape, density=density, tiles=key[0], programs_per_sm=key[1],
                            profile_ms=profile, attn_ms=attn_ms, profile_share=attn_ms and profile / attn_ms,
                            layer_attn_ms=own.get("attn"), layer_profile_ms=own.get("profile"), layer_ms=own.get("layer"),
                            layer_over_attn=own["layer"] / own["attn"] if "layer" in own and "attn" in own else None,
                            same_choice=swept[key]["same_choice"] if key in swept else True))  # fmt: skip
    return out


def print_sweep(summary: list) -> None:
    print(f"\n{'shape':14s} {'dens':>5s} {'tiles':>10s} {'/SM':>4s} {'profile ms':>10s} {'attn ms':>9s} "
          f"{'prof/attn':>9s} {'layer/attn':>10s} {'same':>5s}")  # fmt: skip
    f = lambda x, spec: "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)  # noqa: E731
    for s in sorted(summary, key=lambda s: (s["shape"], s["density"], s["profile_ms"])):
        print(f"{s['shape']:14s} {s['density']:5.2f} {s['tiles']:>10s} {s['programs_per_sm']!s:>4s} "
              f"{s['profile_ms']:10.3f} {f(s['attn_ms'], '9.3f')} {f(s['profile_share'], '9.1%')} "
              f"{f(s['layer_over_attn'], '10.3f')} {s['same_choice']!s:>5s}")  # fmt: skip
    print("\nfastest profile per shape (a LAUNCH_RULES entry in sparse_vdit/kernels/triton/sampled.py):")
    for shape in dict.fromkeys(s["shape"] for s in summary):
        best = min((s for s in summary if s["shape"] == shape and s["tiles"] != "rule" and s["same_choice"]),
                   key=lambda s: s["profile_ms"], default=None)  # fmt: skip
        if best:
            tiles = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), best["tiles"].split(",")))
            print(f"  {shape}: dict(" + "".join(f"{k}={v}, " for k, v in tiles.items() if best["tiles"] != "default")
                  + f"programs_per_sm={best['programs_per_sm']})  # profile {best['profile_ms']:.3f} ms, "
                  + f"{f(best['profile_share'], '0.1%')} of attention")
