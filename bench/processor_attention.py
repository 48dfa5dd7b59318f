"""The whole processor attention call, permutation counted in: old path vs fused path (issue 21).

    python bench/processor_attention.py [--shapes ...] [--backends triton fa4] [--budget-s 400]

One layer call as the diffusers processor makes it after the q/k/v projections: the family's rotary
embedding on q and k, the token-major permutation of q, k, v, the block-sparse kernel and the
inverse permutation of the output. Paths per backend:

- ``old``: the model's rotary in torch (Wan's processor / diffusers ``apply_rotary_emb``), then
  ``sparse_attention`` (FA4: gather in, gather out; Triton: token-major rows read in place).
- ``fused`` (FA4): :func:`sparse_vdit.kernels.head_order.attention_in_head_order`: rotary and
  permutation in one pass, FA4, one copy back. Triton: ``fused-permuted`` (inputs written in each
  head's order, every key tile contiguous, rows stored frame-major).
- ``fused-f32`` / ``fused-permuted-f32``: the fused path with float64 tables (Wan's) cast to float32
  once (``head_order.in_float32``; the processor's ``state.rotary_float32``); only for float64 tables.
  ``dense-fused-f32`` likewise for the dense call.

``--sweep`` (Triton; issue 21's search for where the call loses) adds, per shape:

- ``pass``: the fused input pass alone (q/k rotated + v, every head token-major) with each launch
  option set of :data:`PASS_VARIANTS` (``kernels/triton/rotary.py``'s ``OPTIONS``), on the family's
  tables and, for float64 tables (Wan), on float32 ones; ms and GB/s (bytes read + written once),
  checked against the default options on the same tables (and float32 against float64);
- ``kernel``: the attention kernel alone on head-ordered inputs with each tile choice of
  :data:`TILE_VARIANTS` (``launcher.OPTIONS["tiles"]``), block efficiency against dense cuDNN
  without rotary, checked against the launcher's own choice (``default``);
- ``tuned`` / ``tuned-f32`` whole calls: the fastest pass options of the shape (native / float32
  tables) with the fastest tiles of the row; the bar also takes the dense call with the tuned pass.

Without ``--sweep``, ``fused-permuted`` runs the defaults (the winners of issue 21's H200 sweep).
Variants measured on an H200 and removed (issue 21, BENCHMARKS.md): Triton key ranges of in-place
token-major heads read frame by frame (``old-frames``), a rotary-only fused pass with the rows
read through the order (``fused-in-place``, ``fused-in-place-frames``), q rotated and reordered by
the kernel on load (``tuned-qk``, ``tuned-qk-f32``), and the pass options and tiles named in
``processor_sweep.py``.

The bar is the same call without sparsity: rotary + dense cuDNN SDPA (the faster of the torch
rotary and the fused rotary pass). Block efficiency = density x t_dense_call / t_sparse_call.
That rotary, which the unpatched model runs too, sits whole in the denominator but scaled by the
density in the numerator, so even a perfect sparse call stays below 1.0 at low density. Hence also,
per call row, ``eff_excl`` (printed as "rotary excluded") = density x t_dense_kernel / (t_sparse_call
- t_rotary): ``t_dense_kernel`` dense cuDNN alone (``dense-cudnn``), ``t_rotary`` the rotary that
path applies, run alone on q and k in identity order (no permutation: what a dense call needs) with
the same tables and options (rows ``part="rotary"``: ``old`` the model's torch rotary, ``fused`` the
fused pass, ``fused-f32``, ``fused-tuned[-f32]``; :data:`ROTARY_OF_PATH`). It is 1.0 when the call
costs its rotary plus ``density`` of the dense kernel, i.e. the permutation rides on the rotary for free.
And the metric's ``ceiling`` (:func:`metric_ceiling`, printed with each call's share of it): the block
efficiency of a call that pays its rotary and then ``density`` of the fastest dense kernel alone (cuDNN,
or FA4's dense kernel, ``dense-fa4``, where FA4 runs): no post-rotary kernel as fast per block as dense
reaches more; and per backend the same with its own dense kernel (``dense-fa4``; ``dense-triton``, the
Triton block path on an all-dense table). ``--from-json PATH`` prints the tables of a saved run.
Every timed path is first checked against the backend's old path on the same inputs (relative
RMS, ``check``). Shapes: Wan-1.3B 480p, Wan-14B 720p, HunyuanVideo 720p (+256 text),
CogVideoX1.5 768p (+226 text, D=64); multi-diagonal and mixed layers at 5/10/20/40% of blocks.
Writes ``processor-attention.json`` to ``--out``; prints the tables last (both efficiencies; with ``--sweep``: the
components, then the winners). ``--dry-run``: a tiny shape on the CPU (Triton interpreter), fp32:
a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import SHAPES, Shape, gpu_versions, out_dir, random_sets, say, table_for, time_fn  # noqa: E402

import sparse_vdit  # noqa: E402
from sparse_vdit import sparse_attention  # noqa: E402
from sparse_vdit.kernels import dense, registry  # noqa: E402
from sparse_vdit.kernels.head_order import Rotary, apply_rotary, attention_in_head_order, in_float32, rotate  # noqa: E402
from sparse_vdit.layout import VideoLayout  # noqa: E402
from processor_sweep import PASS_VARIANTS, TILE_VARIANTS, pass_sweep, print_sweep, tile_sweep, tuned_fn, variant  # noqa: E402

FAMILY = {"wan1.3b-480p": "wan", "wan14b-720p": "wan", "hunyuan-720p": "hunyuan_video", "cogvideox1.5-768p": "cogvideox",
          "tiny": "hunyuan_video"}  # fmt: skip
TINY = Shape("tiny", VideoLayout(3, 5, 9, 19, "suffix"), 4, 64)  # --dry-run
DENSITIES = (0.05, 0.10, 0.20, 0.40)
KINDS = ("multi_diag", "mixed")
# (backend, path) -> (fused?, float64 tables cast to float32?)
PATHS = {("triton", "old"): (False, False), ("triton", "fused-permuted"): (True, False),
         ("triton", "fused-permuted-f32"): (True, True), ("fa4", "old"): (False, False), ("fa4", "fused"): (True, False),
         ("fa4", "fused-f32"): (True, True)}  # fmt: skip


def rotary_tables(shape: Shape, family: str, device) -> Rotary:
    """Random rotary tables as the family builds them: Wan float64 over every token (channel pairs
    by its rule), HunyuanVideo / CogVideoX float32 over the video rows (before / after the text)."""
    layout, dim = shape.layout, shape.dim
    g = torch.Generator().manual_seed(7)
    angles = torch.rand(layout.video_tokens, dim // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    dtype = torch.float64 if family == "wan" else torch.float32
    cos, sin = (f(angles).repeat_interleave(2, -1).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))
    return Rotary(cos, sin, layout.video_start, "wan" if family == "wan" else "interleaved")


def models_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """The rotary as the processor applied it before issue 21 (the model's own torch code)."""
    if rotary.pairs == "wan":
        from sparse_vdit.integrations.diffusers.families import _wan_rotary

        return _wan_rotary(x, rotary.cos[None, :, None], rotary.sin[None, :, None])
    try:
        from diffusers.models.embeddings import apply_rotary_emb
    except ImportError:  # the same math (tests/kernels/test_head_order.py compares them)
        return apply_rotary(x, rotary)
    part = apply_rotary_emb(x[:, rotary.start : rotary.end], (rotary.cos, rotary.sin), sequence_dim=1)
    return torch.cat([x[:, : rotary.start], part, x[:, rotary.end :]], dim=1)


def path_fn(backend: str, path: str, table, rotary: Rotary):
    """``fn(q, k, v)``: one processor attention call on ``path``."""
    fused, float32 = PATHS[(backend, path)]
    tables = in_float32(rotary) if float32 else rotary  # cast once, as the processor does

    def run(q, k, v):
        if fused:
            return attention_in_head_order(q, k, v, table, backend=backend, rotary=tables)
        return sparse_attention(models_rotary(q, rotary), models_rotary(k, rotary), v, table, backend=backend)

    return run


# the rotary each path applies, run alone in identity order (rotary_fns) for the rotary-excluded efficiency
ROTARY_OF_PATH = {"old": "old", "fused": "fused", "fused-permuted": "fused", "fused-f32": "fused-f32",
                  "fused-permuted-f32": "fused-f32", "tuned": "fused-tuned", "tuned-f32": "fused-tuned-f32"}  # fmt: skip


def rotary_fns(rotary: Rotary, tuned: dict | None = None) -> dict:
    """``fn(q, k) -> (q, k)`` rotated in identity order (what a dense call needs), per rotary a path
    uses: ``old`` the model's torch code, ``fused`` the fused pass (``fused-f32``: float64 tables cast
    to float32 once), ``fused-tuned[-f32]``: the pass with ``tuned``'s options ({"native" / "f32": pass variant})."""

    def fused(q, k, tables=rotary, options=None):
        with variant(options):
            return rotate(q, k, tables)

    fns = {"old": lambda q, k: (models_rotary(q, rotary), models_rotary(k, rotary)), "fused": fused}
    if rotary.cos.dtype == torch.float64:
        fns["fused-f32"] = lambda q, k, t=in_float32(rotary): fused(q, k, t)
    for label, name in (tuned or {}).items():
        tables = in_float32(rotary) if label == "f32" else rotary
        suffix = "-f32" if label == "f32" else ""
        fns[f"fused-tuned{suffix}"] = lambda q, k, t=tables, o=PASS_VARIANTS[name]: fused(q, k, t, o)
    return fns


KERNEL_ALONE = ("dense-cudnn", "dense-fa4", "dense-triton")  # dense rows without a rotary: not the bar


def dense_bar(dense_ms: dict) -> float:
    """The bar from a shape's dense rows (label: ms): the fastest dense call with its rotary."""
    return min(ms for label, ms in dense_ms.items() if label not in KERNEL_ALONE)


def dense_fns(layout: VideoLayout, rotary: Rotary, tuned: dict | None = None, fa4: bool = False) -> dict:
    """The same call without sparsity: ``dense-<rotary>``, each rotary of :func:`rotary_fns` then dense
    cuDNN SDPA; ``dense-cudnn``, cuDNN alone (no rotary), and with ``fa4`` ``dense-fa4``, FlashAttention-4's
    dense kernel alone (:data:`KERNEL_ALONE`)."""

    def call(rotary_fn, use_fa4=False):
        def run(q, k, v):
            q, k = rotary_fn(q, k)
            return dense.forward(q, k, v, softmax_scale=q.shape[-1] ** -0.5, kv_len=layout.kv_len, use_fa4=use_fa4)

        return run

    fns = {"dense-cudnn": call(lambda q, k: (q, k))} | ({"dense-fa4": call(lambda q, k: (q, k), True)} if fa4 else {})
    return fns | {f"dense-{label}": call(fn) for label, fn in rotary_fns(rotary, tuned).items()}


def triton_dense_fn(layout: VideoLayout, heads: int, device):
    """``dense-triton``: the Triton kernel's block path on an all-dense table (frame-major, no rotary), the
    speed per block its sparse calls could at best keep."""
    from attention import direct_backend

    table, _ = table_for("band", 1.0, layout, heads, device)
    run = direct_backend("triton")
    return lambda q, k, v: run(q, k, v, table)


def rotary_excluded_eff(density: float, dense_kernel_ms: float, call_ms: float, rotary_ms: float) -> float | None:
    """Block efficiency with the path's rotary left out: ``density x t_dense_kernel / (t_call - t_rotary)``;
    1.0 when the sparse call costs its rotary plus ``density`` of the dense kernel (the permutation free).
    None where the call is not slower than its rotary alone (nothing left to measure)."""
    rest = call_ms - rotary_ms
    return density * dense_kernel_ms / rest if rest > 0 else None


def metric_ceiling(density: float, bar_ms: float, dense_kernel_ms: float, rotary_ms: float) -> float:
    """The block efficiency (issue 21's metric, against ``bar_ms``) of an ideal sparse call that runs its
    rotary pass and then ``density`` of a dense kernel taking ``dense_kernel_ms``, the permutation free:
    ``density x bar / (t_rotary + density x t_dense_kernel)``. Below 1.0 at low density however fast the
    kernel, since the bar scales the rotary by the density while the call pays it whole."""
    return density * bar_ms / (rotary_ms + density * dense_kernel_ms)


def with_ceilings(result: dict) -> list[dict]:
    """The call rows of ``result`` with ``ceiling`` (:func:`metric_ceiling` with the row's own rotary, the
    shape's bar and its fastest dense kernel alone: cuDNN, or FA4's where timed), ``of_ceiling`` (the
    row's block efficiency / the ceiling), and where the row's backend has its own dense kernel timed
    (``dense-fa4``, ``dense-triton``) ``own_ceiling`` / ``of_own``, the same with that kernel."""
    dense = {}
    for r in result["rows"]:
        if r.get("part") == "dense" and "ms" in r:
            dense.setdefault(r["shape"], {})[r["path"]] = r["ms"]
    rows = []
    for r in result["rows"]:
        if r.get("part") != "call" or "ms" not in r or r["shape"] not in dense:
            continue
        shape = dense[r["shape"]]
        bar = dense_bar(shape)
        kernel = min(ms for label, ms in shape.items() if label in KERNEL_ALONE)
        ceiling = metric_ceiling(r["density"], bar, kernel, r["rotary_ms"])
        row = dict(r, ceiling=ceiling, of_ceiling=r["block_eff"] / ceiling)
        own = shape.get("dense-" + r["backend"].split("/")[0])
        if own is not None:
            row["own_ceiling"] = metric_ceiling(r["density"], bar, own, r["rotary_ms"])
            row["of_own"] = r["block_eff"] / row["own_ceiling"]
        rows.append(row)
    return rows


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=[*SHAPES, "tiny"])
    p.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=["band", "multi_diag", "vertical", "mixed"])
    p.add_argument("--backends", nargs="*", default=["fa4", "triton"], choices=["fa4", "triton"])
    p.add_argument("--paths", nargs="*", default=None, help="only these paths (e.g. old fused fused-permuted)")
    p.add_argument("--sets", type=int, default=2, help="rotated input sets (L2 must not flatter)")
    p.add_argument("--target-ms", type=float, default=150.0, help="time spent timing one row (after warm-up)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting new rows after this long")
    p.add_argument("--check-tol", type=float, default=2e-2, help="largest relative RMS against the old path")
    p.add_argument("--out", default=out_dir())
    p.add_argument("--triton-autotune", action="store_true",
                   help="measured Triton tiles per density bucket (SPARSE_VDIT_TRITON_AUTOTUNE=1), tuned in the warm-up")
    p.add_argument("--sweep", action="store_true",
                   help="Triton: time the fused pass per launch option set and the kernel per tile choice, then the "
                        "whole call with the winners (tuned / tuned-f32)")
    p.add_argument("--pass-variants", nargs="*", default=list(PASS_VARIANTS), choices=list(PASS_VARIANTS))
    p.add_argument("--tile-variants", nargs="*", default=list(dict.fromkeys(n for t in TILE_VARIANTS.values() for n in t)),
                   choices=list(dict.fromkeys(n for t in TILE_VARIANTS.values() for n in t)))
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU (Triton interpreter), fp32")
    p.add_argument("--from-json", metavar="PATH", help="print the tables of a saved processor-attention.json, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.from_json:
        if not os.path.isfile(args.from_json):
            raise SystemExit(f"--from-json: no file {args.from_json}")
        with open(args.from_json) as f:
            result = json.load(f)
        print_table(result)
        return result
    t_start = time.time()
    if args.triton_autotune:  # before any launch: the launcher reads it per call
        os.environ["SPARSE_VDIT_TRITON_AUTOTUNE"] = "1"
    if args.dry_run:
        device, dtype, shapes = torch.device("cpu"), torch.float32, [TINY]
    else:
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, [SHAPES[s] if s != "tiny" else TINY for s in args.shapes]
    backends = [b for b in args.backends if registry.available(b, device)[0]]
    skipped = {b: registry.available(b, device)[1] for b in args.backends if b not in backends}
    for name, why in skipped.items():
        say(f"skipping backend {name}: {why}")
    sweep = args.sweep and "triton" in backends
    result = {"command": "python bench/processor_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": gpu_versions() if device.type == "cuda" else {"device": "cpu (dry run)"},
              "dtype": str(dtype).removeprefix("torch."), "skipped_backends": skipped, "rows": [], "incomplete": [],
              "failed_checks": []}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "processor-attention.json")
    rows = result["rows"]

    def measure(fn, sets, check_ref: dict, row: dict, bar: float, density: float, kernel_ms: float,
                rotary_ms: float) -> None:  # fmt: skip
        """Check ``fn`` against the backend's first path on ``sets[0]``, time it, append ``row`` with its
        block efficiency against ``bar`` and, rotary excluded, against ``kernel_ms`` (cuDNN alone)."""
        label = f"{row['backend']}"
        try:
            out = fn(*sets[0])
            check_ref.setdefault("old", out)
            check = rel_rms(out, check_ref["old"])
            del out
            ms, host, reps = time_fn(fn, sets, target_ms=args.target_ms)
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            say(f"  {label} {row['kind']} {row['target']}: {type(exc).__name__}: {exc}")
            rows.append(dict(row, error=str(exc)[:300]))
            return
        eff_excl = rotary_excluded_eff(density, kernel_ms, ms, rotary_ms)
        row.update(ms=ms, host_ms=host, reps=reps, block_eff=density * bar / ms, rotary_ms=rotary_ms, eff_excl=eff_excl,
                   check=check)  # fmt: skip
        rows.append(row)
        if not check <= args.check_tol:
            result["failed_checks"].append(f"{row['shape']}/{row['kind']}/{row['target']}/{label}: {check:.2e}")
        say(f"  {row['kind']:10s} {density:5.3f} {label:28s} {ms:9.3f} ms (host {host:6.3f}) eff {row['block_eff']:5.2f} "
            f"rotary excluded {'-' if eff_excl is None else f'{eff_excl:5.2f}'} check {check:.1e}")  # fmt: skip

    for shape in shapes:
        if time.time() - t_start > args.budget_s:
            result["incomplete"].append(shape.name)
            continue
        family = FAMILY[shape.name]
        layout = shape.layout
        rotary = rotary_tables(shape, family, device)
        sets = random_sets(shape, args.sets, device, dtype)
        say(f"== {shape.name} ({family}): {layout.describe()}, {shape.heads} heads x {shape.dim}")
        tuned_pass = {}
        if sweep:
            all_token_major, _ = table_for("multi_diag", 0.1, layout, shape.heads, device)
            tuned_pass = pass_sweep(shape, rotary, all_token_major, sets, args, rows)
        dense_ms = {}
        flops = 4.0 * shape.heads * layout.num_tokens * layout.kv_len * shape.dim
        dense_calls = dense_fns(layout, rotary, tuned_pass, fa4="fa4" in backends)
        if "triton" in backends:
            dense_calls["dense-triton"] = triton_dense_fn(layout, shape.heads, device)
        for label, fn in dense_calls.items():
            ms, host, reps = time_fn(fn, sets, target_ms=args.target_ms)
            dense_ms[label] = ms
            rows.append(dict(part="dense", shape=shape.name, kind="dense", backend=label, path=label, density=1.0, ms=ms,
                             host_ms=host, tflops=flops / ms * 1e-9))  # fmt: skip
            say(f"  {label:24s} {ms:9.3f} ms")
        rotary_ms = {}  # each path's rotary alone, identity order (q and k)
        for label, fn in rotary_fns(rotary, tuned_pass).items():
            ms, host, reps = time_fn(lambda q, k, v, rotate_qk=fn: rotate_qk(q, k), sets, target_ms=args.target_ms)
            rotary_ms[label] = ms
            rows.append(dict(part="rotary", shape=shape.name, kind="rotary", backend=f"rotary-{label}", path=label, ms=ms,
                             host_ms=host))  # fmt: skip
            say(f"  {'rotary-' + label:24s} {ms:9.3f} ms")
        bar = dense_bar(dense_ms)
        for kind in args.kinds:
            for target in args.densities:
                if time.time() - t_start > args.budget_s:
                    result["incomplete"].append(f"{shape.name}/{kind}/{target}")
                    continue
                table, _ = table_for(kind, target, layout, shape.heads, device)
                tiles = tile_sweep(shape, kind, target, table, sets, args, dense_ms["dense-cudnn"], rows) if sweep else None
                for backend in backends:
                    refs = {}
                    calls = []
                    for (b, label) in PATHS:
                        if b != backend or (args.paths and label not in args.paths and label != "old"):
                            continue
                        if PATHS[(b, label)][1] and rotary.cos.dtype != torch.float64:
                            continue  # float32 tables already: the same as the path without -f32
                        calls.append((label, path_fn(backend, label, table, rotary), {}))
                    if backend == "triton":
                        for tables_label, name in tuned_pass.items():
                            label = "tuned" + ("-f32" if tables_label == "f32" else "")
                            tables = in_float32(rotary) if tables_label == "f32" else rotary
                            calls.append((label, tuned_fn(table, tables, name, tiles, shape.dim),
                                          {"pass_variant": name, "tile_variant": tiles or "default"}))  # fmt: skip
                    for label, fn, extra in calls:
                        row = dict(part="call", shape=shape.name, kind=kind, target=target, density=table.density,
                                   backend=f"{backend}/{label}", path=label, **extra)  # fmt: skip
                        measure(fn, sets, refs, row, bar, table.density, dense_ms["dense-cudnn"],
                                rotary_ms[ROTARY_OF_PATH[label]])  # fmt: skip
                    del refs
        del sets
        sparse_vdit.clear_caches()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    result["wall_s"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    say(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


def print_table(result: dict) -> None:
    """Block efficiency per (shape, kind, density) and backend/path (bench/attention.py's table), then the checks."""
    from attention import print_table as attention_table

    print("\nblock efficiency = density x t(rotary + dense cuDNN) / t(rotary + permutation + sparse kernel + inverse)")
    attention_table(dict(result, rows=[r for r in result["rows"] if r.get("part") in ("dense", "call", None)]))
    print("\nblock efficiency, rotary excluded = density x t(dense cuDNN alone) / (t(call) - t(the call's rotary alone, "
          "identity order)); rotary alone (q and k), ms:")
    for shape in dict.fromkeys(r["shape"] for r in result["rows"] if r.get("part") == "rotary"):
        print(f"  {shape}: " + ", ".join(f"{r['path']} {r['ms']:.3f}" for r in result["rows"]
                                         if r.get("part") == "rotary" and r["shape"] == shape))  # fmt: skip
    excluded = [r for r in result["rows"] if r.get("part") == "dense" and r["path"] == "dense-cudnn"]
    excluded += [dict(r, block_eff=r["eff_excl"]) for r in result["rows"] if r.get("part") == "call" and "ms" in r]
    attention_table(dict(result, rows=excluded))
    ceilings = with_ceilings(result)
    if ceilings:
        print("\nceiling = density x t(rotary + dense cuDNN) / (t(the call's rotary alone) + density x t(fastest dense "
              "kernel alone)): a call whose kernel is as fast per block as the fastest dense kernel (cuDNN, or FA4's "
              "where timed), the permutation free; per path's rotary:")
        for shape in dict.fromkeys(r["shape"] for r in ceilings):
            cells = {}
            for r in (r for r in ceilings if r["shape"] == shape):
                cells.setdefault((r["kind"], r["target"]), {})[ROTARY_OF_PATH.get(r["path"], r["path"])] = r["ceiling"]
            for (kind, target), by_rotary in cells.items():
                print(f"  {shape:18s} {kind:10s} {target:5.2f}  " + "  ".join(f"{k} {v:.2f}" for k, v in by_rotary.items()))
        print("\nthe measured block efficiency as a share of its ceiling:")
        attention_table(dict(result, rows=[dict(r, block_eff=r["of_ceiling"]) for r in ceilings]))
        own = [r for r in ceilings if "own_ceiling" in r]
        if own:
            print("\nthe same with the backend's own dense kernel alone (dense-fa4, dense-triton): its ceiling, then the "
                  "measured share of it")
            attention_table(dict(result, rows=[dict(r, block_eff=r["own_ceiling"]) for r in own]))
            attention_table(dict(result, rows=[dict(r, block_eff=r["of_own"]) for r in own]))
    print(f"\nchecks against the old path: {'all within tolerance' if not result['failed_checks'] else result['failed_checks']}")
    print_sweep(result)


if __name__ == "__main__":
    main()
