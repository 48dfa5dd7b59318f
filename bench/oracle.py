"""How much a block-sparse mask of a given density can keep, at several block sizes (granularity).

    python bench/oracle.py                      # one evaluation caption, 12 steps (1, 4, 7, 10 scored), blocks 16-128
    python bench/oracle.py --captions 2 --densities 0.25 0.35 0.5
    python bench/oracle.py --weights runs/organism-large   # another organism (sparse-vdit train-organism)
    python bench/oracle.py --model fidelity --device cuda --blocks 128 --densities 0.1 0.25 0.5 \
        --generate-densities 0.1 0.15 0.25 0.35 0.5   # the fidelity organism, whole generations too

Records the organism's self-attention inputs (q, k, v) in one dense generation per caption, then
per (layer, head) and block size scores the *oracle* masks, which no pattern can beat at equal
density:

- ``per-call``: in every call, each query block keeps its ``density`` share of key blocks with the
  most attention mass (an online method with perfect information, e.g. an ideal SVG);
- ``static``: one mask per (layer, head), the top blocks of the mass summed over the recorded
  steps (an offline plan with one step range and free-form masks: the bound for the search).

and the search's candidate patterns (``sparse_vdit.methods.candidates``, stripes fitted by mass
over the same calls) with their density at that block size. Errors are the search's: relative MSE
of the head's output, ``|O_mask - O|^2 / |O|^2``, over both halves of the CFG batch, averaged over
the calls. For scale: bench/sensitivity.py finds that ~27 dB needs about 2.5% relative RMS error
in every head, i.e. a relative MSE of ~6e-4.

With ``--generate-densities``, whole generations too: PSNR and SSIM against dense of videos
generated with the static oracle (masks from dense generations of held-out captions, data seed
4242, as the search uses) and with the per-call oracle at each density, on ``--gen-captions`` x
``--gen-seeds`` evaluation videos of ``--gen-steps`` steps, the block ``--gen-block`` (default: the
first of ``--blocks``), every step sparse unless ``--warmup-steps``. ``--skip-per-head`` leaves out
the per-head scoring (which holds every recorded call's q, k, v and N x N attention at once).

Writes ``--out`` (JSON) and prints a table per block size: mean and worst over heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(HERE.parent / "src"))

from sparse_vdit.compare import Method, layout_of, oracle_mass, run_method, score  # noqa: E402
from sparse_vdit.integrations.diffusers import apply, remove  # noqa: E402
from sparse_vdit.methods.candidates import MassVertical, row_mask, tuned_candidates  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.methods.oracle import PerCallOracle, StaticOracle  # noqa: E402
from sparse_vdit.patterns import compile_layer  # noqa: E402
from sparse_vdit.timing import device_name  # noqa: E402

EVAL_DATA_SEED, SEARCH_DATA_SEED = 777, 4242  # as bench/fidelity.py: evaluation and calibration captions
MODELS = M.MODELS


def record(transformer, spec, captions, seed: int, steps: int, keep=lambda step: True) -> dict[tuple[int, int, int], tuple]:
    """(caption, step, layer) -> (q, k, v) of every dense self-attention call (B, N, H, D) at the steps ``keep``s."""
    calls: dict = {}
    current = {"caption": 0}

    def source(call):
        if keep(call.step):
            calls[(current["caption"], call.step, call.layer)] = (call.q.clone(), call.k.clone(), call.v.clone())
        return None

    for i, caption in enumerate(captions):
        current["caption"] = i
        apply(transformer, pattern_source=source, backend="reference", block_size=64)
        try:
            M.sample(transformer, [caption], seed=seed, steps=steps, spec=spec, progress=False)
        finally:
            remove(transformer)
    return calls


def block_mass(p: torch.Tensor, block: int) -> torch.Tensor:
    """Attention probabilities [B, H, N, N] -> mass per (query block, key block), summed over B: [H, Qb, Kb]."""
    b, h, n, _ = p.shape
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        p = torch.nn.functional.pad(p, (0, pad, 0, pad))
    return p.reshape(b, h, nb, block, nb, block).sum((0, 3, 5))


def masked_error(p: torch.Tensor, v: torch.Tensor, out: torch.Tensor, keep: torch.Tensor, block: int) -> torch.Tensor:
    """Relative MSE per head of attention restricted to the key blocks ``keep`` [H, Qb, Kb] (renormalised)."""
    n = p.shape[-1]
    mask = keep.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n]  # [H, N, N]
    pm = p * mask[None]
    pm = pm / pm.sum(-1, keepdim=True).clamp_min(1e-30)
    diff = pm @ v - out
    return diff.pow(2).sum((0, 2, 3)) / out.pow(2).sum((0, 2, 3))


def top_share(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Per (head, query block) the ``density`` share of key blocks with the most mass (at least one)."""
    kb = mass.shape[-1]
    k = max(1, round(density * kb))
    idx = mass.topk(k, dim=-1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, idx, True)


def candidate_masks(layout, block: int, mass_sum: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, keep [H, Qb, Kb] in frame-major order, density [H]) of each search candidate."""
    heads, qb = mass_sum.shape[0], mass_sum.shape[1]
    rows = torch.arange(qb)
    order = layout.token_major_order()  # permutation of the tokens for token-major heads
    out = []
    for c in tuned_candidates():
        if c.name == "skip":
            continue
        if isinstance(c, MassVertical):
            per_head = [c.pattern_for(mass_sum[h].sum(0), layout, block) for h in range(heads)]
        else:
            per_head = [c.pattern] * heads
        keep = torch.stack([row_mask(p, layout, block, rows) for p in per_head])  # in the pattern's order
        density = compile_layer(per_head, layout, block).head_density
        if c.token_major:  # back to frame-major token indices: keep[token-major blocks] -> token mask later
            keep = ("token_major", keep, order)
        out.append((c.key, keep, density))
    return out


def token_major_error(p, v, out, keep, order, block):
    """Relative MSE of a token-major head: the mask lives in the permuted order."""
    pp = p[:, :, order][:, :, :, order]
    return masked_error(pp, v[:, :, order], out[:, :, order], keep, block)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="small", help="shipped organism (default: small)")
    ap.add_argument("--weights", type=Path, default=None, help="organism weights folder (default: --model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--captions", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--from-step", type=int, default=1, help="first recorded step scored (after the warm-up)")
    ap.add_argument("--every", type=int, default=3, help="score every n-th step from --from-step")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.65])
    ap.add_argument("--skip-per-head", action="store_true", help="only the whole generations")
    g = ap.add_argument_group("whole generations")
    g.add_argument("--generate-densities", type=float, nargs="*", default=[])
    g.add_argument("--gen-captions", type=int, default=4, help="evaluation captions (data seed 777)")
    g.add_argument("--gen-seeds", type=int, nargs="+", default=[0])
    g.add_argument("--gen-steps", type=int, default=20)
    g.add_argument("--gen-block", type=int, help="block of the masks (default: the first of --blocks)")
    g.add_argument("--calibration-captions", type=int, default=4, help="held-out captions (data seed 4242)")
    g.add_argument("--warmup-steps", type=int, default=0, help="dense steps before the oracle masks apply")
    g.add_argument("--backend", default="auto", help="sparse kernel of the oracle tables")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "oracle.json")
    return ap.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    weights = args.weights or MODELS[args.model]
    transformer, spec = M.load_organism(weights, args.device, torch.float32), M.load_spec(weights)
    layout = layout_of(spec)
    data = {"weights": str(weights), "layout": layout.describe(), "device": device_name(args.device),
            "command": "python bench/oracle.py " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    info = Path(weights) / "train_info.json"
    if info.exists():  # how far the weights were trained (the fidelity organism is trained in runs)
        data["weights_trained"] = {k: json.loads(info.read_text()).get(k) for k in ("total_steps", "total_videos_seen")}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part and generation row: a run cut short keeps what it measured
        data["wall_s"] = time.perf_counter() - started
        args.out.write_text(json.dumps(data, indent=1) + "\n")

    if not args.skip_per_head:
        data.update(per_head(args, transformer, spec, layout, started))
        save()
    if args.generate_densities:
        del transformer  # generations run in the benchmark's dtype (bf16 on CUDA, as bench/fidelity.py)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        data["generation"] = {}
        generation(args, M.load_organism(weights, args.device, dtype), spec, data["generation"], save)
    save()
    for b in args.blocks if not args.skip_per_head else []:
        print(f"\nblock {b} ({-(-layout.frame_tokens // b)} key blocks per frame); relative MSE over "
              f"{data['heads']} heads")  # fmt: skip
        print("| mask | density | mean | median | worst | heads < 6e-4 |\n|---|---|---|---|---|---|")
        for r in sorted((r for r in data["rows"] if r["block"] == b), key=lambda r: (r["kind"], -r["density"])):
            label = f"{r['kind']} {r['setting']}" if r["kind"] != "candidate" else r["setting"]
            print(f"| {label} | {r['density']:.1%} | {r['mean_rel_mse']:.2e} | {r['median_rel_mse']:.2e} | "
                  f"{r['max_rel_mse']:.2e} | {r['heads_under_6e-4']} |")  # fmt: skip
    if args.generate_densities:
        print(generation_table(data["generation"]))
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


def per_head(args, transformer, spec, layout, started: float) -> dict:
    """Per (layer, head) and block size, the relative MSE of the oracle masks and the search's candidates."""
    aspect = spec.width / spec.height
    captions = [D.sample_scene(EVAL_DATA_SEED, i, spec.frames, aspect).caption for i in range(args.captions)]
    scored = lambda step: step >= args.from_step and (step - args.from_step) % args.every == 0  # noqa: E731
    calls = record(transformer, spec, captions, args.seed, args.steps, scored)
    layers = sorted({key[2] for key in calls})
    heads = next(iter(calls.values()))[0].shape[2]
    print(f"recorded {len(calls)} calls in {time.perf_counter() - started:.0f} s", flush=True)

    # first pass: mass per (layer, block) summed over calls, for the static oracle and fitted stripes
    mass_sum = {(layer, b): 0 for layer in layers for b in args.blocks}
    for (_, _, layer), (q, k, v) in calls.items():
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        p = torch.softmax(qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        for b in args.blocks:
            mass_sum[(layer, b)] = mass_sum[(layer, b)] + block_mass(p, b)

    results: dict = {}  # (block, kind, key) -> [layers, heads] summed errors
    densities: dict = {}
    count: dict = {layer: 0 for layer in layers}
    masks = {(layer, b): candidate_masks(layout, b, mass_sum[(layer, b)]) for layer in layers for b in args.blocks}
    for (_, step, layer), (q, k, v) in calls.items():
        count[layer] += 1
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        out = p @ vh
        for b in args.blocks:
            mass = block_mass(p, b)
            li = layers.index(layer)

            def add(kind, key, err, dens):
                acc = results.setdefault((b, kind, key), torch.zeros(len(layers), heads, dtype=torch.float64))
                acc[li] += err.double().cpu()
                densities[(b, kind, key)] = dens

            for d in args.densities:  # density: the share actually kept (at least one block per row)
                keep = top_share(mass, d)
                add("per-call", d, masked_error(p, vh, out, keep, b), float(keep.double().mean()))
                keep = top_share(mass_sum[(layer, b)], d)
                add("static", d, masked_error(p, vh, out, keep, b), float(keep.double().mean()))
            for name, keep, dens in masks[(layer, b)]:
                if isinstance(keep, tuple):
                    err = token_major_error(p, vh, out, keep[1].to(p.device), keep[2].to(p.device), b)
                else:
                    err = masked_error(p, vh, out, keep.to(p.device), b)
                add("candidate", name, err, float(dens.mean()))
        print(f"  step {step} layer {layer} done ({time.perf_counter() - started:.0f} s)", flush=True)

    counts = torch.tensor([count[layer] for layer in layers], dtype=torch.float64)[:, None]
    rows = []
    for (b, kind, key), acc in results.items():
        err = acc / counts
        rows.append({"block": b, "kind": kind, "setting": key, "density": densities[(b, kind, key)],
                     "mean_rel_mse": float(err.mean()), "median_rel_mse": float(err.median()),
                     "max_rel_mse": float(err.max()), "heads_under_6e-4": int((err < 6e-4).sum()),
                     "share_under_6e-4": float((err < 6e-4).double().mean()), "per_head": err.tolist()})  # fmt: skip
    return {"captions": captions, "seed": args.seed, "steps": args.steps, "from_step": args.from_step,
            "heads": len(layers) * heads, "calls": len(calls), "rows": rows}  # fmt: skip


def generation(args, transformer, spec, out: dict, save) -> None:
    """PSNR / SSIM against dense of whole generations with the static and per-call oracles, into ``out``."""
    block = args.gen_block or args.blocks[0]
    aspect = spec.width / spec.height
    captions = [D.sample_scene(EVAL_DATA_SEED, i, spec.frames, aspect).caption for i in range(args.gen_captions)]
    held_out = [D.sample_scene(SEARCH_DATA_SEED, i, spec.frames, aspect).caption for i in range(args.calibration_captions)]
    videos = [(c, s) for c in captions for s in args.gen_seeds]
    run = dict(steps=args.gen_steps, spec=spec, backend=args.backend, block_size=block, progress=False)
    t0 = time.perf_counter()
    mass = oracle_mass(transformer, spec, held_out, steps=args.gen_steps, seeds=args.gen_seeds[:1], block_size=block,
                       from_step=args.warmup_steps, progress=False)  # fmt: skip
    out.update({"captions": captions, "seeds": args.gen_seeds, "steps": args.gen_steps, "block": block,
                "dtype": str(transformer.patch_embedding.weight.dtype).removeprefix("torch."),
                "warmup_steps": args.warmup_steps, "calibration_captions": held_out,
                "calibration_seconds": time.perf_counter() - t0, "rows": []})  # fmt: skip
    dense = run_method(transformer, Method("dense", "dense"), videos, **run)
    out["dense_seconds"] = dense.seconds
    for d in args.generate_densities:
        for kind, make in (("static", lambda d=d: StaticOracle(mass, d, block, args.warmup_steps)),
                           ("per-call", lambda d=d: PerCallOracle(d, block, args.warmup_steps))):  # fmt: skip
            r = run_method(transformer, Method(f"oracle-{kind}-{d:g}", "source", source=make), videos, **run)
            s = score(r, dense)
            out["rows"].append({"kind": kind, "mask_density": d, "density": r.density, "psnr": s["psnr"],
                                "ssim": s["ssim"], "psnr_per_video": s["psnr_per_video"], "seconds": r.seconds})  # fmt: skip
            save()
            print(f"  oracle {kind} {d:.0%}: PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.4f}", flush=True)


def generation_table(gen: dict) -> str:
    """Markdown: PSNR / SSIM of whole generations per oracle and density."""
    lines = [f"\nwhole generations: {len(gen['captions'])} captions x {len(gen['seeds'])} seeds, {gen['steps']} steps, "
             f"block {gen['block']}, {gen['warmup_steps']} dense warm-up steps; PSNR / SSIM against dense",
             "| oracle | mask density | attention density | PSNR dB | SSIM |", "|---|---|---|---|---|"]  # fmt: skip
    for r in gen["rows"]:
        lines.append(f"| {r['kind']} | {r['mask_density']:.0%} | {r['density']:.1%} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
