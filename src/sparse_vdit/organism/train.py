"""Train the organism with rectified-flow matching on procedural videos rendered on the fly.

``python -m sparse_vdit.organism.train --out DIR`` (the small organism, about 12 minutes on one
H100) or ``--preset fidelity`` (the larger, textured one fidelity is judged on). DataLoader
workers sample scenes and caption embeddings on the CPU; the videos are rendered on the training
device, so the generator keeps up with the GPU. Writes to ``DIR``: the weights (``config.json``,
fp16 EMA ``diffusion_pytorch_model.safetensors``, ``organism.json``), ``train_info.json`` (every
run so far), ``loss.png``, ``samples.png``, ``samples.gif`` and ``checkpoint.pt`` (fp32 weights,
EMA, optimizer state, step, loss history, data position: what ``--resume DIR`` continues from).

Long training is a chain of short runs: ``--resume DIR`` continues exactly (same schedule, the
next batches of the data stream); ``--init DIR`` starts from the saved fp16 EMA weights with a fresh
optimizer (for when only the shipped weights travel, not the checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..integrations.diffusers.models import DIFFUSERS_VERSION
from ..files import written_whole
from ..timing import device_name
from .data import SceneStream, make_batch, render, sample_scene
from .model import (
    FIDELITY_MODEL,
    FIDELITY_SPEC,
    OrganismSpec,
    build_organism,
    encode_video,
    load_organism,
    load_spec,
    organism_config,
    sample,
    save_organism,
)
from .previews import save_loss_plot, save_sample_gif, save_sample_strip

PROG = "python -m sparse_vdit.organism.train"
PREVIEW_SEED = 12345  # scenes whose captions the sample strip shows (not a training seed)
CHECKPOINT = "checkpoint.pt"
PRESETS = {
    "small": (OrganismSpec(), {}),
    "fidelity": (FIDELITY_SPEC, FIDELITY_MODEL),
}


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train the organism (small Wan video DiT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="runs/organism", help="output folder")
    p.add_argument("--steps", type=int, default=8000, help="optimizer steps (upper bound, counted over resumed runs)")
    p.add_argument("--minutes", type=float, default=12.0, help="stop this run after this many minutes (0: none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument(
        "--schedule",
        choices=("run", "constant"),
        default="run",
        help="learning rate after warm-up: 'run' decays (cosine to 10%%) over this run's steps or minutes; "
        "'constant' stays at --lr (for chains of resumed runs; the EMA averages)",
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--qk-gain-lr", type=float, default=1.0,
        help="learning-rate multiplier of the self-attention q/k RMSNorm gains (the attention's temperature): "
        "Adam moves a parameter by about lr per step, so at 1 a short run cannot sharpen attention much",
    )  # fmt: skip
    p.add_argument(
        "--qk-gain-scale", type=float, default=1.0,
        help="multiply the self-attention q/k RMSNorm gains by this before a fresh or --init run: attention "
        "logits are bounded by gain^2 x sqrt(head_dim), too little for sharp attention over many keys "
        "(QKNorm, Henry et al. 2020, starts its learnable scale from the sequence length for this reason)",
    )  # fmt: skip
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="model init and noise seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the procedural scenes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=None, help="data workers (default 6 on cuda, 0 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--init", default=None, metavar="DIR",
        help="start from the fp16 EMA weights saved in DIR (its config and size; fresh optimizer state)",
    )  # fmt: skip
    start.add_argument(
        "--resume", default=None, metavar="DIR",
        help=f"continue exactly from DIR/{CHECKPOINT} (weights, EMA, optimizer, step, data position)",
    )  # fmt: skip
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps for the preview strip")
    p.add_argument("--samples", type=int, default=4, help="captions in the preview strip")
    p.add_argument("--no-checkpoint", action="store_true", help=f"do not write {CHECKPOINT} (it is ~8 bytes/param x 4)")
    g = p.add_argument_group("size (defaults: the preset's; taken from DIR with --init / --resume)")
    g.add_argument("--preset", choices=tuple(PRESETS), default="small",
                   help="'small': the shipped demo organism (8 x 16 x 16 tokens); 'fidelity': 12 x 24 x 32 tokens, "
                        "textured videos, 6 heads")  # fmt: skip
    g.add_argument("--frames", type=int, default=None)
    g.add_argument("--size", type=int, default=None, help="frame height = width in pixels")
    g.add_argument("--height", type=int, default=None, help="frame height in pixels")
    g.add_argument("--width", type=int, default=None, help="frame width in pixels")
    g.add_argument("--detail", type=float, default=None, help="random texture amplitude (organism.detail)")
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--heads", type=int, default=None)
    g.add_argument("--ffn-dim", type=int, default=None)
    args = p.parse_args(argv)
    if args.size is not None and (args.height is not None or args.width is not None):
        p.error("give --size or --height/--width, not both")
    return args


def spec_and_config(args: argparse.Namespace) -> tuple[OrganismSpec, dict]:
    """The video spec and model config a fresh run builds: the preset, with the size flags applied."""
    spec, model = PRESETS[args.preset]
    height = args.size or args.height or spec.height
    width = args.size or args.width or spec.width
    spec = OrganismSpec(
        **{**asdict(spec), "frames": args.frames or spec.frames, "height": height, "width": width,
           "detail": spec.detail if args.detail is None else args.detail}  # fmt: skip
    )
    overrides = dict(model)
    for key, value in (("num_layers", args.layers), ("num_attention_heads", args.heads), ("ffn_dim", args.ffn_dim)):
        if value is not None:
            overrides[key] = value
    return spec, organism_config(spec, **overrides)


def lr_at(step: int, progress: float, base: float, warmup: int, schedule: str = "run") -> float:
    """Linear warm-up, then constant or cosine decay to 10% of ``base`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, gen: torch.Generator, autocast: bool) -> torch.Tensor:
    """Rectified-flow loss: ``x_t = (1-t) x0 + t noise``, target ``noise - x0``, logit-normal ``t``."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, device=x0.device, generator=gen))
    noise = torch.randn(x0.shape, device=x0.device, generator=gen)
    tt = t.view(b, 1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = model(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise - x0)


def fast_attention(device: torch.device):
    """On CUDA, prefer cuDNN attention (1.6-1.8x FlashAttention-2 on Hopper); elsewhere no change."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


QK_GAINS = ("attn1.norm_q.weight", "attn1.norm_k.weight")  # self-attention q/k RMSNorm gains (Wan's qk_norm)


def _optimizer(model, args, cuda: bool) -> torch.optim.AdamW:
    """AdamW: weight decay on matrices only; the q/k norm gains in a group of their own whose
    learning rate is ``--qk-gain-lr`` times the others' (``lr_scale``, applied by the schedule)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gains = [p for n, p in named if n.endswith(QK_GAINS)]
    rest = [(n, p) for n, p in named if not n.endswith(QK_GAINS)]
    groups = [
        {"params": [p for _, p in rest if p.ndim >= 2], "weight_decay": args.weight_decay, "lr_scale": 1.0},
        {"params": [p for _, p in rest if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": gains, "weight_decay": 0.0, "lr_scale": args.qk_gain_lr},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), fused=cuda)


def _start(args, device: torch.device):
    """Model, EMA, optimizer, spec, config and the state carried over (step, history, runs, batch)."""
    cuda = device.type == "cuda"
    carried = {"step": 0, "history": [], "runs": [], "scenes": 0, "gen": None}
    if args.resume:
        ckpt = torch.load(Path(args.resume) / CHECKPOINT, map_location="cpu", weights_only=False)
        spec, config = OrganismSpec(**ckpt["spec"]), ckpt["config"]
        model = build_organism(config).to(device)
        model.load_state_dict(ckpt["model"])
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        opt = _optimizer(model, args, cuda)
        if len(ckpt["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise ValueError(f"{args.resume}: checkpoint of an older trainer (no q/k gain group); continue with --init")
        opt.load_state_dict(ckpt["optimizer"])
        opt.param_groups[-1]["lr_scale"] = args.qk_gain_lr  # this run's setting, not the saved one
        carried.update({k: ckpt[k] for k in ("step", "history", "runs", "scenes", "gen")})
    else:
        if args.init:
            spec = load_spec(args.init)
            if args.detail is not None:  # go on training on videos with another texture amplitude
                spec = replace(spec, detail=args.detail)
            model = load_organism(args.init, device=device)
            config = {k: model.config[k] for k in organism_config()}
            info_file = Path(args.init) / "train_info.json"
            if info_file.exists():
                previous = json.loads(info_file.read_text())
                carried["runs"] = previous.get("runs", [{k: previous.get(k) for k in ("command", "steps", "train_seconds")}])
                carried["step"] = previous.get("total_steps", previous.get("steps", 0))
                carried["scenes"] = previous.get("total_videos_seen", 0)  # go on with unseen scenes
        else:
            spec, config = spec_and_config(args)
            model = build_organism(config, seed=args.seed).to(device)
        if args.qk_gain_scale != 1.0:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(QK_GAINS):
                        param.mul_(args.qk_gain_scale)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = _optimizer(model, args, cuda)
    model.train()
    return model, (ema if args.ema > 0 else None), opt, spec, config, carried


def save_checkpoint(path: Path, model, ema, opt, spec, config, state: dict) -> None:
    """Everything ``--resume`` needs, written atomically."""
    with written_whole(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "spec": asdict(spec),
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                **state,
            },
            tmp,
        )


def train(args: argparse.Namespace, command: str) -> dict:
    """Run training as ``args`` say; return the ``train_info`` written beside the weights."""
    start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, ema, opt, spec, config, carried = _start(args, device)
    first_step = carried["step"]
    first_batch = -(-carried["scenes"] // args.batch_size)  # the stream goes on after the scenes already seen
    forward = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    stream = SceneStream(
        args.data_seed, args.batch_size, spec.vocabulary(), spec.frames, spec.width / spec.height,
        first=first_batch, detail=spec.detail,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    gen = torch.Generator(device).manual_seed(args.seed)
    if carried["gen"] is not None and args.resume:
        gen.set_state(carried["gen"])
    n_params = sum(p.numel() for p in params)
    tqdm.write(
        f"organism: {n_params / 1e6:.2f}M params, tokens {spec.token_grid}, detail {spec.detail}, batch "
        f"{args.batch_size}, device {device}, workers {workers}, from step {first_step}"
    )

    limit = args.minutes * 60 if args.minutes and args.minutes > 0 else math.inf
    planned = max(args.steps - first_step, 1)  # this run's share of --steps (the 'run' schedule's length)
    losses: list[torch.Tensor] = []
    history: list[float] = list(carried["history"])
    t_train = time.time()
    step, run_steps = first_step, 0
    bar = tqdm(total=max(args.steps - first_step, 0), desc="train", dynamic_ncols=True)
    with fast_attention(device):
        for scene, text, _ in loader:
            if step >= args.steps or time.time() - t_train >= limit:
                break
            scene = {k: v.to(device, non_blocking=True) for k, v in scene.items()}
            text = text.to(device, non_blocking=True)
            with torch.no_grad():
                x0 = encode_video(render(scene, spec.height, spec.width), spec.factor)
                keep = torch.rand(text.shape[0], device=device, generator=gen) >= args.p_uncond
                text = text * keep.view(-1, 1, 1)
            progress = max(run_steps / planned, (time.time() - t_train) / limit)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress, args.lr, args.warmup, args.schedule) * group.get("lr_scale", 1.0)
            loss = flow_loss(forward, x0, text, gen, autocast=cuda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                d = min(args.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
            losses.append(loss.detach())
            step += 1
            run_steps += 1
            bar.update(1)
            if run_steps % args.log_every == 0 or step == args.steps:
                history += torch.stack(losses).float().cpu().tolist()
                losses.clear()
                recent = float(np.mean(history[-args.log_every :]))
                rate = run_steps * args.batch_size / (time.time() - t_train)
                bar.set_postfix(loss=f"{recent:.4f}")
                tqdm.write(f"step {step}: loss {recent:.4f}, lr {opt.param_groups[0]['lr']:.2e}, {rate:.0f} videos/s")
    bar.close()
    if losses:
        history += torch.stack(losses).float().cpu().tolist()
    train_seconds = time.time() - t_train
    del loader

    run = {
        "command": command,
        "first_step": first_step,
        "steps": run_steps,
        "batch_size": args.batch_size,
        "videos_seen": run_steps * args.batch_size,
        "lr": args.lr,
        "qk_gain_lr": args.qk_gain_lr,
        "qk_gain_scale": args.qk_gain_scale,
        "schedule": args.schedule,
        "start": "resume" if args.resume else ("init" if args.init else "scratch"),
        "data_seed": args.data_seed,
        "seed": args.seed,
        "compile": args.compile,
        "final_loss": float(np.mean(history[-100:])) if history else None,
        "train_seconds": round(train_seconds, 1),
        "videos_per_second": round(run_steps * args.batch_size / max(train_seconds, 1e-9), 1),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": DIFFUSERS_VERSION,
    }
    runs = list(carried["runs"]) + [run]
    if not args.no_checkpoint:
        state = {"step": step, "history": history, "runs": runs,
                 "scenes": (first_batch + run_steps) * args.batch_size, "gen": gen.get_state()}  # fmt: skip
        save_checkpoint(out / CHECKPOINT, model, ema, opt, spec, config, state)

    final = (ema if ema is not None else model).eval()
    save_organism(final, out, spec)
    save_loss_plot(history, out / "loss.png", [r.get("first_step", 0) for r in runs])
    aspect = spec.width / spec.height
    preview = [sample_scene(PREVIEW_SEED, i, spec.frames, aspect) for i in range(args.samples)]
    captions = [s.caption for s in preview]
    refs = make_batch(PREVIEW_SEED, args.samples, 0, spec.frames, spec.height, spec.width, detail=spec.detail).videos
    with fast_attention(device):
        videos = sample(final, captions, seed=0, steps=args.sample_steps, spec=spec, progress=False)
    save_sample_strip(videos, refs, captions, out / "samples.png")
    save_sample_gif(videos, out / "samples.gif")

    info = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "spec": asdict(spec),
        "parameters": n_params,
        "total_steps": step,
        "total_videos_seen": sum(r.get("videos_seen") or 0 for r in runs),
        "total_train_seconds": round(sum(r.get("train_seconds") or 0 for r in runs), 1),
        "final_loss": run["final_loss"],
        "wall_seconds": round(time.time() - start, 1),
        "preview_captions": captions,
        "loss_every_100_steps": [round(float(np.mean(history[i : i + 100])), 5) for i in range(0, len(history), 100)],
        "runs": runs,
        "files": sorted({p.name for p in out.iterdir()} | {"train_info.json"}),
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    tqdm.write(f"wrote {out}: {run_steps} steps (total {step}), final loss {info['final_loss']}, {info['wall_seconds']} s")
    return info


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Command-line entry point; ``prog`` names the command recorded in ``train_info.json``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    return train(args, shlex.join(shlex.split(prog) + argv))


if __name__ == "__main__":
    main()
