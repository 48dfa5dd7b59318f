"""`sparse-vdit generate`: a video from a diffusers pipeline with a sparse-attention plan applied.

Writes the video (mp4, imageio-ffmpeg) and a JSON sidecar beside it: total and per-step time,
attention time per step (the processor calls timed with CUDA events), its share, and the plan's
density at the video's layout. With ``--method svg`` the heads are decided online (Sparse
VideoGen) instead: the sidecar adds the profiling time per step (part of the attention time) and
the decisions' density; ``--record-plan`` saves those decisions as a plan.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..plan import Plan
from ..timing import device_name, synchronize
from .common import ORGANISM_BLOCK, ORGANISM_STEPS, PIPELINE_BLOCK, PIPELINE_STEPS, CommandError, add_backend
from .common import add_device, add_dtype, add_threads, block_size, dtype_of, fraction, positive_int, set_threads
from .common import write_video, writable_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a local diffusers pipeline folder, an organism weights folder ('organism': the shipped "
                             "one), or a hub id already downloaded (`hf download ID`)")  # fmt: skip
    parser.add_argument("--plan", help="plan JSON file, 'dense' (our dense path) or 'none' (unpatched); "
                                       "required unless --method svg")  # fmt: skip
    parser.add_argument("--lora", type=Path, help="a LoRA folder (sparse-vdit finetune's --out) loaded into the pipeline")
    parser.add_argument("--method", choices=("plan", "svg"), default="plan",
                        help="'plan', or 'svg': Sparse VideoGen, spatial/temporal heads decided every step")
    svg = parser.add_argument_group("--method svg")
    svg.add_argument("--svg-mode", choices=("reference", "ours"), default="reference",
                     help="'reference' (default): as the authors' code; 'ours': our variant (methods/svg.py)")
    svg.add_argument("--density", type=fraction, default=None,
                     help="computed share of blocks of a sparse layer (default: the reference's, 0.25; ours 0.3)")
    svg.add_argument("--warmup-steps", type=float, default=None,
                     help="dense steps first: a count (>= 1) or a fraction of the steps (< 1); default: the "
                          "reference's per model (Wan 0.3, HunyuanVideo 0.1), ours 0.25")
    svg.add_argument("--warmup-layers", type=int, default=None,
                     help="dense layers first (default: the reference's 3%% of the layers rounded down; ours 1)")
    svg.add_argument("--sampled-rows", type=positive_int, default=64, help="query rows profiled per layer and step")
    svg.add_argument("--record-plan", type=Path, help="save SVG's decisions as a plan JSON file")  # fmt: skip
    parser.add_argument("--prompt", help="text prompt")
    parser.add_argument("--negative-prompt", help="negative prompt (pipelines with guidance)")
    parser.add_argument("--prompt-embeds", type=Path,
                        help="torch.save'd dict of pipeline inputs (prompt_embeds, negative_prompt_embeds, ...) "
                             "instead of --prompt")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("video.mp4"), help="the video (mp4); its JSON sidecar beside")
    parser.add_argument("--height", type=positive_int, help="pixels (default: the pipeline's)")
    parser.add_argument("--width", type=positive_int, help="pixels (default: the pipeline's)")
    parser.add_argument("--frames", type=positive_int, help="video frames (default: the pipeline's)")
    parser.add_argument("--steps", type=positive_int,
                        help=f"denoising steps (default {PIPELINE_STEPS}; {ORGANISM_STEPS} on the organism)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    parser.add_argument("--fps", type=positive_int, default=16, help="frames per second of the mp4")
    add_backend(parser)
    parser.add_argument("--block-size", type=block_size,
                        help=f"block size of the tables (default: the plan's, else {PIPELINE_BLOCK}; "
                             f"{ORGANISM_BLOCK} on the organism)")  # fmt: skip
    add_dtype(parser)
    add_device(parser)
    add_threads(parser)


def load_pipeline(model: str, dtype: torch.dtype, device: str, text_encoders: bool = True):
    """The integration's local-only pipeline loader, its failures as one-line command errors."""
    from ..integrations.diffusers.pipeline import PipelineLoadError
    from ..integrations.diffusers.pipeline import load_pipeline as load

    try:
        return load(model, dtype, device, text_encoders)
    except PipelineLoadError as err:
        raise CommandError(str(err)) from None


def generate_video(
    pipe,
    plan: Plan | None,
    out: Path,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    inputs: dict[str, Any] | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
    fps: int = 16,
    backend: str = "auto",
    svg: dict[str, Any] | None = None,
    record_plan: Path | None = None,
    block_size: int | None = None,
) -> dict:
    """Run ``pipe`` with ``plan`` applied (None: unpatched), write ``out`` and its JSON sidecar.

    With ``svg`` (options of :class:`~sparse_vdit.methods.svg.SVG`) the plan is ignored and
    SVG decides online; ``record_plan`` then saves its decisions. Returns the sidecar's content.
    """
    from ..integrations.diffusers import apply, remove

    device = pipe.transformer.device
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, output_type="np")
    kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    for key, value in (("prompt", prompt), ("negative_prompt", negative_prompt), ("height", height),
                       ("width", width), ("num_frames", frames), ("guidance_scale", guidance_scale)):  # fmt: skip
        if value is not None:
            kwargs[key] = value
    for key, value in (inputs or {}).items():
        kwargs[key] = value.to(device) if isinstance(value, torch.Tensor) else value

    forward_times: list[float] = []
    step_ends: list[float] = []

    def on_forward(module, args, kwargs_):
        synchronize(device)
        forward_times.append(time.perf_counter())

    def on_step_end(pipeline, i, t, callback_kwargs):
        synchronize(device)
        step_ends.append(time.perf_counter())
        return {}

    kwargs["callback_on_step_end"] = on_step_end
    if svg is not None:
        state = apply(pipe, method="svg", backend=backend, block_size=block_size, **{"record": True, **svg})
    else:
        state = apply(pipe, plan, backend=backend, block_size=block_size) if plan is not None else None
    hook = pipe.transformer.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        if state is not None:
            state.timing = True
            if state.svg is not None:
                state.svg.timing = True
        synchronize(device)
        start = time.perf_counter()
        result = pipe(**kwargs)
        synchronize(device)
        total = time.perf_counter() - start
        attention = state.attention_seconds() if state is not None else {}
        layout = state.last_layout if state is not None else None
        svg_info = _svg_summary(state.svg, record_plan) if svg is not None else None
        if svg_info is not None:
            plan = svg_info.pop("plan")
    finally:
        hook.remove()
        if state is not None:
            remove(pipe)

    video = result.frames[0]
    write_video(video, out, fps)
    starts = [forward_times[0] if forward_times else start] + step_ends[:-1]
    per_step = [end - begin for begin, end in zip(starts, step_ends)]
    attention_steps = [attention.get(i, 0.0) for i in range(len(per_step))] if state is not None else None
    denoise = sum(per_step)
    sidecar = {
        "video": str(out),
        "model": getattr(pipe, "name_or_path", None) or type(pipe).__name__,
        "plan": None if plan is None else {"method": plan.made_by.get("method"), "warmup_steps": plan.warmup_steps,
                                           "warmup_layers": plan.warmup_layers, "block_size": plan.block_size},  # fmt: skip
        "plan_density": None if plan is None or layout is None else plan.density(layout, steps=len(per_step) or None),
        "layout": None if layout is None else layout.describe(),
        "prompt": prompt,
        "seed": seed,
        "steps": len(per_step),
        "frames": int(video.shape[0]),
        "height": int(video.shape[1]),
        "width": int(video.shape[2]),
        "backend": backend,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "device": device_name(device),
        "torch": torch.__version__,
        "total_seconds": total,
        "denoise_seconds": denoise,
        "step_seconds": per_step,
        "attention_seconds": attention_steps,
        "attention_share": None if attention_steps is None or not denoise else sum(attention_steps) / denoise,
    }
    if svg_info is not None:
        by_step = svg_info.pop("profile_seconds")
        profile = [by_step.get(i, 0.0) for i in range(len(per_step))]
        sidecar["svg"] = {**svg_info, "profile_seconds": profile,
                          "profile_share_of_attention": sum(profile) / sum(attention_steps) if attention_steps and
                          sum(attention_steps) else None}  # fmt: skip
    sidecar_path = out.with_suffix(".json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _svg_summary(svg, record_plan: Path | None) -> dict:
    """What the sidecar says about an SVG run; the decisions as a plan (None before any sparse step)."""
    layout = next((g["layout"] for g in reversed(svg.generations) if g["layout"] is not None), None)
    info: dict[str, Any] = {"mode": svg.mode, "density": svg.density if layout is None else svg.density_for(layout),
                            "warmup_steps": svg.warmup_steps_now(layout), "warmup_layers": svg.warmup_layers_now(layout),
                            "sampled_rows": svg.sampled_rows,
                            "profile_seconds": svg.profile_seconds(), "plan": None}  # fmt: skip
    if any(g["steps"] for g in svg.generations):
        plan = info["plan"] = svg.to_plan()
        info["widths"] = plan.made_by["widths"]
        names = [p.name for r in plan.schedule for layer in r.layers for p in layer if p.name != "dense"]
        info["temporal_share"] = names.count("temporal") / len(names) if names else None
        if record_plan is not None:
            info["recorded_plan"] = str(plan.save(record_plan))
    return info


def svg_options(args: argparse.Namespace) -> dict[str, Any]:
    """SVG's options from the command line, checked before the (slow) pipeline load."""
    from ..methods.svg import SVG

    warmup = args.warmup_steps
    options = {"density": args.density, "warmup_layers": args.warmup_layers, "sampled_rows": args.sampled_rows,
               "mode": args.svg_mode}
    if warmup is not None:
        options["warmup_steps"] = int(warmup) if warmup >= 1 and warmup == int(warmup) else warmup
    try:
        SVG(**options)
    except ValueError as err:
        raise CommandError(str(err)) from None
    return options


def _check_arguments(args: argparse.Namespace) -> dict[str, Any] | None:
    """Everything that can be checked before the (slow) model load; SVG's options."""
    if args.prompt is None and args.prompt_embeds is None:
        raise CommandError("give --prompt or --prompt-embeds")
    svg = None
    if args.method == "svg":
        if args.plan is not None:
            raise CommandError("--method svg decides the heads itself; give no --plan")
        svg = svg_options(args)
    elif args.plan is None:
        raise CommandError("give --plan (a plan file, 'dense' or 'none') or --method svg")
    elif args.record_plan is not None:
        raise CommandError("--record-plan needs --method svg")
    if args.lora is not None and not (args.lora / "pytorch_lora_weights.safetensors").is_file():
        raise CommandError(f"--lora: no pytorch_lora_weights.safetensors in {args.lora}")
    writable_file(args.out)
    if args.record_plan is not None:
        writable_file(args.record_plan)
    return svg


def run(args: argparse.Namespace) -> int:
    svg = _check_arguments(args)
    set_threads(args.threads)
    # a broken plan file or prompt-embeddings file fails before the (slow) model load
    plan = Plan.load(args.plan) if args.plan not in ("dense", "none", None) else None
    device = args.device
    dtype = dtype_of(args.dtype, device)
    inputs = None
    if args.prompt_embeds is not None:
        inputs = torch.load(args.prompt_embeds, map_location="cpu", weights_only=True)
        inputs = inputs if isinstance(inputs, dict) else {"prompt_embeds": inputs}
        inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    from .generate_organism import generate_organism, organism_folder

    folder = organism_folder(args.model)
    if folder is not None:
        if inputs is not None:
            raise CommandError("the organism reads --prompt (its own vocabulary), not --prompt-embeds")
        if args.lora is not None:
            raise CommandError("--lora is for diffusers pipelines, not the organism")
        info = generate_organism(args, folder, plan, svg, dtype)
    else:
        pipe = load_pipeline(args.model, dtype, device, text_encoders=args.prompt_embeds is None)
        if args.lora is not None:
            pipe.load_lora_weights(args.lora)
        if args.plan == "dense":
            plan = Plan.dense(pipe.transformer)
        elif plan is not None:
            plan.check(pipe.transformer)
        info = generate_video(
            pipe, plan, args.out, prompt=args.prompt, negative_prompt=args.negative_prompt, inputs=inputs,
            height=args.height, width=args.width, frames=args.frames, steps=args.steps or PIPELINE_STEPS,
            seed=args.seed, guidance_scale=args.guidance_scale, fps=args.fps, backend=args.backend, svg=svg,
            record_plan=args.record_plan, block_size=args.block_size,
        )  # fmt: skip
    share = info["attention_share"]
    density = info["plan_density"]
    print(
        f"wrote {args.out} ({info['frames']} frames {info['width']}x{info['height']}) and "
        f"{args.out.with_suffix('.json')}: {info['total_seconds']:.2f} s total, {info['denoise_seconds']:.2f} s "
        f"denoising ({info['steps']} steps)"
        + ("" if share is None else f", attention {share:.0%}")
        + ("" if density is None else f", plan density {density:.1%}")
        + ("" if "svg" not in info else _svg_line(info["svg"]))
    )
    return 0


def _svg_line(info: dict) -> str:
    share = info.get("profile_share_of_attention")
    text = f"; svg profiling {sum(info['profile_seconds']):.2f} s"
    text += "" if share is None else f" ({share:.1%} of attention)"
    return text + ("" if "recorded_plan" not in info else f", decisions saved to {info['recorded_plan']}")
