"""Block-sparse attention benchmark: every sparse backend against the dense kernels, four model shapes.

    python bench/attention.py [--quick] [--out DIR] [--budget-s 330]

For each shape of DESIGN.md (Wan-1.3B 480p, Wan-14B 720p, HunyuanVideo 720p + 256 text,
CogVideoX1.5 768p + 226 text, D=64) it times dense cuDNN SDPA, FlashAttention-2 SDPA, FA4 dense
and FlexAttention dense, then every sparse backend (fa4, flex, triton where present) through the
public ``sparse_attention`` (token-major permutation included) on pattern tables built by
``compile_layer`` at target block densities 5-100%: band (diagonal), multi-diagonal (all heads
token-major), vertical stripes (half of the first frame + a band) and mixed heads (diagonal,
multi-diagonal, vertical, one skip head). Widths are found by bisection to hit each density.

Reported per row: ms (median over rotated random input sets, CUDA events), effective TFLOP/s on
the computed blocks (4 * B * D * block^2 per visited block pair), and block efficiency
``density * t_cuDNN_dense / t``. Writes ``attention.json`` to ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import (  # noqa: E402
    write_json,
    BLOCK, DENSITIES, KINDS, QUICK_SHAPES, SHAPES, gpu_versions, out_dir, sdpa_with, table_for, time_fn,
)

import sparse_vdit  # noqa: E402
from sparse_vdit.layout import VideoLayout  # noqa: E402
from sparse_vdit.patterns import compile_layer, multi_diagonal  # noqa: E402

# ---------------------------------------------------------------------------------------------
# kernels


def dense_baselines(have_fa4: bool) -> dict:
    from torch.nn.attention import SDPBackend

    out = {"cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION), "fa2": sdpa_with(SDPBackend.FLASH_ATTENTION)}
    if have_fa4:
        from sparse_vdit.kernels import fa4

        out["fa4-dense"] = lambda q, k, v: fa4.dense(q, k, v)
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_vdit.kernels.flex import bump_recompile_limits

    bump_recompile_limits()
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    out["flex-dense"] = lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out


def sparse_backends(requested) -> tuple[dict, dict]:
    from sparse_vdit.kernels import registry, sparse_attention

    device = torch.device("cuda", torch.cuda.current_device())
    found, skipped = {}, {}
    for name in requested:
        ok, why = registry.available(name, device)
        if ok:
            found[name] = lambda q, k, v, table, name=name: sparse_attention(q, k, v, table, backend=name)
        else:
            skipped[name] = why
    return found, skipped


def direct_backend(name):
    """The backend's run on a table, without the API (for the 100% row: no dense shortcut)."""
    from sparse_vdit.kernels import registry

    module = registry.get(name).module
    return lambda q, k, v, table: module.run(q, k, v, table, q.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------
# permutation cost (token-major heads)


def token_major_copy(x: torch.Tensor, layout: VideoLayout, inverse: bool = False) -> torch.Tensor:
    """All heads to token-major order (or back) as one strided copy of the video part, no index."""
    b, n, h, d = x.shape
    f, s, v0 = layout.frames, layout.frame_tokens, layout.video_start
    v1 = v0 + f * s
    out = torch.empty_like(x)
    out[:, :v0] = x[:, :v0]
    out[:, v1:] = x[:, v1:]
    src = x[:, v0:v1].view(b, s, f, h, d) if inverse else x[:, v0:v1].view(b, f, s, h, d)
    dst = out[:, v0:v1].view(b, f, s, h, d) if inverse else out[:, v0:v1].view(b, s, f, h, d)
    dst.copy_(src.transpose(1, 2))
    return out


def permutation_costs(shapes, args, dtype, device) -> list:
    """Time the API's token-major gather (index_select over seq*heads) against a strided copy."""
    from sparse_vdit.kernels import api

    rows = []
    for name in shapes:
        sh = SHAPES[name]
        layout = sh.layout
        table = compile_layer([multi_diagonal(0.05)] * sh.heads, layout, BLOCK, device)
        heads = table.token_major_heads
        sets = [
            tuple(torch.randn(args.batch, layout.num_tokens, sh.heads, sh.dim, device=device, dtype=dtype) for _ in range(4))
            for _ in range(2)
        ]
        a = api.reorder_heads(sets[0][0], layout, heads)
        assert torch.equal(a, token_major_copy(sets[0][0], layout))
        assert torch.equal(api.reorder_heads(a, layout, heads, False), token_major_copy(a, layout, inverse=True))

        def gather(q, k, v, o):  # what sparse_attention does around the kernel: 3 copies in, 1 out
            return [api.reorder_heads(t, layout, heads) for t in (q, k, v)], api.reorder_heads(o, layout, heads, False)

        def strided(q, k, v, o):
            return [token_major_copy(t, layout) for t in (q, k, v)], token_major_copy(o, layout, inverse=True)

        nbytes = 8 * sets[0][0].numel() * sets[0][0].element_size()  # 4 tensors, read + write
        for label, fn in (("api", gather), ("strided-copy", strided)):
            ms, host, reps = time_fn(fn, sets, target_ms=200)
            rows.append(dict(shape=name, method=label, ms=ms, gbps=nbytes / ms * 1e-6, floor_ms=nbytes / 3.0e9))
            print(f"  permutation {name:18s} {label:13s} {ms:7.3f} ms  {nbytes / ms * 1e-6:7.0f} GB/s "
                  f"(floor at 3.0 TB/s: {nbytes / 3.0e9:.3f} ms)", flush=True)  # fmt: skip
        del sets
    return rows


# ---------------------------------------------------------------------------------------------
# main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SHAPES)}, densities 10/30/100%%")
    p.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES))
    p.add_argument("--densities", nargs="*", type=float, default=None)
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--backends", nargs="*", default=["fa4", "triton", "flex"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--sets", type=int, default=3, help="rotated input sets (L2 must not flatter)")
    p.add_argument("--target-ms", type=float, default=500.0, help="time spent timing one row (after warm-up)")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new rows after this long")
    p.add_argument("--out", default=out_dir())
    p.add_argument("--triton-autotune", action="store_true",
                   help="measured Triton tiles (SPARSE_VDIT_TRITON_AUTOTUNE=1): tuned in a warm-up, cached")
    p.add_argument("--permutation", action="store_true", help="only time the token-major permutation (API gather vs strided copy)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests of this script only
    p.add_argument("--dry-run", action="store_true", help="build the tables and print their densities only (CPU)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.triton_autotune:  # before any launch: the launcher reads it per call
        os.environ["SPARSE_VDIT_TRITON_AUTOTUNE"] = "1"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    densities = args.densities or ((0.10, 0.30, 1.00) if args.quick else DENSITIES)
    t_start = time.time()

    if args.dry_run:
        for name in shapes:
            sh = SHAPES[name]
            for kind in args.kinds:
                for d in densities:
                    if d >= 1.0 and kind != args.kinds[0]:
                        continue
                    t0 = time.time()
                    table, s = table_for(kind, d, sh.layout, sh.heads, "cpu")
                    print(f"{name:18s} {kind:10s} target {d:.2f} -> {table.density:.3f} (s={s:.4f}, {1e3 * (time.time() - t0):.0f} ms)")
        return {}

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    info = gpu_versions()
    print("device:", json.dumps(info), flush=True)
    if args.permutation:
        rows = permutation_costs(shapes, args, dtype, device)
        write_json(os.path.join(args.out, "permutation.json"), {"versions": info, "rows": rows})
        return {"permutation": rows}
    sparse, skipped = sparse_backends(args.backends)
    for name, why in skipped.items():
        print(f"skipping sparse backend {name}: {why}", flush=True)
    baselines = dense_baselines("fa4" in sparse)
    result = {
        "command": "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": info,
        "dtype": args.dtype,
        "batch": args.batch,
        "block": BLOCK,
        "skipped_backends": skipped,
        "rows": [],
        "incomplete": [],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention.json")

    def over_budget(what):
        if time.time() - t_start > args.budget_s:
            result["incomplete"].append(what)
            return True
        return False

    def record(**row):
        result["rows"].append(row)
        eff = row.get("block_eff")
        print(
            f"  {row['shape']:18s} {row['kind']:10s} {row['density']:6.3f} {row['backend']:12s} "
            f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TF/s eff {eff if eff is None else round(eff, 3)} "
            f"host {row['host_ms']:.3f} ms",
            flush=True,
        )

    # Pass 1: the dense baselines and fa4 (the target) on every shape; pass 2: the rest.
    first = [b for b in sparse if b == "fa4"]
    passes = [(True, first), (False, [b for b in sparse if b not in first])]
    t_cudnn: dict[str, float] = {}
    for with_baselines, backends in passes:
        if not with_baselines and not backends:
            continue
        for name in shapes:
            sh = SHAPES[name]
            layout = sh.layout
            n, kv_len = layout.num_tokens, layout.kv_len
            torch.manual_seed(0)
            sets = [
                tuple(torch.randn(args.batch, n, sh.heads, sh.dim, device=device, dtype=dtype) for _ in range(3))
                for _ in range(args.sets)
            ]
            dense_flops = 4.0 * args.batch * sh.heads * n * kv_len * sh.dim
            print(f"== {name}: {layout.describe()}, {sh.heads} heads x {sh.dim}, batch {args.batch}", flush=True)
            for bname, fn in baselines.items() if with_baselines else ():
                if over_budget(f"{name}/{bname}"):
                    break
                try:
                    ms, host, reps = time_fn(fn, sets, target_ms=args.target_ms)
                except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                    print(f"  {bname} failed: {type(exc).__name__}: {exc}", flush=True)
                    result["rows"].append(dict(shape=name, kind="dense", backend=bname, error=str(exc)[:300]))
                    continue
                if bname == "cudnn":
                    t_cudnn[name] = ms
                ref = t_cudnn.get(name)
                record(shape=name, kind="dense", target=1.0, density=1.0, backend=bname, ms=ms, host_ms=host, reps=reps,
                       tflops=dense_flops / ms * 1e-9, block_eff=ref / ms if ref else None)  # fmt: skip
            for bname in backends:
                for d in densities:
                    for kind in args.kinds if d < 1.0 else ["all-dense"]:
                        if over_budget(f"{name}/{bname}/{kind}/{d}"):
                            break
                        table, s = table_for(kind if kind != "all-dense" else "band", d, layout, sh.heads, device)
                        blocks = int(table.kv_num_blocks.sum())
                        flops = 4.0 * args.batch * sh.dim * BLOCK * BLOCK * blocks
                        runs = [(bname, sparse[bname])]
                        if d >= 1.0:  # the API sends all-dense tables to a dense kernel; time the block path too
                            runs.append((f"{bname}-direct", direct_backend(bname)))
                        for label, fn in runs:
                            try:
                                ms, host, reps = time_fn(lambda q, k, v: fn(q, k, v, table), sets, target_ms=args.target_ms)
                            except Exception as exc:
                                print(f"  {label} {kind} {d}: {type(exc).__name__}: {exc}", flush=True)
                                result["rows"].append(dict(shape=name, kind=kind, target=d, backend=label, error=str(exc)[:300]))
                                continue
                            ref = t_cudnn.get(name)
                            record(shape=name, kind=kind, target=d, density=table.density, scale=s, backend=label,
                                   ms=ms, host_ms=host, reps=reps, tflops=flops / ms * 1e-9,
                                   block_eff=table.density * ref / ms if ref else None)  # fmt: skip
            del sets
            sparse_vdit.clear_caches()
            torch.cuda.empty_cache()
            write_json(path, result)

    result["wall_s"] = time.time() - t_start
    write_json(path, result)
    print_table(result)
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


def print_table(result: dict) -> None:
    rows = [r for r in result["rows"] if "ms" in r]
    print("\n" + json.dumps(result["versions"]))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sr = [r for r in rows if r["shape"] == shape]
        base = "  ".join(f"{r['backend']} {r['ms']:.2f}ms/{r['tflops']:.0f}TF" for r in sr if r["kind"] == "dense")
        print(f"\n{shape}: {base}")
        backends = list(dict.fromkeys(r["backend"] for r in sr if r["kind"] != "dense"))
        print(f"  {'kind':10s} {'target':>6s} {'dens':>6s} " + " ".join(f"{b:>22s}" for b in backends))
        keys = list(dict.fromkeys((r["kind"], r["target"]) for r in sr if r["kind"] != "dense"))
        for kind, target in keys:
            cells, dens = [], None
            for b in backends:
                hit = [r for r in sr if r["backend"] == b and r["kind"] == kind and r["target"] == target]
                if hit:
                    dens = hit[0]["density"]
                    eff = hit[0]["block_eff"]
                    cells.append(f"{hit[0]['ms']:8.2f}ms eff " + ("-" if eff is None else f"{eff:.2f}"))
                else:
                    cells.append("-")
            print(f"  {kind:10s} {target:6.2f} {dens:6.3f} " + " ".join(f"{c:>22s}" for c in cells))
    if result.get("incomplete"):
        print(f"\nnot run (time budget): {len(result['incomplete'])} rows, first {result['incomplete'][0]}")


if __name__ == "__main__":
    main()
