"""Where an organism's self-attention mass goes: per step, layer and head, how local it is.

    python bench/locality.py --model fidelity --device cuda --steps 20 --record 2 6 10 14 18
    python bench/locality.py --weights runs/organism --out locality.json
    python bench/locality.py --summarize bench/results/locality-*.json     (compare saved runs)

Records q and k of one dense generation (``bench/oracle.py``'s recorder, the cond half of CFG) and
reports, as the mean over query rows of the attention mass that falls in a region:

- ``top1`` / ``top5`` / ``top25``: the 1%, 5%, 25% of keys with the most mass (token level: how
  concentrated attention is, wherever it goes);
- ``blk25``: the 25% of 128-token key blocks with the most mass per query block (what a per-call
  oracle mask of 25% density keeps);
- ``frame``: the query's own frame; ``band3``: frames within one of the query's;
- ``window``: |dt| <= 1, |dy| <= 2, |dx| <= 2 tokens; ``tube``: |dy| <= 2, |dx| <= 2 in any frame;
- ``eff``: exp(entropy) / keys, the effective share of keys attended to.

Each region's share of all keys is printed beside it, so that mass can be read against area.
Heads are also counted by kind (their ``eff`` averaged over the recorded calls): ``sharp`` (<= 5%
of the keys), ``uniform`` (>= 60%; ``flat`` >= 95% of them), ``between`` the rest; uniform heads
are what no block mask can serve (BENCHMARKS.md, #15).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from oracle import EVAL_DATA_SEED, MODELS, block_mass, record  # noqa: E402

from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402

METRICS = ("eff", "top1", "top5", "top25", "blk25", "frame", "band3", "window", "tube")


def regions(grid: tuple[int, int, int], device) -> dict[str, torch.Tensor]:
    """Boolean (N, N) masks of the positional regions, N = frames x height x width tokens."""
    t, h, w = grid
    i = torch.arange(t * h * w, device=device)
    ft, fy, fx = i // (h * w), (i // w) % h, i % w
    dt = (ft[:, None] - ft[None]).abs()
    near = ((fy[:, None] - fy[None]).abs() <= 2) & ((fx[:, None] - fx[None]).abs() <= 2)
    return {"frame": dt == 0, "band3": dt <= 1, "window": (dt <= 1) & near, "tube": near}


def head_stats(q: torch.Tensor, k: torch.Tensor, masks: dict[str, torch.Tensor], block: int = 128) -> dict[str, float]:
    """Locality metrics of one head's attention, ``q`` and ``k`` (N, D) as the kernel sees them."""
    n = q.shape[0]
    p = ((q.float() @ k.float().T) * q.shape[-1] ** -0.5).softmax(-1)
    out = {"eff": float((-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().exp() / n)}
    ranked = p.sort(-1, descending=True).values.cumsum(-1)
    for name, share in (("top1", 0.01), ("top5", 0.05), ("top25", 0.25)):
        out[name] = float(ranked[:, max(1, round(share * n)) - 1].mean())
    del ranked
    mass = block_mass(p[None, None], block)[0]  # [Qb, Kb]
    keep = max(1, round(0.25 * mass.shape[-1]))
    out["blk25"] = float((mass.topk(keep, -1).values.sum(-1) / mass.sum(-1)).mean())
    for name, m in masks.items():
        out[name] = float((p * m).sum(-1).mean())
    return out


def summarize(rows: list[dict], key: str) -> list[dict]:
    """Mean of every metric over the rows sharing ``key`` (``step``, ``layer`` or ``head``)."""
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return [{key: g, **{m: sum(r[m] for r in rs) / len(rs) for m in METRICS}} for g, rs in sorted(groups.items())]


SHARP, UNIFORM, FLAT = 0.05, 0.60, 0.95  # effective share of keys: head kinds


def head_kinds(rows: list[dict]) -> dict[str, float]:
    """Heads counted by kind from their ``eff`` averaged over every recorded call (see the module docstring)."""
    effs: dict = defaultdict(list)
    for r in rows:
        effs[(r["layer"], r["head"])].append(r["eff"])
    mean = [sum(e) / len(e) for e in effs.values()]
    sharp, uniform = sum(e <= SHARP for e in mean), sum(e >= UNIFORM for e in mean)
    return {"heads": len(mean), "sharp": sharp, "between": len(mean) - sharp - uniform, "uniform": uniform,
            "flat": sum(e >= FLAT for e in mean), "eff": sum(mean) / max(1, len(mean))}  # fmt: skip


def compare(paths: list[Path]) -> str:
    """A markdown table of saved locality JSONs side by side: training, head kinds, mean locality."""
    lines = ["| weights | steps (videos) | grid | sharp | between | uniform (flat) | eff | blk25 | window |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        data = json.loads(Path(path).read_text())
        kinds, trained = head_kinds(data["rows"]), data.get("weights_trained") or {}
        mean = {m: sum(r[m] for r in data["rows"]) / len(data["rows"]) for m in ("blk25", "window")}
        lines.append(f"| {Path(path).stem} | {trained.get('total_steps', '?')} ({trained.get('total_videos_seen', '?')}) "
                     f"| {'x'.join(map(str, data['grid']))} | {kinds['sharp']} | {kinds['between']} "
                     f"| {kinds['uniform']} ({kinds['flat']}) | {kinds['eff']:.2f} | {mean['blk25']:.2f} "
                     f"| {mean['window']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def table(summary: list[dict], key: str, area: dict[str, float]) -> str:
    head = f"| {key} | " + " | ".join(f"{m} ({area[m]:.1%})" if m in area else m for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    lines += [f"| {s[key]} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |" for s in summary]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=tuple(MODELS), default="fidelity", help="a shipped organism")
    ap.add_argument("--weights", type=Path, default=None, help="another organism folder (overrides --model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--captions", type=int, default=1, help="evaluation captions (data seed 777)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the recorded generation")
    ap.add_argument("--record", type=int, nargs="+", default=[2, 10, 18], help="steps whose calls are scored")
    ap.add_argument("--out", type=Path, default=Path("bench/results/locality.json"))
    ap.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                    help="only print saved locality JSONs side by side (no model is run)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(compare(args.summarize))
        return 0
    started = time.perf_counter()
    weights = args.weights or MODELS[args.model]
    dtype = torch.float32
    transformer, spec = M.load_organism(weights, args.device, dtype), M.load_spec(weights)
    captions = [D.sample_scene(EVAL_DATA_SEED, i, spec.frames, spec.width / spec.height).caption
                for i in range(args.captions)]  # fmt: skip
    calls = record(transformer, spec, captions, args.seed, args.steps, lambda s: s in set(args.record))
    if not calls:
        raise SystemExit(f"no calls recorded: --record {args.record} outside 0..{args.steps - 1}")
    masks = regions(spec.token_grid, args.device)
    area = {name: float(m.float().mean()) for name, m in masks.items()}
    rows = []
    for (caption, step, layer), (q, k, _v) in sorted(calls.items()):
        for head in range(q.shape[2]):
            rows.append({"caption": caption, "step": step, "layer": layer, "head": head,
                         **head_stats(q[0, :, head], k[0, :, head], masks)})  # fmt: skip
    out = {"weights": str(weights), "grid": list(spec.token_grid), "steps": args.steps, "captions": captions,
           "command": "python bench/locality.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "area": area, "head_kinds": head_kinds(rows), "rows": rows,
           "wall_s": time.perf_counter() - started}  # fmt: skip
    info = Path(weights) / "train_info.json"
    if info.exists():
        out["weights_trained"] = {k: json.loads(info.read_text()).get(k) for k in ("total_steps", "total_videos_seen")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for key in ("step", "layer"):
        print(table(summarize(rows, key), key, area) + "\n")
    kinds = out["head_kinds"]
    print(f"heads: {kinds['sharp']} sharp (eff <= {SHARP:.0%}), {kinds['between']} between, {kinds['uniform']} "
          f"uniform (eff >= {UNIFORM:.0%}; {kinds['flat']} >= {FLAT:.0%}) of {kinds['heads']}")  # fmt: skip
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
