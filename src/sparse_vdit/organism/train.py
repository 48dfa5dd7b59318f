"""Train the organism with rectified-flow matching on procedural videos rendered on the fly.

``python -m sparse_vdit.organism.train --out DIR`` (about 12 minutes on one H100 by default).
DataLoader workers sample scenes and caption embeddings on the CPU; the videos are rendered on
the training device, so the generator keeps up with the GPU. Writes to ``DIR``: the weights
(``config.json``, fp16 ``diffusion_pytorch_model.safetensors``, ``organism.json``),
``train_info.json``, ``loss.png``, ``samples.png`` and ``samples.gif``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import SceneStream, make_batch, render, sample_scene
from .model import (
    OrganismSpec,
    build_organism,
    encode_video,
    load_organism,
    load_spec,
    organism_config,
    sample,
    save_organism,
)

PROG = "python -m sparse_vdit.organism.train"
PREVIEW_SEED = 12345  # scenes whose captions the sample strip shows (not a training seed)


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Train the organism (small Wan video DiT).")
    p.add_argument("--out", default="runs/organism", help="output folder")
    p.add_argument("--steps", type=int, default=8000, help="optimizer steps (upper bound)")
    p.add_argument("--minutes", type=float, default=12.0, help="stop training after this many minutes (0: none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="model init and noise seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the procedural scenes")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=None, help="data workers (default 6 on cuda, 0 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument(
        "--init",
        default=None,
        metavar="DIR",
        help="continue from the weights saved in DIR (its config and size; fresh optimizer state)",
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps for the preview strip")
    p.add_argument("--samples", type=int, default=4, help="captions in the preview strip")
    g = p.add_argument_group("size (defaults: the shipped organism; taken from DIR with --init)")
    g.add_argument("--frames", type=int, default=OrganismSpec.frames)
    g.add_argument("--size", type=int, default=OrganismSpec.height, help="frame height = width in pixels")
    g.add_argument("--layers", type=int, default=organism_config()["num_layers"])
    g.add_argument("--heads", type=int, default=organism_config()["num_attention_heads"])
    g.add_argument("--ffn-dim", type=int, default=organism_config()["ffn_dim"])
    return p.parse_args(argv)


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
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


def save_loss_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="step")
    if len(y) > 1:
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(y) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="flow-matching MSE", yscale="log", title="organism training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8."""
    return ((video.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_sample_strip(
    videos: torch.Tensor, references: torch.Tensor, captions: list[str], path: Path, scale: int = 3
) -> None:
    """For each caption a row of training-data frames over a row of sampled frames, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, t, _, h, w = videos.shape
    gap, head = 2, 14  # pixels between frames; caption band above each pair of rows (screen pixels)
    rows = []
    for i in range(n):
        for vid in (references[i], videos[i]):
            frames = _to_uint8(vid).repeat(scale, axis=1).repeat(scale, axis=2)
            pad = np.full((t, h * scale, gap, 3), 255, np.uint8)
            rows.append(np.concatenate([np.concatenate([f, p], axis=1) for f, p in zip(frames, pad)], axis=1))
    blank = np.full((head, rows[0].shape[1], 3), 255, np.uint8)
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate(sum(([blank, rows[2 * i], sep, rows[2 * i + 1]] for i in range(n)), []), axis=0)
    dpi = 100
    fig = plt.figure(figsize=((grid.shape[1] + 60) / dpi, grid.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes([60 / (grid.shape[1] + 60), 0, grid.shape[1] / (grid.shape[1] + 60), 1])
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    pair = head + 2 * h * scale + gap
    for i, caption in enumerate(captions):
        top = i * pair
        ax.text(0, top + head - 3, caption, fontsize=8, va="bottom")
        for j, tag in enumerate(("data", "sample")):
            y = top + head + j * (h * scale + gap) + h * scale / 2
            ax.text(-6, y, tag, fontsize=8, ha="right", va="center")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_sample_gif(videos: torch.Tensor, path: Path, scale: int = 2) -> bool:
    """Tile the sample videos side by side into a looping GIF; False if imageio is missing."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        return False
    tiles = np.concatenate([_to_uint8(v) for v in videos], axis=2)  # (T, H, n*W, 3)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    imageio.mimsave(path, list(tiles), duration=0.25, loop=0)
    return True


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
    previous = None
    if args.init:
        spec = load_spec(args.init)
        model = load_organism(args.init, device=device).train()
        config = {k: model.config[k] for k in organism_config()}
        info_file = Path(args.init) / "train_info.json"
        previous = json.loads(info_file.read_text()) if info_file.exists() else {}
    else:
        spec = OrganismSpec(frames=args.frames, height=args.size, width=args.size)
        config = organism_config(
            spec, num_layers=args.layers, num_attention_heads=args.heads, ffn_dim=args.ffn_dim
        )
        model = build_organism(config, seed=args.seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    forward = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=cuda,
    )
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    stream = SceneStream(args.data_seed, args.batch_size, spec.vocabulary(), spec.frames, spec.width / spec.height)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    gen = torch.Generator(device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in params)
    tqdm.write(
        f"organism: {n_params / 1e6:.2f}M params, tokens {spec.token_grid}, batch {args.batch_size}, "
        f"device {device}, workers {workers}"
    )

    limit = args.minutes * 60 if args.minutes and args.minutes > 0 else math.inf
    losses: list[torch.Tensor] = []
    history: list[float] = []
    t_train = time.time()
    step = 0
    bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True)
    for scene, text, _ in loader:
        if step >= args.steps or time.time() - t_train >= limit:
            break
        scene = {k: v.to(device, non_blocking=True) for k, v in scene.items()}
        text = text.to(device, non_blocking=True)
        with torch.no_grad():
            x0 = encode_video(render(scene, spec.height, spec.width), spec.factor)
            keep = torch.rand(text.shape[0], device=device, generator=gen) >= args.p_uncond
            text = text * keep.view(-1, 1, 1)
        progress = max(step / args.steps, (time.time() - t_train) / limit)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
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
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            history += torch.stack(losses).float().cpu().tolist()
            losses.clear()
            recent = float(np.mean(history[-args.log_every :]))
            rate = step * args.batch_size / (time.time() - t_train)
            bar.set_postfix(loss=f"{recent:.4f}")
            tqdm.write(f"step {step}: loss {recent:.4f}, lr {opt.param_groups[0]['lr']:.2e}, {rate:.0f} videos/s")
    bar.close()
    if losses:
        history += torch.stack(losses).float().cpu().tolist()
    train_seconds = time.time() - t_train
    del loader

    final = (ema if ema is not None else model).eval()
    save_organism(final, out, spec)
    save_loss_plot(history, out / "loss.png")
    preview = [sample_scene(PREVIEW_SEED, i, spec.frames, spec.width / spec.height) for i in range(args.samples)]
    captions = [s.caption for s in preview]
    refs = make_batch(PREVIEW_SEED, args.samples, 0, spec.frames, spec.height, spec.width).videos
    videos = sample(final, captions, seed=0, steps=args.sample_steps, spec=spec, progress=False)
    save_sample_strip(videos, refs, captions, out / "samples.png")
    save_sample_gif(videos, out / "samples.gif")

    info = {
        "command": command,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "spec": asdict(spec),
        "data_seed": args.data_seed,
        "seed": args.seed,
        "steps": step,
        "batch_size": args.batch_size,
        "videos_seen": step * args.batch_size,
        "lr": args.lr,
        "ema": args.ema,
        "p_uncond": args.p_uncond,
        "compile": args.compile,
        "parameters": n_params,
        "final_loss": float(np.mean(history[-100:])) if history else None,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "videos_per_second": round(step * args.batch_size / max(train_seconds, 1e-9), 1),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "preview_captions": captions,
        "files": sorted({p.name for p in out.iterdir()} | {"train_info.json"}),
    }
    if previous is not None:
        info["init"] = {"from": str(args.init), "previous": previous}
        for total, own in (("total_train_seconds", "train_seconds"), ("total_videos_seen", "videos_seen")):
            info[total] = round(info[own] + previous.get(total, previous.get(own, 0)), 1)
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    tqdm.write(f"wrote {out}: {step} steps, final loss {info['final_loss']}, {info['wall_seconds']} s")
    return info


def main(argv: list[str] | None = None, prog: str = PROG) -> dict:
    """Command-line entry point; ``prog`` names the command recorded in ``train_info.json``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    return train(args, shlex.join(shlex.split(prog) + argv))


if __name__ == "__main__":
    main()
