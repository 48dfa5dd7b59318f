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
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..plan import Plan, PlanError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local pipeline folder or hub id already in the HF cache")
    parser.add_argument("--plan", help="plan JSON file, 'dense' (our dense path) or 'none' (unpatched); "
                                       "required unless --method svg")  # fmt: skip
    parser.add_argument("--method", choices=("plan", "svg"), default="plan",
                        help="'plan' (default) or 'svg': Sparse VideoGen, spatial/temporal heads decided every step")
    svg = parser.add_argument_group("--method svg")
    svg.add_argument("--svg-mode", choices=("reference", "ours"), default="reference",
                     help="'reference' (default): as the authors' code; 'ours': our variant (methods/svg.py)")
    svg.add_argument("--density", type=float, default=None,
                     help="computed share of blocks of a sparse layer (default: the reference's, 0.25; ours 0.3)")
    svg.add_argument("--warmup-steps", type=float, default=None,
                     help="dense steps first: a count (>= 1) or a fraction of the steps (< 1); default: the "
                          "reference's per model (Wan 0.3, HunyuanVideo 0.1), ours 0.25")
    svg.add_argument("--warmup-layers", type=int, default=None,
                     help="dense layers first (default: the reference's 3%% of the layers rounded down; ours 1)")
    svg.add_argument("--sampled-rows", type=int, default=64, help="query rows profiled per layer and step")
    svg.add_argument("--record-plan", type=Path, help="save SVG's decisions as a plan JSON file")  # fmt: skip
    parser.add_argument("--prompt", help="text prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--prompt-embeds", type=Path,
                        help="torch.save'd dict of pipeline inputs (prompt_embeds, negative_prompt_embeds, ...) "
                             "instead of --prompt")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("video.mp4"))
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--backend", default="auto", help="sparse kernel: auto, fa4, triton, flex, reference")
    parser.add_argument("--block-size", type=int, help="block size of the tables (default: the plan's, else 128)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str, dtype: torch.dtype, device: str, text_encoders: bool = True):
    """``DiffusionPipeline.from_pretrained`` from a local folder or the hub cache, never the network.

    Without ``text_encoders`` the tokenizers and text encoders are not loaded (prompt embeddings
    are given instead).
    """
    import diffusers
    from diffusers import DiffusionPipeline

    # diffusers 0.42 renamed `torch_dtype` to `dtype`
    new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42)
    kwargs: dict[str, Any] = {"dtype" if new else "torch_dtype": dtype, "local_files_only": True}
    try:
        if not text_encoders:
            config = DiffusionPipeline.load_config(model, local_files_only=True)
            kwargs.update({k: None for k in config if k.startswith(("text_encoder", "tokenizer"))})
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        if Path(model).exists():
            raise SystemExit(f"sparse-vdit generate: cannot load a diffusers pipeline from {model}: {err}") from None
        from huggingface_hub.constants import HF_HUB_CACHE

        raise SystemExit(
            f"sparse-vdit generate: {model!r} is neither a local folder nor in the Hugging Face cache "
            f"({HF_HUB_CACHE}); download it first (e.g. `huggingface-cli download {model}`) or pass a folder"
        ) from None
    return pipe.to(device)


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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
        sync()
        forward_times.append(time.perf_counter())

    def on_step_end(pipeline, i, t, callback_kwargs):
        sync()
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
        sync()
        start = time.perf_counter()
        result = pipe(**kwargs)
        sync()
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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
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


def write_video(frames, path: Path, fps: int) -> Path:
    """Write ``(frames, height, width, 3)`` floats in [0, 1] (or uint8) as an H.264 mp4."""
    import imageio
    import numpy as np

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1)
    return path


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
        raise SystemExit(f"sparse-vdit generate: {err}") from None
    return options


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_embeds is None:
        raise SystemExit("sparse-vdit generate: give --prompt or --prompt-embeds")
    svg = None
    if args.method == "svg":
        if args.plan is not None:
            raise SystemExit("sparse-vdit generate: --method svg decides the heads itself; give no --plan")
        svg = svg_options(args)
    elif args.plan is None:
        raise SystemExit("sparse-vdit generate: give --plan (a plan file, 'dense' or 'none') or --method svg")
    elif args.record_plan is not None:
        raise SystemExit("sparse-vdit generate: --record-plan needs --method svg")
    try:  # a broken plan file fails before the (slow) pipeline load
        plan = Plan.load(args.plan) if args.plan not in ("dense", "none", None) else None
    except PlanError as err:
        raise SystemExit(f"sparse-vdit generate: {err}") from None
    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(args.model, dtype, device, text_encoders=args.prompt_embeds is None)
    if args.plan == "dense":
        plan = Plan.dense(pipe.transformer)
    elif plan is not None:
        try:
            plan.check(pipe.transformer)
        except PlanError as err:
            raise SystemExit(f"sparse-vdit generate: {err}") from None
    inputs = None
    if args.prompt_embeds is not None:
        inputs = torch.load(args.prompt_embeds, map_location="cpu", weights_only=True)
        inputs = inputs if isinstance(inputs, dict) else {"prompt_embeds": inputs}
        inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    info = generate_video(
        pipe, plan, args.out, prompt=args.prompt, negative_prompt=args.negative_prompt, inputs=inputs,
        height=args.height, width=args.width, frames=args.frames, steps=args.steps, seed=args.seed,
        guidance_scale=args.guidance_scale, fps=args.fps, backend=args.backend, svg=svg, record_plan=args.record_plan,
        block_size=args.block_size,
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
