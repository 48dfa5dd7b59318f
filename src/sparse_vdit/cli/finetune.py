"""`sparse-vdit finetune`: a LoRA trained with a sparse plan applied, by distillation from the dense model.

On a local diffusers pipeline folder (``WanPipeline``: Wan2.1 T2V, Wan2.2 TI2V-5B; or
``HunyuanVideoPipeline``; flow-matching schedulers only) and a plan (``--plan FILE``, or
``--density D``: every head a ``diagonal`` band of that block density at the training layout),
trains a PEFT LoRA on the transformer so that, with the plan applied, it reproduces the
transformer without the plan and without the adapter (the same frozen weights: no second copy).
Each step takes a batch, one of the pipeline's denoising steps (the plan's step index), its
timestep and sigma from the pipeline's scheduler, noises ``x_t = (1 - sigma) x_0 + sigma noise``
and fits the student's output to the teacher's (``integrations/diffusers/training.py``).

Data: ``--data FOLDER`` of captioned videos or latents (``cli/finetune_data.py``), encoded once
with the pipeline's own VAE and text encoder and cached in ``--out`` (a rerun on the same data
reads the cache); or, without ``--data``, ``--prompts`` with random Gaussian latents of the
pipeline's default shape: distillation on noise, which matches the model at its layout but not on
real videos. Writes to ``--out``: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(out)``),
``plan.json`` (generate with it), ``train_info.json`` (command, loss per step, plan density),
``checkpoint.pt`` (``--resume`` continues from it) and ``encoded.pt`` (the cache).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..files import written_whole
from ..plan import Plan
from ..timing import device_name
from .common import PIPELINE_BLOCK, PIPELINE_STEPS, CommandError, add_backend, add_device, add_threads
from .common import add_dtype, block_size, dtype_of, fraction, positive_int, set_threads, writable_folder
from .finetune_data import fingerprint, load_cache, read_latents, read_samples, read_video, save_cache

DEFAULT_STEPS = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a local diffusers pipeline folder (or a hub id already downloaded)")
    parser.add_argument("--plan", type=Path, help="the plan file to train with (from sparse-vdit search)")
    parser.add_argument("--density", type=fraction,
                        help="instead of --plan: every head a diagonal band of this block density")  # fmt: skip
    parser.add_argument("--warmup-steps", type=int, default=0, help="--density: dense denoising steps first")
    d = parser.add_argument_group("data")
    d.add_argument("--data", type=Path, help="folder of captioned videos or latents (none: --prompts on noise)")
    d.add_argument("--captions", type=Path, help="captions file (JSON object or JSON lines); default: NAME.txt "
                                                 "beside each file, or captions.json / metadata.jsonl in --data")  # fmt: skip
    d.add_argument("--prompts", type=Path, help="without --data: a prompts file, one per line, trained on random latents")
    d.add_argument("--prompt", action="append", default=[], help="without --data: a prompt (repeatable)")
    d.add_argument("--height", type=positive_int, help="pixels (default: the pipeline's)")
    d.add_argument("--width", type=positive_int, help="pixels (default: the pipeline's)")
    d.add_argument("--frames", type=positive_int, help="video frames (default: the pipeline's)")
    t = parser.add_argument_group("training")
    t.add_argument("--out", type=Path, default=Path("finetune-out"), help="output folder")
    t.add_argument("--steps", type=positive_int, help=f"training steps (default {DEFAULT_STEPS}, no limit with --minutes)")
    t.add_argument("--minutes", type=float, help="wall-clock budget of the training loop")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    t.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (alpha = rank)")
    t.add_argument("--batch-size", type=positive_int, default=1)
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute the blocks in the backward (less memory)")  # fmt: skip
    t.add_argument("--seed", type=int, default=0, help="seed of batches, steps and noise")
    t.add_argument("--denoise-steps", type=positive_int, default=PIPELINE_STEPS,
                   help="denoising steps the plan's step indices refer to; training timesteps come from "
                        "this schedule (generate with the same --steps)")  # fmt: skip
    t.add_argument("--save-every", type=positive_int, default=100, help="checkpoint every this many steps")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend(parser)
    parser.add_argument("--block-size", type=block_size,
                        help=f"block size of the tables (default: the plan's; {PIPELINE_BLOCK} with --density)")  # fmt: skip
    add_dtype(parser, "of the base weights; ")
    add_device(parser)
    add_threads(parser)


def _check_arguments(args: argparse.Namespace):
    """What can be checked before the (slow) pipeline load: plan, data, output folder."""
    if args.model == "organism":
        raise CommandError("finetune trains diffusers pipelines; for the organism see bench/finetune.py")
    if (args.plan is None) == (args.density is None):
        raise CommandError("give --plan FILE or --density D (one of them)")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise CommandError(f"--minutes must be a number > 0, got {args.minutes}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CommandError(f"--lr must be a number > 0, got {args.lr}")
    if args.warmup_steps < 0:
        raise CommandError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.warmup_steps and args.plan is not None:
        raise CommandError("--warmup-steps is for --density (a plan file has its own)")
    plan = Plan.load(args.plan) if args.plan is not None else None
    if args.data is not None:
        if args.prompts is not None or args.prompt:
            raise CommandError("--prompts / --prompt are for training on noise; with --data the captions are the prompts")
        samples, prompts = read_samples(args.data, args.captions), None
    else:
        if args.captions is not None:
            raise CommandError("--captions needs --data")
        if args.prompts is None and not args.prompt:
            raise CommandError("give --data FOLDER, or --prompts FILE / --prompt TEXT to train on random latents")
        from .search import read_prompts

        samples, prompts = None, read_prompts(argparse.Namespace(prompt=args.prompt, prompts=args.prompts, scenes=None,
                                                                 model=args.model))  # fmt: skip
    index = Path(args.model) / "model_index.json"
    if index.is_file():  # an unsupported pipeline is refused before it loads
        from ..integrations.diffusers.training import recipe_named

        try:
            name = json.loads(index.read_text()).get("_class_name", "?")
        except (json.JSONDecodeError, AttributeError):
            raise CommandError(f"{index} is not a diffusers pipeline index") from None
        try:
            recipe_named(name)
        except ValueError as err:
            raise CommandError(str(err)) from None
    writable_folder(args.out)
    if args.resume and not (args.out / "checkpoint.pt").is_file():
        raise CommandError(f"--resume: no checkpoint.pt in {args.out}")
    return plan, samples, prompts


def run(args: argparse.Namespace) -> int:
    plan, samples, prompts = _check_arguments(args)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    device = args.device
    dtype = dtype_of(args.dtype, device)
    cache_path = args.out / "encoded.pt"
    key = _cache_key(args, samples, prompts, dtype)
    cached = load_cache(cache_path, key)
    pipe = _load(args.model, dtype, device, text_encoders=cached is None)
    from ..integrations.diffusers.training import recipe_for

    try:
        recipe = recipe_for(pipe)
    except ValueError as err:
        raise CommandError(str(err)) from None
    height, width, frames = (v or d for v, d in zip((args.height, args.width, args.frames), recipe.default_size(pipe)))
    if plan is not None:
        plan.check(pipe.transformer)
    if cached is None:
        latents, text = _encode(pipe, recipe, samples, prompts, (height, width, frames), args.no_progress)
        save_cache(cache_path, key, latents, text)
        encoded = len(text)
    else:
        latents, text, encoded = cached["latents"], cached["text"], 0
    for name in ("text_encoder", "text_encoder_2", "vae"):  # not needed any more
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and device != "cpu":
            module.to("cpu")
    shape = recipe.latent_shape(pipe, height, width, frames) if latents is None else tuple(latents[0].shape)
    if latents is not None:
        _check_latents(latents, pipe, args.batch_size)
    plan, density = _plan(args, pipe, shape, plan)
    info = train(args, pipe, recipe, plan, latents, text, shape, density)
    info["encoded_now"] = encoded
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    losses = info["losses"]
    what = "on noise (random latents; no --data)" if info["noise_only"] else f"on {info['samples']} sample(s)"
    print(f"trained {info['steps']} steps {what} in {info['seconds']:.1f} s"
          + (f": loss {losses[0]:.3e} -> {losses[-1]:.3e} (mean of the last 10%: {info['last_loss_mean']:.3e})" if losses else "")
          + f"; plan density {density:.1%}; wrote {args.out / 'pytorch_lora_weights.safetensors'}, {args.out / 'plan.json'}, "
          f"{args.out / 'train_info.json'}")  # fmt: skip
    return 0


def _load(model: str, dtype, device: str, text_encoders: bool):
    from ..integrations.diffusers.pipeline import PipelineLoadError, load_pipeline

    try:
        pipe = load_pipeline(model, dtype, device, text_encoders)
    except PipelineLoadError as err:
        raise CommandError(str(err)) from None
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _cache_key(args, samples, prompts, dtype) -> dict:
    """What the encodings depend on (a size left unset is the pipeline's default, fixed by the model)."""
    size = (args.height, args.width, args.frames)
    return {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
            "dtype": str(dtype), "data": fingerprint(samples) if samples is not None else None,
            "prompts": prompts, "size": None if samples is None or samples[0].is_latent else list(size)}  # fmt: skip


def _encode(pipe, recipe, samples, prompts, size, no_progress: bool):
    """(latents or None, text inputs) of every sample, on the CPU in the pipeline's dtype."""
    from tqdm.auto import tqdm

    dtype = pipe.transformer.dtype
    captions = [s.caption for s in samples] if samples is not None else prompts
    with torch.no_grad():
        text = []
        for i in range(0, len(captions), 8):
            text += recipe.encode_text(pipe, captions[i : i + 8])
        text = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()} for t in text]
        if samples is None:
            return None, text
        latents = []
        for s in tqdm(samples, desc="encoding", disable=no_progress or len(samples) < 2):
            if s.is_latent:
                latents.append(read_latents(s.path).to(dtype))
            else:
                latents.append(recipe.encode_video(pipe, read_video(s.path, *size)).to(dtype))
    return latents, text


def _check_latents(latents: list[torch.Tensor], pipe, batch: int) -> None:
    channels = pipe.transformer.config.in_channels
    for i, z in enumerate(latents):
        if z.shape[0] != channels:
            raise CommandError(f"latents {i} have {z.shape[0]} channels; the transformer takes {channels}")
    if batch > 1 and len({tuple(z.shape) for z in latents}) > 1:
        raise CommandError("--batch-size > 1 needs latents of one shape; give --height/--width/--frames or --batch-size 1")


def _plan(args, pipe, shape, plan: Plan | None) -> tuple[Plan, float]:
    """The plan (``--plan``, or the ``--density`` band) and its density at the training layout."""
    from ..integrations.diffusers.training import latent_layout_grid
    from ..layout import VideoLayout

    layout = VideoLayout(*latent_layout_grid(pipe, torch.empty(shape, device="meta")))
    if plan is None:
        from ..methods.svg import band_widths
        from ..patterns import diagonal

        block = args.block_size or PIPELINE_BLOCK
        width = band_widths(layout, args.density, block).spatial  # spatial(w) is diagonal(w)
        plan = Plan.uniform(pipe.transformer, diagonal(width), warmup_steps=args.warmup_steps, block_size=block,
                            layout=layout)  # fmt: skip
    block = args.block_size or plan.block_size
    density = replace(plan, block_size=block).density(layout, steps=args.denoise_steps)
    return plan, density


def train(args, pipe, recipe, plan: Plan, latents, text, shape, density: float) -> dict:
    """The distillation loop; saves the adapter, plan and checkpoint; returns train_info."""
    from tqdm.auto import tqdm

    from ..integrations.diffusers.training import Distiller, add_lora, save_lora

    transformer = pipe.transformer
    params = add_lora(transformer, args.rank)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    start_step, seconds_before = 0, 0.0
    if args.resume:
        start_step, seconds_before = _resume(args.out / "checkpoint.pt", transformer, optimizer, generator, losses)
    steps = args.steps or (sys.maxsize if args.minutes else DEFAULT_STEPS)
    distiller = Distiller(pipe, recipe, plan, args.denoise_steps, backend=args.backend, block_size=args.block_size)
    count = len(text)
    bar = tqdm(total=None if steps == sys.maxsize else steps, initial=start_step, desc="finetune", disable=args.no_progress)
    start, step = time.perf_counter(), start_step
    try:
        while step < steps and (args.minutes is None or time.perf_counter() - start < 60 * args.minutes):
            index = torch.randint(count, (args.batch_size,), generator=generator).tolist()
            denoise_step = int(torch.randint(args.denoise_steps, (1,), generator=generator))
            if latents is None:  # distillation on noise
                x0 = torch.randn((args.batch_size, *shape), generator=generator)
            else:
                x0 = torch.stack([latents[i].float() for i in index])
            noise = torch.randn(x0.shape, generator=generator)
            batch_text = {k: torch.stack([text[i][k] for i in index]) for k in text[0]}
            loss = distiller.loss(x0, batch_text, denoise_step, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3e}")
            if step % args.save_every == 0:
                _checkpoint(args.out / "checkpoint.pt", transformer, optimizer, generator, step, losses,
                            seconds_before + time.perf_counter() - start)  # fmt: skip
    finally:
        bar.close()
        distiller.close()
    seconds = seconds_before + time.perf_counter() - start
    _checkpoint(args.out / "checkpoint.pt", transformer, optimizer, generator, step, losses, seconds)
    save_lora(pipe, args.out)
    plan.save(args.out / "plan.json")
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "command": command_line(args),
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "family": recipe.family,
        "plan": str(args.plan) if args.plan is not None else f"--density {args.density}",
        "plan_density": density,
        "block_size": args.block_size or plan.block_size,
        "denoise_steps": args.denoise_steps,
        "data": str(args.data) if args.data is not None else None,
        "samples": count,
        "noise_only": latents is None,
        "latent_shape": list(shape),
        "steps": step,
        "seconds": seconds,
        "lr": args.lr, "rank": args.rank, "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing, "seed": args.seed, "backend": args.backend,
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "losses": losses,
        "last_loss_mean": sum(tail) / len(tail) if losses else None,
    }  # fmt: skip


def command_line(args: argparse.Namespace) -> str:
    """The command with every option that has a value spelled out (what reproduces the run)."""
    words = ["sparse-vdit", "finetune"]
    if not args.gradient_checkpointing:
        words.append("--no-gradient-checkpointing")
    for name, value in vars(args).items():
        if name in ("command", "debug") or value is None or value is False or value == []:
            continue
        option = "--" + name.replace("_", "-")
        if value is True:
            words.append(option)
        elif isinstance(value, list):
            words += [w for v in value for w in (option, str(v))]
        else:
            words += [option, str(value)]
    return shlex.join(words)


def _checkpoint(path: Path, transformer, optimizer, generator, step: int, losses: list[float], seconds: float) -> None:
    from peft.utils import get_peft_model_state_dict

    with written_whole(path) as tmp:
        torch.save({"lora": get_peft_model_state_dict(transformer), "optimizer": optimizer.state_dict(), "step": step,
                    "losses": losses, "generator": generator.get_state(), "seconds": seconds,
                    "rank": transformer.peft_config["default"].r}, tmp)  # fmt: skip


def _resume(path: Path, transformer, optimizer, generator, losses: list[float]) -> tuple[int, float]:
    from peft.utils import set_peft_model_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    rank = transformer.peft_config["default"].r
    if state.get("rank") != rank:
        raise CommandError(f"--resume: the checkpoint has rank {state.get('rank')}, --rank is {rank}")
    set_peft_model_state_dict(transformer, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    losses.extend(state["losses"])
    return int(state["step"]), float(state["seconds"])
