"""Backward block efficiency of sparse_attention: each backend's backward against cuDNN's dense backward.

    python bench/backward.py [--shapes wan1.3b-480p hunyuan-720p] [--densities 0.1 0.2 0.3 0.5]
                             [--kinds band mixed] [--backends triton fa4 fa4/triton flex] [--variants default ... | all]

For each shape (default Wan-1.3B 480p and HunyuanVideo 720p + 256 text, batch 1, bf16) it times
the backward of dense cuDNN SDPA, then the backward of ``sparse_attention`` on every backend
present, on ``compile_layer`` tables at target block densities (widths found by bisection, as in
``bench/attention.py``). Only the backward is timed: the forward runs once per input set with its
graph kept, and each timed call is ``torch.autograd.grad(out, (q, k, v), grad_out)`` (what a
training step pays on top of its forward: for triton the delta pass and the two Triton kernels;
for fa4 FA4's block-sparse backward (its preprocess, main kernel and dQ postprocess) where it
serves the table (``kernels.fa4.backward_path``), else the Triton backward, plus the token-major
permutation; flex and reference recompute their forward). The backend ``fa4/triton`` is fa4 with
the Triton backward forced (``fa4.BACKWARD = "triton"``), the A/B of the two backwards behind one
forward; fa4 rows are labelled with the backward that ran, ``fa4[bwd=fa4]`` or ``fa4[bwd=triton]``.
Reported per row: ms (median over rotated input sets, CUDA events) and
backward block efficiency ``density * t_cuDNN_dense_backward / t``, cuDNN's backward timed beside each row
(``--reference paired``, the default: the mean of its time just before and just after the row, so that both see the
card in one state; a card heating up to its power cap runs rows late in a round at lower clocks than a reference
timed at the round's start), besides ``block_eff_round`` against the round's first cuDNN time (``--reference round``
makes that the row's ``block_eff``, as before session ag). ``--variants`` times the
Triton backward's candidate settings (``kernels.triton.backward.VARIANTS``) against each other,
each first checked on small layouts of each shape's frame count (sizes are not specialised on, so
mostly the very kernels timed) against float64 autograd of the reference backend: relative RMS error of dq, dk, dv
at most twice dense SDPA's own at the same dtype, or the variant is not timed.
fa4 and fa4/triton are checked the same way before they are timed.
Writes ``backward.json`` to ``--out`` and prints a table last (with variants: efficiency per variant);
``--profile``: each timed row's backward once more under torch.profiler, operator tables in ``OUT/profile/``.
``--energy``: also the card's joules per backward (NVML's counter around 2.5 s of more calls), mean watts, and
``energy_eff`` = density x J_cuDNN_dense / J: what a row's block efficiency tends to where the card runs at its
power cap (clocks then follow energy, not work).

``--calls``: also the backward of the whole processor attention call, the family's rotary included
(``bench/processor_attention.py``'s tables), on the Triton backend: ``call-old`` (the model's rotary in
torch, then ``sparse_attention``) and ``call-fused``
(``attention_in_head_order``: rotary and head order in one pass each way, the kernels on head-ordered
tensors; ``call-fused-f32`` with float64 tables cast to float32 once, as ``state.rotary_float32``).
Their bar is the same call dense, the faster of the torch rotary and the fused pass then cuDNN (rows
``dense-call[...]``): ``block_eff`` = density x t_dense_call / t_call. ``op-in-place``: the
``sparse_attention`` op called directly (token-major heads read in place, not put in head order as
``sparse_attention`` under autograd does), against cuDNN alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import (SHAPES, Shape, energy_counter, energy_per_call, gpu_versions, out_dir, profile_to,  # noqa: E402
                    sdpa_with, table_for, time_fn, write_json)

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


def measure(attend, sets, target_ms: float, trace: Path | None = None, energy=None) -> tuple[float, dict]:
    """``(median ms, fields)`` of the backward of ``attend`` over ``sets`` (graphs built once, outside the timing):
    ``host_ms``, the host's median time to issue a call (over the GPU's ms, the GPU waits for it), and ``reps``;
    ``trace``: one more backward under torch.profiler, its operator tables written there; ``energy``: a
    :func:`common.energy_counter`, read around more backwards after the timed ones, adding the fields ``joules``
    (a call) and ``watts`` (their mean draw)."""
    prepare, run = backward_timer(attend)
    prepared = [prepare(*s) for s in sets]
    ms, host_ms, reps = time_fn(run, prepared, target_ms=target_ms)
    spent = {"host_ms": host_ms, "reps": reps}
    if energy is not None:
        joules, _, seconds = energy_per_call(run, prepared, energy)
        spent = {"joules": joules, "watts": joules / seconds}
    if trace is not None:
        profile_to(trace, lambda: run(*prepared[0]), trace.stem)
    del prepared
    return ms, spent


def check_layout(shape: Shape) -> VideoLayout:
    """A small layout with ``shape``'s frame count (a constant of the kernels) and text kind, ragged blocks
    (padded text where the layout allows it: a suffix)."""
    layout = shape.layout
    valid = 30 if layout.text_position == "suffix" else 40
    text = dict(text=40, text_position=layout.text_position, text_valid=valid) if layout.text else {}
    return VideoLayout(layout.frames, 12, 20, **text)


def check_variant(shape: Shape, device, dtype, batch: int = 2, heads: int = 6, backend: str = "triton") -> dict:
    """Relative RMS errors of ``backend``'s backward (dq, dk, dv) under the options in force (the Triton
    backward's variant; fa4's ``BACKWARD``), and dense SDPA's at ``dtype``, against float64 autograd
    (reference backend; dense: SDPA), on ``check_layout(shape)``."""
    from common import kind_patterns

    from sparse_vdit.kernels import sparse_attention

    layout = check_layout(shape)
    table = sparse_vdit.compile_layer(kind_patterns("mixed", 0.1, layout, heads), layout, 128, device)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = [torch.randn(batch, layout.num_tokens, heads, shape.dim, generator=g, device=device) for _ in range(4)]
    kv = layout.kv_len

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in inputs[:3]]
        return torch.autograd.grad(fn(*leaves), leaves, inputs[3].to(dt))

    def error(got, exact):
        return [float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, exact)]

    def dense(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k[:, :kv].transpose(1, 2), v[:, :kv].transpose(1, 2)).transpose(1, 2)  # fmt: skip

    got = grads(lambda q, k, v: sparse_attention(q, k, v, table, backend=backend), dtype)
    exact = grads(lambda q, k, v: sparse_attention(q, k, v, table, backend="reference"), torch.float64)
    dense_error = error(grads(dense, dtype), grads(dense, torch.float64))
    err = error(got, exact)
    ok = all(e <= max(2 * d, 2e-6) for e, d in zip(err, dense_error)) and not any(t.isnan().any() for t in got)
    return {"layout": layout.describe(), "error": err, "dense_error": dense_error, "ok": ok}


def use_variant(name: str | None) -> None:
    """Put the Triton backward's options to variant ``name`` (None: the defaults)."""
    from sparse_vdit.kernels.triton import backward as triton_backward

    triton_backward.OPTIONS.update(dict.fromkeys(triton_backward.OPTIONS))
    if name is not None:
        triton_backward.OPTIONS.update(triton_backward.VARIANTS[name])


def variant_table(result: dict) -> str:
    """Efficiency per (shape, kind, density[, whole call]) row and variant column, from ``result['rows']`` (the
    median over rounds where a cell was timed in several, ``--rounds``)."""
    rows = [r for r in result["rows"] if r.get("variant") and "block_eff" in r]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["kind"], r["target"], r.get("call")) for r in rows))
    samples: dict = {}
    for r in rows:
        samples.setdefault((r["shape"], r["kind"], r["target"], r.get("call"), r["variant"]), []).append(r["block_eff"])
    eff = {key: statistics.median(values) for key, values in samples.items()}
    rounds = max((len(values) for values in samples.values()), default=1)
    lines = [f"shape / kind / density{f' (median of {rounds} rounds)' if rounds > 1 else ''} "
             + " ".join(f"{v:>10s}" for v in variants)]
    for key in keys:
        cells = (f"{eff[(*key, v)]:10.3f}" if (*key, v) in eff else f"{'-':>10s}" for v in variants)
        call = f" / call {key[3]}" if key[3] else ""
        lines.append(f"{key[0]} / {key[1]} / {key[2]:.2f}{call} " + " ".join(cells))
    for variant, checks in result.get("checks", {}).items():
        worst = [max(e / d for e, d in zip(c["error"], c["dense_error"])) for c in checks if "error" in c]
        lines.append(f"check {variant}: {'ok' if all(c['ok'] for c in checks) else 'FAILED'}, worst error "
                     f"{max(worst, default=float('nan')):.2f} x dense SDPA's")  # fmt: skip
    return "\n".join(lines)


FA4_BACKWARDS = {"fa4": "auto", "fa4/triton": "triton"}  # backend spec -> fa4.BACKWARD


def use_backend(spec: str | None) -> str | None:
    """The backend name of ``spec`` (``fa4/triton``: fa4 with its backward forced to Triton's), with
    ``fa4.BACKWARD`` set for it (``fa4.BACKWARD_DEFAULT`` for any other spec, and for None: the default back)."""
    from sparse_vdit.kernels import fa4

    fa4.BACKWARD = FA4_BACKWARDS.get(spec or "", fa4.BACKWARD_DEFAULT)
    return None if spec is None else spec.split("/")[0]


def backend_label(name: str, variant: str | None, table, q) -> tuple[str, str | None]:
    """``(row label, which backward runs)``: fa4 rows say theirs (``fa4[bwd=fa4]``), triton its variant."""
    if name == "fa4":
        from sparse_vdit.kernels import fa4

        path = fa4.backward_path(table.block_size, q.shape[-1], q.dtype, q.device)[0]
        return f"fa4[bwd={path}]", path
    return name + (f"[{variant}]" if variant else ""), ("triton" if name == "triton" else None)


def triton_launches(table, q) -> dict:
    """How the Triton backward's kernels launch on ``table`` for inputs like ``q`` (the options in force): launches of
    each kernel, heads whose key blocks go in windows (over the dS tiles' memory share), heads whose dQ recomputes."""
    from sparse_vdit.kernels.triton import backward as triton_backward, ds_tiles

    if triton_backward.backward_option("dq") != "stored":
        return {"launches": 1, "windowed_heads": 0, "recomputed_heads": table.num_heads}
    share = float(triton_backward.backward_option("ds_budget"))
    chunks = ds_tiles.table_chunks(table, q.shape[0], q.element_size(), q.device, share)
    whole = (0, table.num_q_blocks)
    windowed = {c.h0 + i for c in chunks if c.keys for i, w in enumerate(c.keys) if tuple(w) != whole}
    return {"launches": len(chunks), "windowed_heads": len(windowed),
            "recomputed_heads": sum(c.h1 - c.h0 for c in chunks if not c.stored)}  # fmt: skip


def call_paths(shape: Shape, device, dense, kv: int) -> dict:
    """The processor call's paths for ``--calls``: ``{"dense": {rotary name: fn(q, k, v)}, "call-old":
    make(table) -> fn, "call-fused": make(table) -> fn}``, with the family's rotary tables for ``shape``."""
    from processor_attention import FAMILY, models_rotary, rotary_tables

    from sparse_vdit.kernels import sparse_attention
    from sparse_vdit.kernels.head_order import attention_in_head_order, in_float32, rotate

    rotary = rotary_tables(shape, FAMILY[shape.name], device)

    def torch_rotary(q, k):
        return models_rotary(q, rotary), models_rotary(k, rotary)

    def dense_call(rotate_fn):
        def run(q, k, v):
            q, k = rotate_fn(q, k)
            return dense(q, k[:, :kv], v[:, :kv])

        return run

    def fused(tables):
        return lambda table: lambda q, k, v: attention_in_head_order(q, k, v, table, backend="triton", rotary=tables)

    paths = {
        "dense": {"torch rotary": dense_call(torch_rotary), "fused rotary": dense_call(lambda q, k: rotate(q, k, rotary))},
        "call-old": lambda table: lambda q, k, v: sparse_attention(*torch_rotary(q, k), v, table, backend="triton"),
        "call-fused": fused(rotary),
        # the sparse_attention op itself (token-major heads read in place; no rotary)
        "op-in-place": lambda table: lambda q, k, v: torch.ops.sparse_vdit.sparse_attention(
            q, k, v, table.key, q.shape[-1] ** -0.5, "triton")[0],
    }  # fmt: skip
    if rotary.cos.dtype == torch.float64:  # Wan: also with the tables cast to float32 (the processor's rotary_float32)
        paths["call-fused-f32"] = fused(in_float32(rotary))
    return paths


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    p.add_argument("--densities", nargs="*", type=float, default=[0.10, 0.20, 0.30, 0.50])
    p.add_argument("--kinds", nargs="*", default=["band", "mixed"], choices=["band", "multi_diag", "vertical", "mixed"])
    p.add_argument("--backends", nargs="*", default=["triton", "fa4", "flex"],
                   help="backends to time; fa4/triton: fa4 with the Triton backward (the A/B of fa4's backward)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="Triton backward variants to check and time (names of backward.VARIANTS, or 'all'); "
                        "default: the defaults only, unchecked")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--sets", type=int, default=3, help="rotated input sets (L2 must not flatter)")
    p.add_argument("--target-ms", type=float, default=500.0)
    p.add_argument("--budget-s", type=float, default=500.0, help="stop starting new rows after this long")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every row (and cuDNN's) this many times, the variants in reversed order every other "
                        "round (checked in the first); the summary table gives each cell's median over rounds")
    p.add_argument("--reference", default="paired", choices=["paired", "round"],
                   help="cuDNN's dense backward timed beside each row (paired: before and after it, the mean) or once "
                        "at each round's start (round); rows keep both efficiencies")
    p.add_argument("--out", default=out_dir())
    p.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: triton (interpreter) and reference")
    p.add_argument("--calls", action="store_true",
                   help="also the whole processor call's backward, rotary included: old vs fused path (triton)")
    p.add_argument("--profile", action="store_true",
                   help="after each timed row, one more backward under torch.profiler (tables to OUT/profile/)")
    p.add_argument("--energy", action="store_true",
                   help="also the card's joules per backward (NVML, over 2.5 s of calls after the timed ones), their "
                        "mean watts, and energy_eff = density x J_cuDNN_dense / J (what a power cap makes of a row)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    from sparse_vdit.kernels import registry, sparse_attention
    from sparse_vdit.kernels.triton import backward as triton_backward

    t_start = time.time()
    variants = [None] if args.variants is None else args.variants
    if variants == ["all"]:
        variants = list(triton_backward.VARIANTS)
    unknown = set(variants) - set(triton_backward.VARIANTS) - {None}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(triton_backward.VARIANTS)}")
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
        ok, why = registry.available(name.split("/")[0], device)
        (backends.append(name) if ok else skipped.__setitem__(name, why))
    versions = gpu_versions() if device.type == "cuda" else {"device": "cpu (dry run: not a measurement)"}
    print("device:", json.dumps(versions), flush=True)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    result = {"command": "python bench/backward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": versions, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
              "skipped_backends": skipped, "reference": args.reference, "rows": [], "incomplete": []}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "backward.json")

    energy = energy_counter(device) if args.energy else None
    if args.energy and energy is None:
        result["energy"] = "no energy counter on this device (the CPU, or no NVML): rows without joules"
        print(result["energy"], flush=True)
    joules_dense = None

    def record(**row):
        if "joules" in row and joules_dense is not None and row["kind"] != "dense":
            row["energy_eff"] = row["density"] * joules_dense / row["joules"]
        result["rows"].append(row)
        eff = row.get("block_eff")
        said = f" {row['joules']:8.3f} J {row['watts']:4.0f} W" if "joules" in row else ""
        said += f" energy_eff {row['energy_eff']:.3f}" if "energy_eff" in row else ""
        said += f" (host {row['host_ms']:.2f} ms a call)" if "host_ms" in row else ""
        if row.get("windowed_heads") or row.get("recomputed_heads"):
            said += (f" ({row['launches']} launches, {row['windowed_heads']} heads in key windows, "
                            f"{row['recomputed_heads']} recomputing)")  # fmt: skip
        print(f"  {row['shape']:14s} {row['kind']:10s} {row['density']:6.3f} {row['backend']:28s} {row['ms']:9.3f} ms "
              f"eff {'-' if eff is None else f'{eff:.3f}'}{said}", flush=True)  # fmt: skip

    for shape in shapes:
        layout = shape.layout
        sets = input_sets(shape, args.sets, args.batch, device, dtype)
        print(f"== {shape.name}: {layout.describe()}, {shape.heads} heads x {shape.dim}, batch {args.batch}", flush=True)
        from torch.nn.attention import SDPBackend

        dense = sdpa_with(SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH)

        def dense_backward(q, k, v):
            return dense(q, k[:, :kv], v[:, :kv])

        kv = layout.kv_len
        tables, failed = {}, set()  # failed: variants whose check failed (not timed in any round)
        for rnd in range(args.rounds):  # each round times every row again, the variants in the other order
            in_round = {"round": rnd} if args.rounds > 1 else {}
            t_dense, spent = measure(dense_backward, sets, args.target_ms, energy=energy)
            dense_before = t_dense  # cuDNN's last time (paired: the next row's "before")
            joules_dense = spent.get("joules")
            record(shape=shape.name, kind="dense", target=1.0, density=1.0, backend="cudnn-backward", ms=t_dense,
                   block_eff=1.0, **spent, **in_round)  # fmt: skip
            calls = call_paths(shape, device, dense, kv) if args.calls and "triton" in backends else {}
            t_dense_call = None
            for name, fn in calls.pop("dense", {}).items():
                ms, _ = measure(fn, sets, args.target_ms)
                record(shape=shape.name, kind="dense", target=1.0, density=1.0, backend=f"dense-call[{name}]", ms=ms,
                       block_eff=None, **in_round)  # fmt: skip
                t_dense_call = ms if t_dense_call is None else min(t_dense_call, ms)
            for spec in backends:
                backend = use_backend(spec)
                for variant in (variants if rnd % 2 == 0 else variants[::-1]) if backend == "triton" else [None]:
                    use_variant(variant)
                    label = spec + (f"[{variant}]" if variant else "")
                    if label in failed:
                        continue
                    if rnd == 0 and (variant or backend == "fa4") and time.time() - t_start <= args.budget_s:  # checked
                        try:
                            check = check_variant(shape, device, dtype, backend=backend,
                                                  **({"batch": 1, "heads": 3} if args.dry_run else {}))  # fmt: skip
                        except Exception as exc:  # reported, not fatal
                            check = {"ok": False, "exception": f"{type(exc).__name__}: {str(exc)[:300]}"}
                        checks = result.setdefault("checks", {}).setdefault(variant or spec, [])
                        checks.append({"shape": shape.name, **check})
                        print(f"  check {label} on {shape.name}: {json.dumps(check)}", flush=True)
                        if not check["ok"]:
                            failed.add(label)
                            continue
                    for kind in args.kinds:
                        for density in args.densities:
                            if time.time() - t_start > args.budget_s:
                                result["incomplete"].append(f"{shape.name}/{label}/{kind}/{density}")
                                continue
                            if (kind, density) not in tables:
                                tables[kind, density] = table_for(kind, density, layout, shape.heads, device)[0]
                            table = tables[kind, density]
                            row_label, ran = backend_label(backend, variant, table, sets[0][0])
                            row = dict(shape=shape.name, kind=kind, target=density, backend=row_label, variant=variant,
                                       backward=ran, **in_round)  # fmt: skip
                            trace = (Path(args.out, "profile", f"{shape.name}-{kind}-{density:g}-{row_label}.txt")
                                     if args.profile else None)  # fmt: skip
                            try:
                                ms, spent = measure(lambda q, k, v: sparse_attention(q, k, v, table, backend=backend),
                                                    sets, args.target_ms, trace, energy)  # fmt: skip
                            except Exception as exc:  # reported, not fatal
                                print(f"  {row_label} {kind} {density}: {type(exc).__name__}: {exc}", flush=True)
                                result["rows"].append(dict(**row, error=str(exc)[:300]))
                                continue
                            if ran == "triton":
                                row.update(triton_launches(table, sets[0][0]))
                            t_ref = t_dense
                            if args.reference == "paired":  # cuDNN just before (the last one timed) and just after
                                after, _ = measure(dense_backward, sets, args.target_ms)
                                t_ref, dense_before = (dense_before + after) / 2, after
                            record(**row, density=table.density, ms=ms, block_eff=table.density * t_ref / ms,
                                   dense_ms=t_ref, block_eff_round=table.density * t_dense / ms, **spent)
                            for call, make in calls.items() if backend == "triton" else ():
                                call_trace = trace and trace.with_name(
                                    f"{shape.name}-{kind}-{density:g}-call-{call}.txt")
                                ms, _ = measure(make(table), sets, args.target_ms, call_trace)
                                record(shape=shape.name, kind=kind, target=density, backend=f"{label}[{call}]",
                                       variant=variant, call=call, backward="triton", density=table.density, ms=ms,
                                       **in_round, block_eff=table.density
                                       * (t_dense if call == "op-in-place" else t_dense_call) / ms)  # fmt: skip
        use_variant(None)
        use_backend(None)
        del sets, tables
        sparse_vdit.clear_caches()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(path, result)
    result["wall_s"] = time.time() - t_start
    write_json(path, result)
    if variants != [None]:
        print(variant_table(result))
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
