"""Sparse-aware fine-tuning of the organism: how much of a plan's gap to dense a LoRA trained with it closes.

    python bench/finetune.py [--weights DIR] [--densities 0.1 0.25] [--minutes 5] [--captions 8 --seeds 0 1]

For each target density a uniform band plan (every head ``diagonal``, width found by bisection;
block 64) is scored on held-out captions (PSNR / SSIM of its videos against the dense model's,
``sparse_vdit.compare``), then a PEFT LoRA (``to_q, to_k, to_v, to_out.0``) is trained with the
plan applied for a fixed wall-clock budget, by distillation: on noised training videos (scenes of
another data seed, rectified-flow ``t`` as the organism was trained) the sparse LoRA model's
velocity is fitted to the frozen dense model's. The plan is scored again after. Default weights:
the fidelity organism (``organism/weights-fidelity``). Writes ``finetune.json`` to ``--out``.
``--dry-run``: a tiny random organism on the CPU, a few steps (checks the script, not a result).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import environment, out_dir, write_json  # noqa: E402

from sparse_vdit import Plan, apply, compile_layer, remove  # noqa: E402
from sparse_vdit.compare import Method, layout_of, run_method, score  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.patterns import diagonal  # noqa: E402

EVAL_DATA_SEED, TRAIN_DATA_SEED = 777, 9090  # held-out evaluation captions (as bench/fidelity.py), training scenes
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def band_plan(transformer, spec, target: float, block: int) -> Plan:
    """A uniform ``diagonal`` plan whose block density is the closest bisection reaches to ``target``."""
    layout, heads = layout_of(spec), transformer.config.num_attention_heads
    lo, hi, best = 0.0, float(layout.frames), (float("inf"), 0.0)
    for _ in range(20):
        mid = (lo + hi) / 2
        density = compile_layer([diagonal(mid)] * heads, layout, block, "cpu").density
        best = min(best, (abs(density - target), mid))
        lo, hi = (mid, hi) if density < target else (lo, mid)
    return Plan.uniform(transformer, diagonal(best[1]), block_size=block, layout=layout)


def distill(student, teacher, spec, plan: Plan, args, device) -> dict:
    """Train the student's LoRA with ``plan`` applied for ``args.minutes`` (or ``args.steps``)."""
    from sparse_vdit.organism import model as M

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(0)
    vocab, cuda = spec.vocabulary(), device.type == "cuda"
    apply(student, plan, backend=args.backend)
    losses, step, start = [], 0, time.time()
    student.train()
    try:
        while step < args.steps and time.time() - start < 60 * args.minutes:
            batch = D.make_batch(TRAIN_DATA_SEED, args.batch_size, step * args.batch_size, spec.frames, spec.height,
                                 spec.width, device, spec.detail)  # fmt: skip
            x0 = M.encode_video(batch.videos, spec.factor)
            text = vocab.embed(batch.captions).to(device)
            t = torch.sigmoid(torch.randn(x0.shape[0], device=device, generator=gen))
            noise = torch.randn(x0.shape, device=device, generator=gen)
            xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
            inputs = dict(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                with torch.no_grad():
                    target = teacher(**inputs)[0].float()
                pred = student(**inputs)[0].float()
            loss = torch.nn.functional.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss))
            step += 1
    finally:
        remove(student)
        student.eval()
    seconds = time.time() - start
    print(f"  trained {step} steps in {seconds:.0f} s: loss {losses[0]:.3e} -> {losses[-1]:.3e}", flush=True)
    return {"steps": step, "seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": losses[-1],
            "videos": step * args.batch_size}  # fmt: skip


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="organism weights folder (default: the fidelity organism)")
    p.add_argument("--densities", nargs="*", type=float, default=[0.10, 0.25])
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per density (wall clock)")
    p.add_argument("--steps", type=int, default=10**9, help="at most this many training steps per density")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--captions", type=int, default=8, help="held-out evaluation captions (data seed 777)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=out_dir())
    p.add_argument("--dry-run", action="store_true", help="tiny random organism on the CPU, 2 steps: checks the script")
    return p.parse_args(argv)


def load(args):
    from sparse_vdit.organism import model as M

    device = torch.device(args.device)
    if args.dry_run:
        spec = M.OrganismSpec(frames=4, height=32, width=32)
        config = M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
        return M.build_organism(config).to(device).eval(), spec, "tiny random organism (--dry-run)", device
    path = args.weights or M.FIDELITY_WEIGHTS_DIR
    return M.load_organism(path, device), M.load_spec(path), f"organism weights {path}", device


def main(argv=None) -> dict:
    args = parse(argv)
    if args.dry_run:
        args.densities, args.captions, args.seeds, args.sample_steps = args.densities[:1], 1, [0], 2
        args.steps, args.batch_size, args.block, args.device = 2, 2, 16, "cpu"
    from peft import LoraConfig

    teacher, spec, what, device = load(args)
    teacher.requires_grad_(False)
    videos = [(D.sample_scene(EVAL_DATA_SEED, i).caption, s) for i in range(args.captions) for s in args.seeds]
    common = dict(steps=args.sample_steps, spec=spec, backend=args.backend, block_size=args.block, progress=False)
    dense = run_method(teacher, Method("dense", "dense"), videos, **common)
    result = {"command": "python bench/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(device), "model": what, "videos": len(videos), "rows": []}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "finetune.json")
    for target in args.densities:
        plan = band_plan(teacher, spec, target, args.block)
        method = Method(f"band-{target:.2f}", "plan", plan)
        before = score(run_method(teacher, method, videos, **common), dense)
        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LORA_TARGETS))
        training = distill(student, teacher, spec, plan, args, device)
        after = score(run_method(student, method, videos, **common), dense)
        row = {"target": target, "density": plan.density(layout_of(spec), args.sample_steps), "plan": plan.made_by,
               "before": {k: before[k] for k in ("psnr", "ssim")}, "after": {k: after[k] for k in ("psnr", "ssim")},
               "training": training}  # fmt: skip
        result["rows"].append(row)
        print(f"density {row['density']:.3f}: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, "
              f"SSIM {before['ssim']:.4f} -> {after['ssim']:.4f}", flush=True)  # fmt: skip
        write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
