"""How sensitive is the organism's video to attention error? Noise in, PSNR out.

    python bench/sensitivity.py [--noise 0.01 0.03 0.1] [--from-steps 0 6] [--captions 2] [--steps 12]
    python bench/sensitivity.py --dry-run   # one caption, 2 steps, one noise level; results to a temp file

Adds Gaussian noise of ``noise x std(output)`` to every self-attention output (every layer) from
step ``from`` on, and scores the videos against the noise-free ones (PSNR, dB). It calibrates the
fidelity benchmark: a sparse pattern whose relative RMS error is ``e`` perturbs a head about as
much as noise ``e`` does. Runs on the CPU (fp32) or the GPU; writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sparse_vdit.metrics import psnr
from sparse_vdit.organism import data as D
from sparse_vdit.organism import model as M

EVAL_DATA_SEED = 777  # the fidelity benchmark's evaluation captions


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="noise std / output std")
    p.add_argument("--from-steps", type=int, nargs="+", default=[0, 6], help="first noisy step")
    p.add_argument("--captions", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--weights", type=Path, help="organism weights folder (default: the shipped ones)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sensitivity.json")
    p.add_argument("--dry-run", action="store_true", help="one caption, 2 steps, noise 0.1 from step 0 (a check)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.captions, args.steps, args.noise, args.from_steps = 1, 2, [0.1], [0]
        if args.out == p.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "sensitivity-dry-run.json"

    path = args.weights or M.WEIGHTS_DIR
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    transformer, spec = M.load_organism(path, args.device, dtype), M.load_spec(path)
    captions = [D.sample_scene(EVAL_DATA_SEED, i).caption for i in range(args.captions)]
    state = {"step": 0, "first": None, "noise": 0.0}

    def add_noise(module, inputs, out):
        if state["first"] is None or state["step"] < state["first"]:
            return out
        gen = torch.Generator().manual_seed(1000 + state["step"])
        return out + state["noise"] * out.std() * torch.randn(out.shape, generator=gen).to(out)

    hooks = [block.attn1.register_forward_hook(add_noise) for block in transformer.blocks]

    def generate():
        def at_step(i, _t):
            state["step"] = i

        return torch.cat([M.sample(transformer, [c], seed=0, steps=args.steps, spec=spec, progress=False,
                                   callback=at_step) for c in captions])  # fmt: skip

    try:
        reference = generate()
        rows = []
        for first in args.from_steps:
            for noise in args.noise:
                state.update(first=first, noise=noise)
                t0 = time.perf_counter()
                scores = psnr(generate(), reference)
                rows.append({"noise": noise, "from_step": first, "psnr_per_video": scores,
                             "psnr": sum(scores) / len(scores)})  # fmt: skip
                print(f"noise {noise:g} from step {first}/{args.steps}: PSNR {rows[-1]['psnr']:.2f} dB "
                      f"({', '.join(f'{s:.2f}' for s in scores)}; {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    data = {"command": "python bench/sensitivity.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": args.device, "dtype": str(dtype), "steps": args.steps, "captions": captions,
            "weights": str(path), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
