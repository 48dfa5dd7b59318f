"""`sparse-vdit generate --model organism` (or an organism weights folder): the small Wan model's video.

An organism folder holds ``config.json``, the safetensors weights and ``organism.json`` (no
``model_index.json``: it is a bare transformer, sampled by the organism's own loop). The video is
written as mp4 with a JSON sidecar like a pipeline's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..plan import Plan
from ..timing import device_name
from .common import ORGANISM_BLOCK, ORGANISM_STEPS, CommandError, write_video


def organism_folder(model: str) -> Path | None:
    """The organism weights folder ``model`` names ('organism': the shipped one), or None."""
    from ..organism import model as M

    if model == "organism":
        return M.WEIGHTS_DIR
    path = Path(model)
    if path.is_dir() and (path / M.SPEC_FILE).exists() and not (path / "model_index.json").exists():
        return path
    return None


def generate_organism(args: argparse.Namespace, folder: Path, plan: Plan | None, svg: dict | None,
                      dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """Generate ``args.prompt`` on the organism in ``folder`` with ``plan`` (or SVG), write video and sidecar."""
    from ..compare import Method, layout_of, run_method
    from ..organism import model as M

    if args.record_plan is not None:
        raise CommandError("--record-plan is for diffusers pipelines; on the organism use `sparse-vdit search`")
    spec = M.load_spec(folder)
    for name, given, own in (("height", args.height, spec.height), ("width", args.width, spec.width),
                             ("frames", args.frames, spec.frames)):  # fmt: skip
        if given is not None and given != own:
            raise CommandError(f"the organism makes {own} {name} (--{name} {given} given)")
    transformer = M.load_organism(folder, args.device, dtype)
    steps = args.steps or ORGANISM_STEPS
    block = args.block_size or (plan.block_size if plan is not None else ORGANISM_BLOCK)
    if svg is not None:
        method = Method("svg", "svg", svg=svg)
    elif plan is None:  # 'dense' and 'none' alike: the organism has no unpatched pipeline path
        method = Method("dense", "dense")
    else:
        plan.check(transformer)
        method = Method("plan", "plan", plan)
    run = run_method(transformer, method, [(args.prompt, args.seed)], steps=steps, spec=spec, backend=args.backend,
                     block_size=block)  # fmt: skip
    video = ((run.videos[0].permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).numpy()
    write_video(video, args.out, args.fps)
    layout = layout_of(spec)
    info = {
        "video": str(args.out),
        "model": f"organism ({folder})",
        "plan": None if plan is None else {"method": plan.made_by.get("method"), "warmup_steps": plan.warmup_steps,
                                           "warmup_layers": plan.warmup_layers, "block_size": plan.block_size},  # fmt: skip
        "plan_density": run.density if method.kind != "dense" else None,
        "layout": layout.describe(),
        "prompt": args.prompt,
        "seed": args.seed,
        "steps": steps,
        "frames": int(video.shape[0]),
        "height": int(video.shape[1]),
        "width": int(video.shape[2]),
        "backend": args.backend,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "total_seconds": run.seconds,
        "denoise_seconds": run.seconds,
        "attention_seconds_total": run.attention_seconds,
        "attention_share": run.attention_seconds / run.seconds if run.seconds else None,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
    return info
