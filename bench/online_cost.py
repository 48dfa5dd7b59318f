"""What online top-p block selection costs against the attention time it saves (issue #22).

    python bench/online_cost.py                          # Wan-14B 720p, 25% density, backends auto and triton
    python bench/online_cost.py --shapes wan14b-720p hunyuan-720p --densities 0.25,0.1 --batch 2
    python bench/online_cost.py --dry-run                # tiny shape on the CPU (checks the script)
    python bench/online_cost.py --shapes wan1.3b-480p wan14b-720p --backends triton --cluster-iters 0
                                                         # issue 22's speed check, one GPU call (~2-3 min)
    python bench/online_cost.py --shapes wan1.3b-480p wan14b-720p --backends triton --cluster-iters 0 --block-list
                                                         # and the Triton kernel's block-list mode beside the ranges

Per shape, backend and density (``d``), on random bf16 inputs rotated between calls (CUDA events,
median; ``bench/common.time_fn``):

- ``dense_ms``: dense attention on cuDNN (the bar);
- ``select_ms``: :func:`sparse_vdit.methods.online.online_table` at a fixed budget (``p = 1``,
  min = max = ``d`` of the key blocks: a top-k, so the density is ``d`` plus the forced diagonal);
  ``select_topp_ms``: the same with ``p = --p`` and the budget ``[--min-density, d]``;
  ``select_old_ms``: the same top-k by the code before #22's speed work (a stable sort per row,
  ranges and index form by sorts: :func:`legacy_table`, kept here to time against);
  ``select_eager_ms``: the current code without ``torch.compile`` (``select_ms`` is the default:
  compiled on CUDA); ``same_blocks_as_old`` / ``same_blocks_eager``: the tables agree;
  ``select_grouped_ms``: the top-k on aligned groups of ``--key-group`` key blocks (``key_group``);
- ``sparse_ms``: the backend on that table, built beforehand (its derived forms warm);
  ``sparse_grouped_ms``: on the grouped top-k's table (these three in the kernel's range mode, whatever
  ``launcher.DEFAULTS["block_list"]`` picks); ``plan_ms``: on the layer tables of
  ``bench/e2e.py``'s offline mixed plan of the same density (``plan_density``; 8 layers, taken in
  turn: the plan's mean layer), so ``attention_vs_plan`` = ``sparse_ms / plan_ms`` is the online
  table's attention cost against a plan's at equal density; ``runs_per_row*``: mean non-empty
  ranges per (head, query block) of each table (the Triton kernel's loop count);
  ``fresh_ms``: selection and attention together with a new table every call (what a layer call
  costs: the backend's per-table work, e.g. its work order or FA4's index tensors, included);
- ``--block-list`` (Triton): ``sparse_list_ms``, ``sparse_grouped_list_ms``, ``plan_list_ms``: the same
  calls in the kernel's block-list mode (``launcher.OPTIONS["block_list"] = True``: one loop over each
  query tile's listed key blocks instead of a loop per range); ``list_vs_plan`` = ``sparse_list_ms /
  plan_ms`` (against the plan's tables in the default range mode), ``list_vs_ranges`` = ``sparse_list_ms /
  sparse_ms``, ``plan_list_vs_ranges`` = ``plan_list_ms / plan_ms``; with ``--list-stages N ...`` also
  ``sparse_list_stagesN_ms`` and ``list_stagesN_vs_plan``: the block-list calls pipelined N stages deep
  (``launcher.OPTIONS["list_stages"]``);
- ``static_ms``: the same backend on a frame-major band table of about the same density (an
  offline plan's table; equal-density speed of the online table against a plan's);
- ``cluster_ms`` (``--cluster-iters``, default 2; 0: none): the clustered selection (k-means of
  queries and of keys per head, warm-started from the previous call's centroids as between steps,
  gathers, selection per head in the permuted orders); ``cluster_attention_ms``: its attention
  (gather v, the launch, scatter the output back: :class:`~sparse_vdit.methods.cluster.PermutedTable`);
- ``hybrid_ms``: the hybrid's selection for half the heads (selection on every head, half of its
  rows merged into a static table);
- ``cost_share``: ``select_ms / (dense_ms - sparse_ms)``, the selection as a share of the attention
  it saves (the issue asks <= 5% at 25% on Wan-14B 720p); ``fresh_share``: ``(fresh_ms - sparse_ms)``
  over the same saving;
- ``host_syncs``: whether deciding (``_select``, ``_select_grouped``: the default path, compiled on CUDA) (the selection, and a fresh table's first attention call) made
  a device-to-host sync, checked with ``torch.cuda.set_sync_debug_mode("error")``.

Writes ``--out`` (JSON; rows merge by shape, backend, density, batch) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import BLOCK, SHAPES, Shape, environment, merge_results, results_path, say, table_for, time_fn  # noqa: E402

import sparse_vdit  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer  # noqa: E402
from sparse_vdit.kernels import dense as dense_kernels  # noqa: E402
from sparse_vdit.kernels.triton import launcher as triton_launcher  # noqa: E402
from sparse_vdit.block_table import BlockTable, MaskHead, num_blocks  # noqa: E402
from sparse_vdit.methods import online as online_methods  # noqa: E402
from sparse_vdit.methods.online import TopP, merge_heads, online_table  # noqa: E402
from sparse_vdit.patterns import diagonal  # noqa: E402
from sparse_vdit.plan import ModelSpec  # noqa: E402
from models import mixed_plan  # noqa: E402

TINY = Shape("tiny", VideoLayout(4, 8, 12), 4, 64)


def sync_free(fn, device: torch.device) -> str:
    """``"none"`` if ``fn()`` makes no device-to-host sync (CUDA's sync debug mode), else the error."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as err:
        return f"sync: {str(err).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


# --- the selection as it was before #22's speed work (sorts throughout), to time against ------------


def _sorted_positions(flag: torch.Tensor, width: int, fill) -> torch.Tensor:
    n = flag.shape[-1]
    position = torch.arange(n, device=flag.device).expand_as(flag)
    ranked = torch.where(flag, position, position + n).sort(-1).values[..., :width]
    return torch.where(ranked < n, ranked, fill).to(torch.int32)


def legacy_table(q, k, layout, block, p, min_density, max_density) -> BlockTable:
    """The old path: a stable sort + cumsum + scatter per row, ranges and index form by sorts."""
    low, high = online_methods.budget_blocks(layout, block, min_density, max_density)
    mass = online_methods.pooled_mass(q, k, layout, block)
    forced = online_methods.forced_blocks(layout, block, q.device).expand_as(mass)
    order = torch.sort(mass + 2.0 * forced, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(mass, -1, order)
    reach = ((torch.cumsum(ranked, -1) - ranked) < p).sum(-1, keepdim=True)
    count = torch.maximum(reach.clamp(low, high), forced.sum(-1, keepdim=True))
    rank = torch.arange(mass.shape[-1], device=mass.device)
    keep = torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, rank < count)
    kb = keep.shape[-1]
    width = min(online_methods.max_runs(layout, block, high), kb // 2 + 1)
    edges = torch.nn.functional.pad(keep.to(torch.int8), (1, 1)).diff(dim=-1)
    starts, ends = _sorted_positions(edges == 1, width, 0), _sorted_positions(edges == -1, width, 0)
    table = BlockTable(layout, block, (MaskHead("top-p"),) * keep.shape[0], starts, ends,
                       torch.zeros(keep.shape[0], dtype=torch.bool, device=keep.device))  # fmt: skip
    last = torch.where(keep, rank, -1).amax(-1, keepdim=True).clamp(min=0)
    indices = _sorted_positions(keep, online_methods.max_kept(layout, block, high), last)
    table.form("kv_indices", lambda t: indices)
    return table


def runs_per_row(table: BlockTable) -> float:
    """Mean non-empty ranges per (head, query block): what the Triton kernel loops over."""
    return float((table.range_ends > table.range_starts).sum(-1).double().mean())


def plan_tables(shape: Shape, density: float, block: int, device) -> tuple[list, float]:
    """The layer tables of e2e's offline mixed plan of ``density`` (8 layers of the shape's heads)."""
    plan = mixed_plan(ModelSpec("wan", 8, shape.heads), shape.layout, density, block)
    tables = [compile_layer(plan.patterns_for(0, layer), shape.layout, block, device) for layer in range(8)]
    return tables, plan.density(shape.layout)


def measure(shape: Shape, backend: str, density: float, args, device, dtype) -> dict:
    layout, block = shape.layout, args.block_size
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [tuple(torch.randn(args.batch, layout.num_tokens, shape.heads, shape.dim, generator=gen, device=device,
                              dtype=dtype) for _ in range(3)) for _ in range(args.sets)]  # fmt: skip
    scale = shape.dim**-0.5
    topk = dict(p=1.0, min_density=density, max_density=density)
    topp = dict(p=args.p, min_density=min(args.min_density, density), max_density=density)

    def dense(q, k, v):
        return dense_kernels.forward(q, k, v, kv_len=layout.kv_len, softmax_scale=scale, use_fa4=False)

    def select(q, k, v):  # the default path (compiled on CUDA)
        return online_table(q, k, layout, block, **topk)

    def select_eager(q, k, v):
        return online_table(q, k, layout, block, **topk, compile="never")

    def select_old(q, k, v):
        return legacy_table(q, k, layout, block, **topk)

    def select_grouped(q, k, v):
        return online_table(q, k, layout, block, **topk, key_group=args.key_group)

    def select_topp(q, k, v):
        return online_table(q, k, layout, block, **topp)

    tables = [select(*s) for s in sets]
    for t, s in zip(tables, sets):  # build the backend's forms once (warm)
        sparse_vdit.sparse_attention(*s, t, backend=backend)
    index = iter(range(10**9))

    def sparse(q, k, v):
        return sparse_vdit.sparse_attention(q, k, v, tables[next(index) % len(tables)], backend=backend)

    grouped = [select_grouped(*s) for s in sets]
    for t, s in zip(grouped, sets):
        sparse_vdit.sparse_attention(*s, t, backend=backend)
    grouped_turn = iter(range(10**9))

    def sparse_grouped(q, k, v):
        return sparse_vdit.sparse_attention(q, k, v, grouped[next(grouped_turn) % len(grouped)], backend=backend)

    layers, plan_density = plan_tables(shape, density, block, device)
    for t in layers:
        sparse_vdit.sparse_attention(*sets[0], t, backend=backend)
    layer_turn = iter(range(10**9))

    def plan_attention(q, k, v):  # the plan's layers in turn: its mean layer at the plan's density
        return sparse_vdit.sparse_attention(q, k, v, layers[next(layer_turn) % len(layers)], backend=backend)

    def fresh(q, k, v):
        return sparse_vdit.sparse_attention(q, k, v, select(q, k, v), backend=backend)

    half = tuple(range(0, shape.heads, 2))
    static = compile_layer([diagonal(1.0)] * shape.heads, layout, block, device)

    def hybrid(q, k, v):  # as Hybrid does: selected on every head, half of the rows merged into the static table
        return merge_heads(static, online_table(q, k, layout, block, **topk), half)

    clustering = TopP(1.0, min_density=density, max_density=density, cluster_iters=args.cluster_iters)

    def cluster(q, k, v):
        return clustering.clustered(q, k, layout, block, 0)

    made = [cluster(*s) for s in sets] if args.cluster_iters else []
    turn = iter(range(10**9))

    def cluster_attention(q, k, v):
        permuted = made[next(turn) % len(made)]
        return permuted.attend(q, k, v, backend)

    band, _ = table_for("band", tables[0].density, layout, shape.heads, device) if block == BLOCK else (None, None)

    def band_attention(q, k, v):
        return sparse_vdit.sparse_attention(q, k, v, band, backend=backend)

    row = {"shape": shape.name, "layout": layout.describe(), "heads": shape.heads, "dim": shape.dim,
           "batch": args.batch, "block": block, "backend": sparse_vdit.kernels.resolve_backend(backend, sets[0][0]),
           "backend_asked": backend, "density_target": density, "density": tables[0].density,
           "density_topp": select_topp(*sets[0]).density, "p": args.p, "key_group": args.key_group,
           "density_grouped": grouped[0].density, "plan_density": plan_density,
           "runs_per_row": runs_per_row(tables[0]), "runs_per_row_grouped": runs_per_row(grouped[0]),
           "runs_per_row_plan": sum(runs_per_row(t) for t in layers) / len(layers),
           "same_blocks_as_old": same_blocks(select_old(*sets[0]), tables[0]),
           "same_blocks_eager": same_blocks(select_eager(*sets[0]), tables[0])}  # fmt: skip
    timed = (("dense_ms", dense), ("select_old_ms", select_old), ("select_eager_ms", select_eager),
             ("select_ms", select), ("select_grouped_ms", select_grouped), ("select_topp_ms", select_topp),
             ("sparse_ms", with_launcher_options(sparse, block_list=False)),
             ("sparse_grouped_ms", with_launcher_options(sparse_grouped, block_list=False)),
             ("plan_ms", with_launcher_options(plan_attention, block_list=False)))  # fmt: skip
    if args.block_list:
        timed += (("sparse_list_ms", with_launcher_options(sparse, block_list=True)),
                  ("sparse_grouped_list_ms", with_launcher_options(sparse_grouped, block_list=True)),
                  ("plan_list_ms", with_launcher_options(plan_attention, block_list=True)))  # fmt: skip
        timed += tuple((f"sparse_list_stages{n}_ms", with_launcher_options(sparse, block_list=True, list_stages=n))
                       for n in args.list_stages)  # fmt: skip
    for name, fn in (*timed,
                     ("fresh_ms", fresh), ("hybrid_ms", hybrid), ("static_ms", band_attention if band else None),
                     ("cluster_ms", cluster if made else None),
                     ("cluster_attention_ms", cluster_attention if made else None)):  # fmt: skip
        if fn is not None:
            row[name] = time_fn(fn, sets, target_ms=args.target_ms)[0]
    if band is not None:
        row["static_density"] = band.density
    saved = row["dense_ms"] - row["sparse_ms"]
    row["saved_ms"] = saved
    row["cost_share"] = row["select_ms"] / saved if saved > 0 else None
    row["fresh_share"] = (row["fresh_ms"] - row["sparse_ms"]) / saved if saved > 0 else None
    if made:
        row["cluster_share"] = row["cluster_ms"] / saved if saved > 0 else None
        row["cluster_density"] = made[0].density
        row["host_syncs_cluster"] = sync_free(lambda: cluster(*sets[0]), device)
    row["host_syncs_select"] = sync_free(lambda: select(*sets[0]), device)
    row["host_syncs_select_grouped"] = sync_free(lambda: select_grouped(*sets[0]), device)
    row["attention_vs_plan"] = row["sparse_ms"] / row["plan_ms"]
    row["attention_grouped_vs_plan"] = row["sparse_grouped_ms"] / row["plan_ms"]
    if args.block_list:
        row["list_vs_plan"] = row["sparse_list_ms"] / row["plan_ms"]
        row["list_grouped_vs_plan"] = row["sparse_grouped_list_ms"] / row["plan_ms"]
        row["list_vs_ranges"] = row["sparse_list_ms"] / row["sparse_ms"]
        row["plan_list_vs_ranges"] = row["plan_list_ms"] / row["plan_ms"]
        for n in args.list_stages:
            row[f"list_stages{n}_vs_plan"] = row[f"sparse_list_stages{n}_ms"] / row["plan_ms"]
    q, k, v = sets[1 % len(sets)]
    row["host_syncs_fresh_attention"] = sync_free(lambda: fresh(q, k, v), device)
    del sets, tables, made, grouped, layers
    return row


def with_launcher_options(fn, **options):
    """``fn`` run with these Triton ``launcher.OPTIONS`` set (restored after each call)."""

    def call(*args):
        with triton_launcher.options_set(**options):
            return fn(*args)

    return call


def same_blocks(a: BlockTable, b: BlockTable) -> bool:
    """Whether two tables visit the same key blocks (ranges and index form)."""
    width = min(a.range_starts.shape[-1], b.range_starts.shape[-1])
    return bool(torch.equal(a.range_starts[..., :width], b.range_starts[..., :width])
                and torch.equal(a.range_ends[..., :width], b.range_ends[..., :width])
                and torch.equal(a.kv_indices, b.kv_indices))  # fmt: skip


def table(rows: list) -> str:
    head = (f"{'shape':<14} {'backend':<9} {'dens':>5} {'dense ms':>9} {'sel old':>8} {'sel eag':>8} {'select':>8} "
            f"{'sel g':>7} {'sparse':>8} {'sparse g':>8} {'plan':>8} {'runs':>5} {'runs g':>6} {'runs pl':>7} "
            f"{'fresh':>8} {'hybrid':>8} {'cost/saved':>10} {'fresh/saved':>11}")  # fmt: skip
    listed = any("sparse_list_ms" in r for r in rows)  # --block-list
    if listed:
        head += f" {'sparse list':>11} {'list vs plan':>12} {'list g vs plan':>14} {'plan list/ranges':>16}"
    head += "  syncs"
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for r in rows:
        listing = (f" {r.get('sparse_list_ms', nan):>11.2f} {r.get('list_vs_plan', nan):>12.3f} "
                   f"{r.get('list_grouped_vs_plan', nan):>14.3f} {r.get('plan_list_vs_ranges', nan):>16.3f}"
                   if listed else "")  # fmt: skip
        share = "" if r.get("cost_share") is None else f"{r['cost_share']:.1%}"
        fresh = "" if r.get("fresh_share") is None else f"{r['fresh_share']:.1%}"
        lines.append(f"{r['shape']:<14} {r['backend']:<9} {r['density']:>5.1%} {r['dense_ms']:>9.2f} "
                     f"{r.get('select_old_ms', nan):>8.3f} {r.get('select_eager_ms', nan):>8.3f} {r['select_ms']:>8.3f} "
                     f"{r.get('select_grouped_ms', nan):>7.3f} {r['sparse_ms']:>8.2f} {r.get('sparse_grouped_ms', nan):>8.2f} "
                     f"{r.get('plan_ms', nan):>8.2f} {r.get('runs_per_row', nan):>5.1f} "
                     f"{r.get('runs_per_row_grouped', nan):>6.1f} {r.get('runs_per_row_plan', nan):>7.1f} "
                     f"{r['fresh_ms']:>8.2f} {r['hybrid_ms']:>8.2f} {share:>10} {fresh:>11}{listing}  "
                     f"{r['host_syncs_select']} / {r.get('host_syncs_select_grouped', '')} / "
                     f"{r['host_syncs_fresh_attention']}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=["wan14b-720p"], choices=list(SHAPES))
    p.add_argument("--backends", default="auto,triton", help="sparse backends (comma-separated)")
    p.add_argument("--densities", default="0.25", help="shares of the key blocks kept (comma-separated)")
    p.add_argument("--p", type=float, default=0.9, help="the top-p rows' mass share")
    p.add_argument("--min-density", type=float, default=0.05, help="the top-p rows' budget floor")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--key-group", type=int, default=2, help="the grouped top-k rows' key_group")
    p.add_argument("--cluster-iters", type=int, default=2, help="k-means rounds of the clustered rows (0: none)")
    p.add_argument("--sets", type=int, default=3, help="input sets rotated between calls")
    p.add_argument("--target-ms", type=float, default=300.0, help="timed milliseconds per measurement")
    p.add_argument("--block-size", type=int, default=BLOCK)
    p.add_argument("--list-stages", type=int, nargs="*", default=[],
                   help="with --block-list: also time the block-list calls at these pipelining stages "
                        "(launcher.OPTIONS['list_stages']; columns sparse_list_stagesN_ms, list_stagesN_vs_plan)")
    p.add_argument("--block-list", action="store_true",
                   help="also time the sparse calls in the Triton kernel's block-list mode (columns sparse list, list vs plan)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/online-cost.json)")
    p.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU (fp32, reference backend)")
    args = p.parse_args(argv)
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.dry_run:
        args.backends, args.block_size, args.sets, args.shapes = ["reference"], 16, 2, ["tiny"]
    args.out = args.out or results_path("online-cost", args.dry_run)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/online_cost.py needs a CUDA GPU (or --dry-run)")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    env = environment(device)
    say(f"online selection cost on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
        f"flash_attn {env['flash_attn']}; shapes {args.shapes}, backends {args.backends}, densities {args.densities}")  # fmt: skip
    rows = []
    with torch.no_grad():
        for name in args.shapes:
            shape = TINY if name == "tiny" else SHAPES[name]
            for backend in args.backends:
                for density in args.densities:
                    rows.append(measure(shape, backend, density, args, device, dtype))
                    say(table(rows[-1:]).splitlines()[-1])
                    sparse_vdit.clear_caches()
    results = merge_results(args.out, env, rows,
                            key=lambda r: (r["shape"], r["backend_asked"], r["density_target"], r["batch"]))  # fmt: skip
    say(f"wrote {args.out}")
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
