"""SVG at the attention level: profiling overhead, and our fast path against FlexAttention.

    python bench/svg.py [--shapes wan14b-720p ...] [--densities 0.3 0.25 0.2] [--rows 64]
                        [--profile-backends triton torch] [--chunks 16777216] [--out DIR] [--budget-s 480]
                        [--tiles default 16,32,4,2 ...] [--programs-per-sm 4 8 ...]
    python bench/svg.py --dry-run      # tiny shapes on the CPU, reference backend for both paths
                                       # (the fused Triton profile through TRITON_INTERPRET=1)
    python bench/svg.py --overhead [--variants before after] [--programs-per-sm 2 4 8] [--reps 15]
                                       # the layer over its attention, interleaved: bench/svg_overhead.py
    python bench/svg.py --kernel-sweep [--tiles 64,32,4,3 ...] [--programs-per-sm 1 2 4 8] [--finalists 3]
                                       # the profiling kernel's tiles x programs per SM: profile alone
                                       # for each, then the layer for the rule and the fastest

Launch sweep of the fused profiling kernel (next GPU session, H100; Wan-14B 720p, where the
4.1 ms profile must come under 3% of the attention): 5 tiles x 5 targets = 25 points, every part
timed at each (~5 s a point plus one Triton compile per tile: about 3 min):

    python bench/svg.py --shapes wan14b-720p --densities 0.25 --profile-backends triton \
        --programs-per-sm 2 4 8 16 32 --tiles default 32,64,8,2 32,32,4,2 16,32,4,2 16,64,4,3 \
        --budget-s 420 --out $OUT

then read ``summary`` (or the printed table): ``profile_kernel_ms`` against ``profile_merge_ms``
and ``profile_other_ms`` per point, with each row's ``launch`` (grid, splits, programs per SM).

For each shape of ``bench/attention.py`` (random bf16 q/k/v, batch 1, rotated input sets), each
``--modes`` (``reference``, the default: the authors' masks, sink, rows; ``ours``) and each
density, one SVG layer call (no warm-up) is timed in parts, CUDA events, median:

- ``profile``: :meth:`SVG.classify` alone, the sampled rows' exact and masked attention (the
  GPU time the classification adds; the issue's target is <= 3% of the attention at Wan-14B 720p),
  through the fused Triton pass and through the torch path (``--profile-backends``), timed from
  an idle GPU: when the host takes longer to issue it than the GPU to run it, that shows here;
- ``profile-queued`` (GPU only): the same, issued while a sleep kernel keeps the GPU busy, as the
  projections before attention do in a model: the GPU time alone (:func:`queued_time`);
- ``profile-kernel`` / ``profile-fused`` (Triton path only): the launches of
  ``sampled_rows_fwd`` that ``profile`` made, replayed alone with the same arguments, and the
  whole fused ``sampled_outputs`` call (kernel, partial buffers, the merge of the key splits)
  replayed the same way; the summary splits ``profile`` into kernel, merge (fused -
  kernel) and other (profile - fused: row sampling, key-block ranges, errors);
- ``decide``: the whole pattern-source call, i.e. ``profile`` plus the host sync and the table
  choice (the GPU idles while the host decides);
- ``decide-device``: the same call deciding on the device (``decide="device"``: a
  :class:`~sparse_vdit.patterns.HeadChoice`, no host sync);
- ``attn-select`` / ``layer-device``: :func:`~sparse_vdit.kernels.select_attention` on the
  Triton backend with both candidate tables resident and the choice read by the kernel, alone and
  after ``decide-device`` (the path the integration takes with ``backend="triton"``);
  ``attn-select-fa4`` / ``layer-device-fa4`` (when the fast path is FA4): the same through FA4
  with ``fa4.SELECT_ON_DEVICE`` (block tensors gathered and heads permuted on the device);
- ``attn-<backend>``: ``sparse_attention`` with the chosen mixed table (spatial heads frame-major,
  temporal heads token-major, one launch), through the fast path (``auto``: FA4 on Hopper) and
  through FlexAttention with the same table (the issue's target: fast >= 1.5x flex);
- ``layer-<backend>``: ``decide`` followed by the attention, as the integration runs it;
- ``cudnn-dense``: dense cuDNN SDPA, the bar.

Each ``attn-*`` part runs, for each input set, the choice that set's own layer makes (they all ran
the first set's before: random sets can choose differently, e.g. Wan-14B 720p in mode ``ours``, 8
heads on the CPU: 0%, 88% and 62% temporal heads in three sets, and token-major heads cost the
kernel more than frame-major ones).

Random data gives near-uniform attention, so the spatial/temporal mix is whatever the
classifier picks (reported as ``temporal_share``); timings depend on it only through the
permutation of the temporal heads. ``--chunks`` (torch path), ``--rows``, and on the Triton path
``--tiles`` (block_m,block_n,warps,stages; 0 = that field's default, ``default`` = all) crossed
with ``--programs-per-sm`` (the key splits' target, ``sampled.TUNING["programs_per_sm"]``) sweep
the classifier's settings; every timed row records ``tiles``, ``programs_per_sm`` (None on the
torch path) and the kernel's actual ``launch`` (grid, tile, splits, programs per SM).
Writes ``svg.json`` to ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:  # before triton.jit: dry runs interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import sparse_vdit
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.kernels import fa4 as fa4_backend
from sparse_vdit.kernels import resolve_backend, select_attention
from sparse_vdit.kernels.dense import sdpa
from sparse_vdit.methods.svg import DEFAULT_CHUNK, MODES, SVG


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling bench scripts
import common  # noqa: E402  (the bench library: shapes, timer, version report)
import svg_overhead  # noqa: E402  (--overhead)
BLOCK = common.BLOCK
DRY_SHAPES = {  # --dry-run: small, awkward layouts (text, ragged blocks), block 16
    "tiny-video": common.Shape("tiny-video", VideoLayout(5, 6, 10), 3, 32),
    "tiny-text": common.Shape("tiny-text", VideoLayout(4, 6, 7, 19, "suffix"), 3, 32),
}


def queued_time(fn, sets, reps: int = 20, hold_cycles: int = 10_000_000):
    """Median GPU ms of ``fn(*set)`` issued while the GPU is still busy (a sleep kernel of
    ``hold_cycles``, ~5 ms at 2 GHz, before each start event), as in a model where the projections
    before attention keep the GPU busy: the host's launch time is hidden, the GPU's own time counts."""
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(hold_cycles)
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), None, reps


TILE_KEYS = ("block_m", "block_n", "num_warps", "num_stages")


def parse_tiles(spec: str) -> str:
    """``--tiles`` value: ``default`` or four ints (0 = that field's default), normalised."""
    if spec == "default":
        return spec
    values = [int(x) for x in spec.split(",")]
    if len(values) != 4 or min(values) < 0:
        raise ValueError(f"tiles {spec!r}: want block_m,block_n,num_warps,num_stages (0 = default) or 'default'")
    return ",".join(map(str, values))


@contextlib.contextmanager
def launch_setting(tiles: str | None, programs_per_sm: int | None):
    """The fused kernel's ``TUNING`` for one sweep point (restored after); nothing on the torch path."""
    if tiles is None and programs_per_sm is None:
        yield
        return
    from sparse_vdit.kernels.triton import sampled

    saved = dict(sampled.TUNING)
    values = [None] * 4 if tiles == "default" else [int(x) or None for x in tiles.split(",")]
    sampled.TUNING.update(zip(TILE_KEYS, values), programs_per_sm=programs_per_sm)
    try:
        yield
    finally:
        sampled.TUNING.clear()
        sampled.TUNING.update(saved)


@contextlib.contextmanager
def capture_fused():
    """Records, while active, each fused ``sampled_outputs`` call and each ``sampled_rows_fwd`` launch
    (the module attributes are looked up at call time, so patching them sees every call)."""
    from sparse_vdit.kernels.triton import sampled

    kernel, fused = sampled.sampled_rows_fwd, sampled.sampled_outputs
    seen = SimpleNamespace(launches=[], calls=[])

    class Kernel:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.launches.append((grid, a, kw))
                return kernel[grid](*a, **kw)

            return launch

    def outputs(*a, **kw):
        seen.calls.append((a, kw))
        return fused(*a, **kw)

    sampled.sampled_rows_fwd, sampled.sampled_outputs = Kernel(), outputs
    try:
        yield seen
    finally:
        sampled.sampled_rows_fwd, sampled.sampled_outputs = kernel, fused


def replay_parts(svg, sets, layout, device) -> tuple[dict, dict]:
    """The Triton path's sub-parts of ``profile`` (timed by replaying what one classify per input set
    launched), and the launch geometry of the first set's kernel."""
    from sparse_vdit.kernels.triton import sampled

    launches, calls = [], []  # replay sets (q, what was captured): a timer reads the device off the first item
    for q, k, v in sets:
        with capture_fused() as seen:
            svg.classify(q, k, v, layout, 0, 0)
        launches.append((q, seen.launches))
        calls.append((q, seen.calls))
    if not all(ls for _, ls in launches):
        return {}, {}

    def kernel(_, ls):
        for grid, a, kw in ls:
            sampled.sampled_rows_fwd[grid](*a, **kw)

    def fused(_, cs):
        for a, kw in cs:
            sampled.sampled_outputs(*a, **kw)

    grid, _, kw = launches[0][1][0]
    programs = grid[0] * grid[1] * grid[2]
    launch = dict(grid=list(grid), block_m=kw["BLOCK_M"], block_n=kw["BLOCK_N"], num_warps=kw.get("num_warps"),
                  num_stages=kw.get("num_stages"), splits=grid[2], programs=programs)  # fmt: skip
    if device.type == "cuda":
        launch["programs_per_sm"] = programs / torch.cuda.get_device_properties(device).multi_processor_count
    return {"profile-kernel": (kernel, launches), "profile-fused": (fused, calls)}, launch


def run_shape(shape, args, device, dtype, record, over_budget) -> None:
    layout = shape.layout
    sets = common.random_sets(shape, args.sets, device, dtype)
    timer = lambda fn, s: common.time_fn(fn, s, target_ms=args.target_ms)  # noqa: E731 - CPU too (dry runs)
    fast = "reference" if args.dry_run else resolve_backend("auto", sets[0][0])
    flex = "reference" if args.dry_run else "flex"
    print(f"== {shape.name}: {layout.describe()}, {shape.heads} heads x {shape.dim}; fast path {fast!r}", flush=True)
    base = dict(shape=shape.name, tokens=layout.num_tokens, heads=shape.heads, dim=shape.dim)
    ms, _, _ = timer(lambda q, k, v: sdpa(q, k, v, shape.dim**-0.5), sets)
    record(**base, part="cudnn-dense", ms=ms)
    launches = [(t, p) for t in args.tiles for p in args.programs_per_sm]  # the Triton path's sweep
    settings = [(pb, c, t, p) for pb in args.profile_backends
                for c, t, p in ([(c, None, None) for c in args.chunks] if pb == "torch" else [(0, *x) for x in launches])]
    for mode in args.modes:
        for density in args.densities:
            for rows in args.rows:
                for profile_backend, chunk, tiles, per_sm in settings:
                    if over_budget(f"{shape.name}/{mode}/{density}/{rows}/{profile_backend}/{chunk}/{tiles}/{per_sm}"):
                        return
                    with launch_setting(tiles, per_sm):
                        run_setting(shape, args, device, sets, record, density, rows, profile_backend, chunk, tiles,
                                    per_sm, dict(base, mode=mode), fast, flex)  # fmt: skip
    del sets
    if device.type == "cuda":
        sparse_vdit.clear_caches()
        torch.cuda.empty_cache()


def run_setting(shape, args, device, sets, record, density, rows, profile_backend, chunk, tiles, per_sm, base,
                fast, flex) -> None:  # fmt: skip
    """One SVG configuration (and launch setting, on the Triton path): every part timed."""
    layout = shape.layout
    block = 16 if args.dry_run else BLOCK
    timer = lambda fn, s: common.time_fn(fn, s, target_ms=args.target_ms)  # noqa: E731 - CPU too (dry runs)
    row = dict(base, density=density, rows=rows, chunk=chunk, profile_backend=profile_backend, tiles=tiles,
               programs_per_sm=per_sm)  # fmt: skip
    try:
        options = dict(mode=base["mode"], warmup_steps=0, warmup_layers=0, sampled_rows=rows, block_size=block,
                       profile_backend=profile_backend, chunk=chunk or DEFAULT_CHUNK)  # fmt: skip
        svg = SVG(density, **options)
        on_device = SVG(density, decide="device", **options)
        calls = [SimpleNamespace(step=0, layer=i, q=q, k=k, v=v, layout=layout) for i, (q, k, v) in enumerate(sets)]
        patterns = svg(calls[0])
        table = compile_layer(patterns, layout, block, device)
        replays, launch = replay_parts(svg, sets, layout, device) if svg.last_profile_backend == "triton" else ({}, {})
    except Exception as exc:  # noqa: BLE001 - a tile that does not compile, say: reported, not fatal
        print(f"  {shape.name} {tiles} x{per_sm}: {type(exc).__name__}: {exc}", flush=True)
        record(**row, part="profile", error=str(exc)[:300])
        return
    row = dict(base, density=density, table_density=table.density, rows=rows, chunk=chunk,
               profile_backend=svg.last_profile_backend, tiles=tiles, programs_per_sm=per_sm,
               temporal_share=len(table.token_major_heads) / shape.heads)  # fmt: skip
    if launch:
        row["launch"] = launch
    index = {id(c.q): c for c in calls}
    # the attention alone runs each set's own choice (the one its layer makes): random inputs of
    # several sets may choose differently, and temporal heads cost more than spatial ones
    tables = {id(c.q): compile_layer(svg(c), layout, block, device) for c in calls}
    choices = {id(c.q): on_device(c) for c in calls}
    parts = {"profile": (lambda q, k, v: svg.classify(q, k, v, layout, 0, 0), sets)}
    if not args.dry_run:
        parts["profile-queued"] = (lambda q, k, v: svg.classify(q, k, v, layout, 0, 0), sets)
    parts.update(replays)
    parts["decide"] = (lambda q, k, v: svg(index[id(q)]), sets)
    backends = {"fast": fast, "flex": flex}
    for name, backend in backends.items():
        parts[f"attn-{name}"] = (lambda q, k, v, b=backend: sparse_attention(q, k, v, tables[id(q)], backend=b), sets)
        parts[f"layer-{name}"] = (lambda q, k, v, b=backend: sparse_attention(
            q, k, v, compile_layer(svg(index[id(q)]), layout, block, device), backend=b), sets)  # fmt: skip
    parts["decide-device"] = (lambda q, k, v: on_device(index[id(q)]), sets)
    backends["select"] = backends["device"] = select = "reference" if args.dry_run else "triton"
    parts["attn-select"] = (lambda q, k, v: chosen(q, k, v, choices[id(q)], layout, block, select), sets)
    parts["layer-device"] = (lambda q, k, v: chosen(q, k, v, on_device(index[id(q)]), layout, block, select), sets)
    if fast == "fa4":  # FA4 with the choice kept on the device too (fa4.SELECT_ON_DEVICE)
        backends["select-fa4"] = backends["device-fa4"] = "fa4"
        parts["attn-select-fa4"] = (lambda q, k, v: fa4_on_device(q, k, v, choices[id(q)], layout, block), sets)
        parts["layer-device-fa4"] = (lambda q, k, v: fa4_on_device(q, k, v, on_device(index[id(q)]), layout, block),
                                     sets)  # fmt: skip
    for part, (fn, inputs) in parts.items():
        try:
            ms, _, _ = (queued_time if part == "profile-queued" else timer)(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            print(f"  {part}: {type(exc).__name__}: {exc}", flush=True)
            record(**row, part=part, error=str(exc)[:300])
            continue
        record(**row, part=part, ms=ms, backend=backends.get(part.partition("-")[2]))


def chosen(q, k, v, choice, layout, block, backend):
    """The attention of a :class:`~sparse_vdit.patterns.HeadChoice` as the integration runs it."""
    return select_attention(q, k, v, choice.table(layout, block, q.device), choice.selected, backend=backend)


def fa4_on_device(q, k, v, choice, layout, block):
    """select_attention through FA4 with the choice read on the device (the option restored after)."""
    saved, fa4_backend.SELECT_ON_DEVICE = fa4_backend.SELECT_ON_DEVICE, True
    try:
        return chosen(q, k, v, choice, layout, block, "fa4")
    finally:
        fa4_backend.SELECT_ON_DEVICE = saved


def _key(r: dict) -> tuple:
    return (r["shape"], r.get("mode"), r.get("density"), r.get("rows"), r.get("profile_backend"), r.get("chunk"), r.get("tiles"),
            r.get("programs_per_sm"))  # fmt: skip


def summarise(rows: list) -> list:
    """One line per (shape, density, rows, profile backend, chunk, tiles, programs per SM) whose
    profile was timed: the ratios the targets are about, and the profile split into kernel, merge
    and the rest (Triton path; None on the torch path)."""
    out = []
    for key in dict.fromkeys(_key(r) for r in rows if "density" in r):
        shape, mode, density, n_rows, profile_backend, chunk, tiles, per_sm = key
        ms = {r["part"]: r["ms"] for r in rows if _key(r) == key and "ms" in r}
        if "profile" not in ms:  # failed (its rows say why); bench/report.py wants numbers
            continue
        dense = next((r["ms"] for r in rows if r["shape"] == shape and r["part"] == "cudnn-dense"), None)
        attn = ms.get("attn-fast")
        kernel, fused = ms.get("profile-kernel"), ms.get("profile-fused")

        def ratio(a, b):
            return None if a is None or not b else a / b

        out.append(dict(shape=shape, mode=mode, density=density, rows=n_rows, profile_backend=profile_backend, chunk=chunk,
                        tiles=tiles, programs_per_sm=per_sm,
                        attn_fast_ms=attn, profile_ms=ms.get("profile"), profile_queued_ms=ms.get("profile-queued"),
                        profile_kernel_ms=kernel, profile_merge_ms=None if None in (kernel, fused) else fused - kernel,
                        profile_other_ms=None if fused is None else ms["profile"] - fused,
                        profile_share=ratio(ms.get("profile"), attn),
                        profile_queued_share=ratio(ms.get("profile-queued"), attn),
                        layer_overhead=ratio(ms.get("layer-fast"), attn) and ratio(ms.get("layer-fast"), attn) - 1,
                        attn_select_ms=ms.get("attn-select"), layer_device_ms=ms.get("layer-device"),
                        layer_device_overhead=ratio(ms.get("layer-device"), ms.get("attn-select"))
                        and ratio(ms.get("layer-device"), ms.get("attn-select")) - 1,
                        layer_device_over_fast_attn=ratio(ms.get("layer-device"), attn),
                        attn_select_fa4_ms=ms.get("attn-select-fa4"), layer_device_fa4_ms=ms.get("layer-device-fa4"),
                        layer_device_fa4_over_fast_attn=ratio(ms.get("layer-device-fa4"), attn),
                        flex_over_fast=ratio(ms.get("attn-flex"), attn),
                        layer_flex_over_fast=ratio(ms.get("layer-flex"), ms.get("layer-fast")),
                        speedup_vs_cudnn=ratio(dense, ms.get("layer-fast"))))  # fmt: skip
    return out


def print_summary(summary: list) -> None:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-".rjust(int(fmt.split(".")[0] or 0))

    print(f"\n{'shape':18s} {'mode':9s} {'dens':>5s} {'rows':>4s} {'profile on':>10s} {'chunk':>9s} {'tiles':>11s} {'/SM':>3s} "
          f"{'prof ms':>7s} {'queued':>7s} {'kernel':>7s} {'merge':>7s} {'other':>7s} {'attn ms':>8s} {'profile':>8s} "
          f"{'queued':>7s} "
          f"{'layer+':>7s} {'flex/fast':>9s} {'layer flex/fast':>15s} {'x cudnn':>7s} {'select':>7s} {'dev layer+':>10s} "
          f"{'dev/attn':>8s}")  # fmt: skip
    for s in summary:
        print(f"{s['shape']:18s} {str(s['mode']):9s} {s['density']:5.2f} {s['rows']:4d} {str(s['profile_backend']):>10s} {s['chunk']:9d} "
              f"{str(s['tiles'] or '-'):>11s} {str(s['programs_per_sm'] or '-'):>3s} {f(s['profile_ms'], '7.3f')} "
              f"{f(s.get('profile_queued_ms'), '7.3f')} "
              f"{f(s['profile_kernel_ms'], '7.3f')} {f(s['profile_merge_ms'], '7.3f')} {f(s['profile_other_ms'], '7.3f')} "
              f"{f(s['attn_fast_ms'], '8.3f')} "
              f"{f(s['profile_share'], '8.1%')} {f(s.get('profile_queued_share'), '7.1%')} {f(s['layer_overhead'], '7.1%')} {f(s['flex_over_fast'], '9.2f')} "
              f"{f(s['layer_flex_over_fast'], '15.2f')} {f(s['speedup_vs_cudnn'], '7.2f')} "
              f"{f(s['attn_select_ms'], '7.3f')} {f(s['layer_device_overhead'], '10.1%')} "
              f"{f(s['layer_device_over_fast_attn'], '8.2f')}")  # fmt: skip


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=None, help=f"of {', '.join(common.SHAPES)} (default all)")
    p.add_argument("--modes", nargs="*", default=["reference"], choices=list(MODES), help="SVG modes")
    p.add_argument("--densities", nargs="*", type=float, default=None, help="default 0.3 0.25 0.2 (--overhead: 0.25)")
    p.add_argument("--rows", nargs="*", type=int, default=[64], help="sampled rows per call")
    p.add_argument("--profile-backends", nargs="*", default=["triton", "torch"], choices=["triton", "torch"])
    p.add_argument("--chunks", nargs="*", type=int, default=[DEFAULT_CHUNK], help="torch path: score elements at once")
    p.add_argument("--tiles", nargs="*", default=None,
                   help="Triton path, swept: block_m,block_n,num_warps,num_stages (0 = default) or 'default' "
                        "(default: 'default'; --kernel-sweep: bench/svg_overhead.py's SWEEP)")
    p.add_argument("--programs-per-sm", nargs="*", type=int, default=None,
                   help="Triton path, swept (crossed with --tiles): the key splits' target programs per SM")
    p.add_argument("--sets", type=int, default=3, help="rotated input sets")
    p.add_argument("--target-ms", type=float, default=300.0)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting rows after this long")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, reference backend (checks the script)")
    p.add_argument("--overhead", action="store_true",
                   help="the layer over its attention, interleaved (bench/svg_overhead.py; default shapes: Wan-1.3B "
                        "480p and Wan-14B 720p, density 0.25)")  # fmt: skip
    p.add_argument("--variants", nargs="*", default=list(svg_overhead.VARIANTS), choices=list(svg_overhead.VARIANTS),
                   help="--overhead: the step path's variants")  # fmt: skip
    p.add_argument("--reps", type=int, default=15, help="--overhead: timed calls of each part")
    p.add_argument("--kernel-sweep", action="store_true",
                   help="the profiling kernel's --tiles x --programs-per-sm (default 1 2 4 8), profile timed alone, then "
                        "attention / profile / layer for the launch rule and the --finalists fastest (bench/svg_overhead.py)")
    p.add_argument("--finalists", type=int, default=3, help="--kernel-sweep: fastest points timed with the layer")
    args = p.parse_args(argv)
    if args.kernel_sweep:
        args.overhead = True
        args.tiles = args.tiles or list(svg_overhead.SWEEP)
        args.programs_per_sm = args.programs_per_sm or list(svg_overhead.SWEEP_PROGRAMS)
    if args.densities is None:
        args.densities = [0.25] if args.overhead else [0.3, 0.25, 0.2]
    try:
        args.tiles = list(dict.fromkeys(parse_tiles(t) for t in args.tiles or ["default"]))
    except ValueError as err:
        p.error(str(err))
    try:
        from sparse_vdit.kernels.triton.sampled import PROGRAMS_PER_SM as default  # the kernel's
    except ImportError:  # no triton: the torch path only, where it means nothing
        default = 1
    args.programs_per_sm = list(dict.fromkeys(args.programs_per_sm or [default]))
    if min(args.programs_per_sm) < 1:
        p.error("--programs-per-sm: want positive integers")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        args.profile_backends = [b for b in args.profile_backends if b != "triton"] or ["torch"]
    names = DRY_SHAPES if args.dry_run else common.SHAPES
    default = ["wan1.3b-480p", "wan14b-720p"] if args.overhead and not args.dry_run else list(names)
    args.shapes = args.shapes or default
    unknown = set(args.shapes) - set(names)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(names)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.time()
    if args.dry_run:
        device, dtype, info = torch.device("cpu"), torch.float32, {"device": "cpu", "torch": torch.__version__}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/svg.py needs a CUDA GPU (or --dry-run)")
        device, dtype, info = torch.device("cuda"), torch.bfloat16, common.gpu_versions()
    print("device:", json.dumps(info), flush=True)
    result = {"command": "python bench/svg.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": info, "dry_run": args.dry_run, "rows": [], "incomplete": []}  # fmt: skip

    def record(**row):
        result["rows"].append(row)
        if "ms" in row:
            extra = "" if "density" not in row else f" d={row['density']:.2f}"
            if "rows" in row:
                extra += f" rows={row['rows']} chunk={row['chunk']}"
            if row["part"].startswith("kernel-"):
                extra += f" tiles={row['tiles']} per_sm={row['programs_per_sm']}"
                extra += "" if row.get("same_choice", True) else " CHOICE DIFFERS"
            elif "variant" in row:
                extra += f" {row['mode']} {row['variant']} per_sm={row['programs_per_sm']}"
            elif row.get("programs_per_sm") is not None:
                extra += f" tiles={row['tiles']} per_sm={row['programs_per_sm']} splits={row.get('launch', {}).get('splits')}"
            print(f"  {row['shape']:18s} {row['part']:12s} {row['ms']:9.3f} ms{extra}", flush=True)

    def over_budget(what) -> bool:
        if time.time() - start > args.budget_s:
            result["incomplete"].append(what)
            return True
        return False

    shapes = DRY_SHAPES if args.dry_run else common.SHAPES
    if args.kernel_sweep or args.overhead:
        sweep, summary_of = ((svg_overhead.kernel_sweep, svg_overhead.summarise_sweep) if args.kernel_sweep
                             else (svg_overhead.run, svg_overhead.summarise))  # fmt: skip
        try:
            sweep(shapes, args, device, dtype, record, over_budget, launch_setting)
        except torch.cuda.OutOfMemoryError as err:  # keep what was measured
            print(f"out of memory ({err})", flush=True)
        result["summary"] = summary_of(result["rows"])
    else:
        for name in args.shapes:
            try:
                run_shape(shapes[name], args, device, dtype, record, over_budget)
            except torch.cuda.OutOfMemoryError as err:  # keep what was measured
                print(f"{name}: out of memory ({err})", flush=True)
                torch.cuda.empty_cache()
        result["summary"] = summarise(result["rows"])
    result["wall_s"] = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    name = "svg-kernel-sweep" if args.kernel_sweep else "svg-overhead" if args.overhead else "svg"
    path = os.path.join(args.out, f"{name}-dry-run.json" if args.dry_run else f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    printer = svg_overhead.print_sweep if args.kernel_sweep else svg_overhead.print_summary if args.overhead else print_summary
    printer(result["summary"])
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
