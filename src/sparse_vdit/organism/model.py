"""The organism: a small diffusers ``WanTransformer3DModel`` trained on :mod:`.data` videos.

Videos ``(batch, frames, 3, H, W)`` in [-1, 1] become "latents" ``(batch, 3*f*f, frames, H/f,
W/f)`` by a fixed pixel-unshuffle (no learned autoencoder; exact inverse), and Wan's own
``(1, 2, 2)`` patchify turns those into ``frames x (H/2f) x (W/2f)`` tokens. Captions are embedded
by the fixed :class:`~.data.Vocabulary` and enter through Wan's cross-attention, so the real Wan
code path (and any attention processor installed on it) runs unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..integrations.diffusers.models import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from .data import Vocabulary

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the small organism: CPU demo and tests
FIDELITY_WEIGHTS_DIR = Path(__file__).parent / "weights-fidelity"  # the larger one fidelity is judged on
MODELS = {"small": WEIGHTS_DIR, "fidelity": FIDELITY_WEIGHTS_DIR}  # the shipped organisms by name
SPEC_FILE = "organism.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the name save_pretrained uses


@dataclass(frozen=True)
class OrganismSpec:
    """Video and caption sizes the organism is trained for (saved as ``organism.json``)."""

    frames: int = 8
    height: int = 64
    width: int = 64
    factor: int = 2  # pixel-unshuffle factor of the fixed autoencoder
    text_tokens: int = 32
    text_dim: int = 64
    vocab_seed: int = 0
    shift: float = 3.0  # flow shift used for sampling
    guidance_scale: float = 4.0
    detail: float = 0.0  # amplitude of the random textures (organism.detail); 0: none

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(channels, frames, height, width)`` of one latent."""
        return (self.latent_channels, self.frames, self.height // self.factor, self.width // self.factor)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the video tokens after Wan's (1, 2, 2) patchify."""
        return (self.frames, self.height // (2 * self.factor), self.width // (2 * self.factor))

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.text_tokens, self.text_dim, self.vocab_seed)


FIDELITY_SPEC = OrganismSpec(frames=12, height=96, width=128, detail=0.3)
"""The fidelity organism's videos: 96 x 128 pixels, 12 frames -> 12 x 24 x 32 = 9,216 tokens, textured."""
FIDELITY_MODEL = dict(num_attention_heads=6, ffn_dim=1536)  # 8 layers x 6 heads x 64


def organism_config(spec: OrganismSpec | None = None, **overrides) -> dict:
    """Diffusers ``WanTransformer3DModel`` config of the organism (8 layers, 4 heads x 64)."""
    spec = spec or OrganismSpec()
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=64,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        text_dim=spec.text_dim,
        freq_dim=256,
        ffn_dim=1024,
        num_layers=8,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    config.update(overrides)
    return config


def build_organism(config: dict | None = None, seed: int = 0) -> WanTransformer3DModel:
    """A freshly initialised organism (float32), initialised from ``seed`` without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**(config or organism_config()))


def encode_video(video: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``(B, T, 3, H, W)`` -> latent ``(B, 3*factor^2, T, H/factor, W/factor)`` (pixel-unshuffle)."""
    b, t, c, h, w = video.shape
    z = F.pixel_unshuffle(video.reshape(b * t, c, h, w), factor)
    return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)


def decode_video(latent: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Exact inverse of :func:`encode_video`."""
    b, c, t, h, w = latent.shape
    x = F.pixel_shuffle(latent.transpose(1, 2).reshape(b * t, c, h, w), factor)
    return x.reshape(b, t, *x.shape[1:])


def save_organism(transformer: WanTransformer3DModel, path: str | Path, spec: OrganismSpec | None = None) -> Path:
    """Write what ``save_pretrained`` writes (``config.json``, fp16 safetensors) and ``organism.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_config(path)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in transformer.state_dict().items()}
    save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / SPEC_FILE).write_text(json.dumps(asdict(spec or OrganismSpec()), indent=2) + "\n")
    return path


def load_spec(path: str | Path | None = None) -> OrganismSpec:
    """The :class:`OrganismSpec` saved beside the weights (defaults where there is none)."""
    f = Path(path or WEIGHTS_DIR) / SPEC_FILE
    return OrganismSpec(**json.loads(f.read_text())) if f.exists() else OrganismSpec()


def load_organism(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanTransformer3DModel:
    """Load the organism (the shipped weights in ``organism/weights/`` by default), in eval mode."""
    path = Path(path or WEIGHTS_DIR)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no organism weights in {path}; train them with `python -m sparse_vdit.organism.train --out {path}`"
        )
    # The files are save_pretrained's, but diffusers' from_pretrained needs `accelerate` for Wan
    # (its fp32-kept modules); load them by hand so it is not a dependency.
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(path))
    state = load_file(path / WEIGHTS_FILE)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return to_dtype(model, dtype).to(device).eval()


def to_dtype(model: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast the parameters to ``dtype`` in place, except the modules Wan keeps in float32."""
    if dtype != torch.float32:
        keep = set(model._keep_in_fp32_modules or ())
        for name, p in model.named_parameters():
            if not keep.intersection(name.split(".")):
                p.data = p.data.to(dtype)
    return model


def make_scheduler(name: str = "unipc", shift: float = 3.0):
    """A diffusers flow-matching scheduler: ``"unipc"`` (as Wan ships it) or ``"euler"``."""
    if name == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(f"unknown scheduler {name!r}; use 'unipc' or 'euler'")


def initial_noise(spec: OrganismSpec, seed: int | list[int], n: int) -> torch.Tensor:
    """Starting noise ``(n, *latent_shape)`` float32 on the CPU; video ``i`` gets ``seed[i]`` (or ``seed + i``)."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} captions")
    return torch.stack(
        [torch.randn(spec.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


@torch.no_grad()
def sample(
    transformer: WanTransformer3DModel,
    captions: list[str] | str,
    seed: int | list[int] = 0,
    steps: int = 20,
    guidance_scale: float | None = None,
    spec: OrganismSpec | None = None,
    scheduler: str = "unipc",
    shift: float | None = None,
    progress: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate videos ``(n, frames, 3, H, W)`` in [-1, 1] (float32, on the transformer's device).

    Classifier-free guidance batches each caption with the empty caption (all-zero embedding)
    when ``guidance_scale != 1``. The transformer is called through its normal forward, so
    attention processors installed on it apply. ``callback(step, timestep)`` runs before each
    step's forward. Noise is drawn on the CPU, so a seed gives the same video on any device.
    """
    spec = spec or OrganismSpec()
    captions = [captions] if isinstance(captions, str) else list(captions)
    guidance_scale = spec.guidance_scale if guidance_scale is None else guidance_scale
    param = transformer.patch_embedding.weight  # not a module kept in float32
    device, dtype = param.device, param.dtype
    n = len(captions)
    text = spec.vocabulary().embed(captions)
    cfg = guidance_scale != 1.0
    if cfg:
        text = torch.cat([text, torch.zeros_like(text)])
    text = text.to(device, dtype)
    latents = initial_noise(spec, seed, n).to(device)
    sched = make_scheduler(scheduler, spec.shift if shift is None else shift)
    sched.set_timesteps(steps, device=device)
    for i, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False)):
        if callback is not None:
            callback(i, t)
        x = torch.cat([latents, latents]) if cfg else latents
        v = transformer(
            hidden_states=x.to(dtype),
            timestep=t.expand(x.shape[0]).float(),
            encoder_hidden_states=text,
            return_dict=False,
        )[0].float()
        if cfg:
            cond, uncond = v.chunk(2)
            v = uncond + guidance_scale * (cond - uncond)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return decode_video(latents, spec.factor).clamp(-1, 1)
