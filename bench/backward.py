"""Backward block efficiency of sparse_attention: each backend's backward against cuDNN's dense backward.

    python bench/backward.py [--shapes wan1.3b-480p hunyuan-720p] [--densities 0.1 0.2 0.3 0.5]
                             [--kinds band mixed] [--backends triton fa4 flex] [--triton-tiles 128,32,128,32,8 ...]

For each shape (default Wan-1.3B 480p and HunyuanVideo 720p + 256 text, batch 1, bf16) it times
the backward of dense cuDNN SDPA, then the backward of ``sparse_attention`` on every backend
present, on ``compile_layer`` tables at target block densities (widths found by bisection, as in
``bench/attention.py``). Only the backward is timed: the forward runs once per input set with its
graph kept, and each timed call is ``torch.autograd.grad(out, (q, k, v), grad_out)`` (what a
training step pays on top of its forward: for triton and fa4 the delta pass and the two Triton
kernels, plus the token-major permutation where the backend needs it; flex and reference
recompute their forward). Reported per row: ms (median over rotated input sets, CUDA events) and
backward block efficiency ``density * t_cuDNN_dense_backward / t``. ``--triton-tiles`` sweeps
the Triton backward's tiles (dK/dV key tile, its query step, dQ query tile, its key step, warps).
Writes ``backward.json`` to ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import SHAPES, Shape, gpu_versions, out_dir, sdpa_with, table_for, time_fn, write_json  # noqa: E402

import sparse_vdit  # noqa: E402
from sparse_vdit.layout import VideoLayout  # noqa: E402

DEFAULT_SHAPES = ("wan1.3b-480p", "hunyuan-720p")
DRY_SHAPE = Shape("tiny", VideoLayout(4, 8, 16), 2, 64)  # 512 tokens: 4 blocks of 128


def backward_timer(attend):
    """``fn(out, q, k, v, grad_out)`` for timing: the backward of ``out = attend(q, k, v)`` only."""

    def run(out, q, k, v, grad_out):
        return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

    def prepare(q, k, v, grad_out):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return attend(q, k, v), q, k, v, grad_out

    return prepare, run


def input_sets(shape: Shape, count: int, batch: int, device, dtype) -> list:
    g = torch.Generator(device=device).manual_seed(0)
    n = shape.layout.num_tokens
    return [tuple(torch.randn(batch, n, shape.heads, shape.dim, generator=g, device=device, dtype=dtype) for _ in range(4))
            for _ in range(count)]  # fmt: skip


def measure(attend, sets, target_ms: float) -> float:
    """Median ms of the backward of ``attend`` over ``sets`` (graphs built once, outside the timing)."""
    prepare, run = backward_timer(attend)
    prepared = [prepare(*s) for s in sets]
    ms, _, _ = time_fn(run, prepared, target_ms=target_ms)
    del prepared
    return ms


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    p.add_argument("--densities", nargs="*", type=float, default=[0.10, 0.20, 0.30, 0.50])
    p.add_argument("--kinds", nargs="*", default=["band", "mixed"], choices=["band", "multi_diag", "vertical", "mixed"])
    p.add_argument("--backends", nargs="*", default=["triton", "fa4", "flex"])
    p.add_argument("--triton-tiles", nargs="*", default=[None],
                   help="Triton backward tiles to sweep, each 'kv_tile,q_step,q_tile,kv_step,warps' (default: the rule)")
    p.add_argument("--stages", type=int, default=None, help="num_stages of the Triton backward kernels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--sets", type=int, default=3, help="rotated input sets (L2 must not flatter)")
    p.add_argument("--target-ms", type=float, default=500.0)
    p.add_argument("--budget-s", type=float, default=500.0, help="stop starting new rows after this long")
    p.add_argument("--out", default=out_dir())
    p.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: triton (interpreter) and reference")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    from sparse_vdit.kernels import registry, sparse_attention
    from sparse_vdit.kernels.triton import backward as triton_backward

    t_start = time.time()
    if args.dry_run:
        device, dtype, shapes = torch.device("cpu"), torch.float32, [DRY_SHAPE]
        args.densities, args.sets = args.densities[:1], 1
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        shapes = [SHAPES[name] for name in args.shapes]
        torch.backends.cuda.matmul.allow_tf32 = False
    backends, skipped = [], {}
    for name in args.backends + (["reference"] if args.dry_run else []):
        ok, why = registry.available(name, device)
        (backends.append(name) if ok else skipped.__setitem__(name, why))
    versions = gpu_versions() if device.type == "cuda" else {"device": "cpu (dry run: not a measurement)"}
    print("device:", json.dumps(versions), flush=True)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    result = {"command": "python bench/backward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": versions, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
              "skipped_backends": skipped, "rows": [], "incomplete": []}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "backward.json")

    def record(**row):
        result["rows"].append(row)
        eff = row.get("block_eff")
        print(f"  {row['shape']:14s} {row['kind']:10s} {row['density']:6.3f} {row['backend']:28s} {row['ms']:9.3f} ms "
              f"eff {'-' if eff is None else f'{eff:.3f}'}", flush=True)  # fmt: skip

    for shape in shapes:
        layout = shape.layout
        sets = input_sets(shape, args.sets, args.batch, device, dtype)
        print(f"== {shape.name}: {layout.describe()}, {shape.heads} heads x {shape.dim}, batch {args.batch}", flush=True)
        from torch.nn.attention import SDPBackend

        dense = sdpa_with(SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH)

        kv = layout.kv_len
        t_dense = measure(lambda q, k, v: dense(q, k[:, :kv], v[:, :kv]), sets, args.target_ms)
        record(shape=shape.name, kind="dense", target=1.0, density=1.0, backend="cudnn-backward", ms=t_dense, block_eff=1.0)
        for backend in backends:
            for tiles in args.triton_tiles if backend == "triton" else [None]:
                triton_backward.OVERRIDE.update(tiles=tuple(int(x) for x in tiles.split(",")) if tiles else None,
                                                num_stages=args.stages)  # fmt: skip
                label = backend + (f"[{tiles}]" if tiles else "")
                for kind in args.kinds:
                    for density in args.densities:
                        if time.time() - t_start > args.budget_s:
                            result["incomplete"].append(f"{shape.name}/{label}/{kind}/{density}")
                            continue
                        table, _ = table_for(kind, density, layout, shape.heads, device)
                        try:
                            ms = measure(lambda q, k, v: sparse_attention(q, k, v, table, backend=backend), sets,
                                         args.target_ms)  # fmt: skip
                        except Exception as exc:  # reported, not fatal
                            print(f"  {label} {kind} {density}: {type(exc).__name__}: {exc}", flush=True)
                            result["rows"].append(dict(shape=shape.name, kind=kind, target=density, backend=label,
                                                       error=str(exc)[:300]))  # fmt: skip
                            continue
                        record(shape=shape.name, kind=kind, target=density, density=table.density, backend=label,
                               ms=ms, block_eff=table.density * t_dense / ms)  # fmt: skip
        triton_backward.OVERRIDE.update(tiles=None, num_stages=None)
        del sets
        sparse_vdit.clear_caches()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(path, result)
    result["wall_s"] = time.time() - t_start
    write_json(path, result)
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
