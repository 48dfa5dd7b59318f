"""How much a block-sparse mask of a given density can keep, at several block sizes (granularity).

    python bench/oracle.py                      # one evaluation caption, 12 steps (1, 4, 7, 10 scored), blocks 16-128
    python bench/oracle.py --captions 2 --densities 0.25 0.35 0.5
    python bench/oracle.py --weights runs/organism-large   # another organism (sparse-vdit train-organism)

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

from sparse_vdit.compare import layout_of  # noqa: E402
from sparse_vdit.integrations.diffusers import apply, remove  # noqa: E402
from sparse_vdit.methods.candidates import MassVertical, row_mask, tuned_candidates  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.patterns import compile_layer  # noqa: E402

EVAL_DATA_SEED = 777


def record(transformer, spec, captions, seed: int, steps: int) -> dict[tuple[int, int, int], tuple]:
    """(caption, step, layer) -> (q, k, v) of every dense self-attention call (B, N, H, D)."""
    calls: dict = {}
    current = {"caption": 0}

    def source(call):
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


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="organism weights folder (default: the shipped ones)")
    ap.add_argument("--captions", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--from-step", type=int, default=1, help="first recorded step scored (after the warm-up)")
    ap.add_argument("--every", type=int, default=3, help="score every n-th step from --from-step")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.65])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "oracle.json")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    weights = args.weights or M.WEIGHTS_DIR
    transformer, spec = M.load_organism(weights, "cpu", torch.float32), M.load_spec(weights)
    layout = layout_of(spec)
    captions = [D.sample_scene(EVAL_DATA_SEED, i).caption for i in range(args.captions)]
    calls = record(transformer, spec, captions, args.seed, args.steps)
    calls = {key: t for key, t in calls.items() if key[1] >= args.from_step and (key[1] - args.from_step) % args.every == 0}
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
    for (_, _, layer), (q, k, v) in calls.items():
        count[layer] += 1
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        out = p @ vh
        for b in args.blocks:
            mass = block_mass(p, b)
            li = layers.index(layer)

            def add(kind, key, err, dens):
                acc = results.setdefault((b, kind, key), torch.zeros(len(layers), heads, dtype=torch.float64))
                acc[li] += err.double()
                densities[(b, kind, key)] = dens

            for d in args.densities:
                add("per-call", d, masked_error(p, vh, out, top_share(mass, d), b), d)
                add("static", d, masked_error(p, vh, out, top_share(mass_sum[(layer, b)], d), b), d)
            for name, keep, dens in masks[(layer, b)]:
                if isinstance(keep, tuple):
                    err = token_major_error(p, vh, out, keep[1], keep[2], b)
                else:
                    err = masked_error(p, vh, out, keep, b)
                add("candidate", name, err, float(dens.mean()))
        print(f"  step {_} layer {layer} done ({time.perf_counter() - started:.0f} s)", flush=True)

    counts = torch.tensor([count[layer] for layer in layers], dtype=torch.float64)[:, None]
    rows = []
    for (b, kind, key), acc in results.items():
        err = acc / counts
        rows.append({"block": b, "kind": kind, "setting": key, "density": densities[(b, kind, key)],
                     "mean_rel_mse": float(err.mean()), "median_rel_mse": float(err.median()),
                     "max_rel_mse": float(err.max()), "heads_under_6e-4": int((err < 6e-4).sum()),
                     "per_head": err.tolist()})  # fmt: skip
    data = {"captions": captions, "seed": args.seed, "steps": args.steps, "from_step": args.from_step,
            "layout": layout.describe(), "heads": len(layers) * heads, "calls": len(calls),
            "command": "python bench/oracle.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "wall_s": time.perf_counter() - started, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for b in args.blocks:
        print(f"\nblock {b} ({-(-layout.frame_tokens // b)} key blocks per frame); relative MSE over "
              f"{len(layers) * heads} heads")  # fmt: skip
        print("| mask | density | mean | median | worst | heads < 6e-4 |\n|---|---|---|---|---|---|")
        for r in sorted((r for r in rows if r["block"] == b), key=lambda r: (r["kind"], -r["density"])):
            label = f"{r['kind']} {r['setting']}" if r["kind"] != "candidate" else r["setting"]
            print(f"| {label} | {r['density']:.1%} | {r['mean_rel_mse']:.2e} | {r['median_rel_mse']:.2e} | "
                  f"{r['max_rel_mse']:.2e} | {r['heads_under_6e-4']} |")  # fmt: skip
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
