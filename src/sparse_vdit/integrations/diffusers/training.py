"""Sparse-aware LoRA distillation of a diffusers video pipeline's transformer (``sparse-vdit finetune``).

The student is the transformer with a PEFT LoRA and a plan applied; the teacher is the same
transformer with the adapter disabled and every layer dense (the frozen base weights: no second
copy of the model). On a noised latent ``x_t = (1 - sigma) x_0 + sigma noise`` at one of the
pipeline's own denoising steps (its scheduler's timesteps and sigmas for ``steps`` inference
steps, the step index picking the plan's patterns), the student's output is fitted to the
teacher's (mean squared error).

Only flow-matching pipelines train here (the noising above is theirs); each has a
:class:`Recipe`: how its VAE and text encoders encode a video and a caption, and how the
transformer is called. Supported: ``WanPipeline`` (Wan2.1 T2V, Wan2.2 TI2V-5B text-to-video;
not the two-expert A14B) and ``HunyuanVideoPipeline``; anything else is refused with a
``ValueError`` naming them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch

from ...methods.protocol import AttentionCall, plan_source
from ...plan import Plan
from .families import family_of

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class Recipe:
    """What distillation needs to know of one pipeline class (subclasses: one per family)."""

    pipelines: tuple[str, ...] = ()
    family: str = ""

    def check(self, pipe: Any) -> None:
        """Refuse a pipeline of this class that cannot be trained (``ValueError``)."""

    def default_size(self, pipe: Any) -> tuple[int, int, int]:
        """(height, width, frames) the pipeline generates by default (its ``__call__`` defaults)."""
        params = inspect.signature(type(pipe).__call__).parameters
        return tuple(int(params[name].default) for name in ("height", "width", "num_frames"))  # type: ignore[return-value]

    def latent_shape(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of one video's latents, as ``prepare_latents`` makes them."""
        t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        return pipe.transformer.config.in_channels, (frames - 1) // t + 1, height // s, width // s

    def schedule(self, pipe: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas), one each per denoising step, as the pipeline sets its scheduler."""
        pipe.scheduler.set_timesteps(steps, device="cpu")
        return pipe.scheduler.timesteps[:steps].float(), pipe.scheduler.sigmas[:steps].float()

    def encode_text(self, pipe: Any, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, the transformer's text inputs (CPU tensors)."""
        raise NotImplementedError

    def encode_video(self, pipe: Any, video: torch.Tensor) -> torch.Tensor:
        """``(3, frames, height, width)`` pixels in [-1, 1] -> latents ``(C, f, h, w)`` as the
        transformer sees them (the inverse of the pipeline's decode normalisation)."""
        raise NotImplementedError

    def inputs(self, pipe: Any, latents: torch.Tensor, timestep: torch.Tensor, text: dict[str, torch.Tensor]) -> dict:
        """Keyword arguments of one transformer call on a batch."""
        raise NotImplementedError


def _latent_dist(vae: Any, video: torch.Tensor) -> torch.Tensor:
    """The VAE's latent mean for one video (deterministic, so a cached encoding is reproducible)."""
    x = video[None].to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mode()[0].float()


class WanRecipe(Recipe):
    """``WanPipeline`` (Wan2.1 T2V, Wan2.2 TI2V-5B): UMT5 text states, latents normalised by the VAE's mean and std."""

    pipelines = ("WanPipeline",)
    family = "wan"
    max_sequence_length = 512  # WanPipeline.__call__'s

    def check(self, pipe):
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("two-expert Wan2.2 pipelines (transformer_2) are not supported by finetune yet; "
                             "one transformer (Wan2.1, Wan2.2 TI2V-5B) is")  # fmt: skip

    @torch.no_grad()
    def encode_text(self, pipe, captions):
        embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                       max_sequence_length=self.max_sequence_length, device=pipe.text_encoder.device)  # fmt: skip
        return [{"encoder_hidden_states": e.cpu()} for e in embeds]

    @torch.no_grad()
    def encode_video(self, pipe, video):
        vae = pipe.vae
        z = _latent_dist(vae, video)
        mean = torch.tensor(vae.config.latents_mean).view(-1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(-1, 1, 1, 1)
        return ((z.cpu() - mean) / std)

    def inputs(self, pipe, latents, timestep, text):
        if pipe.config.get("expand_timesteps", False):  # Wan2.2 TI2V: one timestep per video token
            _, ph, pw = pipe.transformer.config.patch_size
            tokens = latents.shape[2] * (latents.shape[3] // ph) * (latents.shape[4] // pw)
            timestep = timestep[:, None].expand(-1, tokens)
        return dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text["encoder_hidden_states"],
                    return_dict=False)  # fmt: skip


class HunyuanVideoRecipe(Recipe):
    """``HunyuanVideoPipeline``: text states, pooled projection and attention mask; latents times the VAE's
    scaling factor."""

    pipelines = ("HunyuanVideoPipeline",)
    family = "hunyuan_video"

    def schedule(self, pipe, steps):
        import numpy as np

        # HunyuanVideoPipeline.__call__ passes these sigmas (the scheduler's shift applies to them)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device="cpu")
        return pipe.scheduler.timesteps[:steps].float(), pipe.scheduler.sigmas[:steps].float()

    @torch.no_grad()
    def encode_text(self, pipe, captions):
        embeds, pooled, mask = pipe.encode_prompt(prompt=captions, prompt_2=None, device=pipe.text_encoder.device)
        return [{"encoder_hidden_states": e.cpu(), "pooled_projections": p.cpu(), "encoder_attention_mask": m.cpu()}
                for e, p, m in zip(embeds, pooled, mask)]  # fmt: skip

    @torch.no_grad()
    def encode_video(self, pipe, video):
        return _latent_dist(pipe.vae, video).cpu() * pipe.vae.config.scaling_factor

    def inputs(self, pipe, latents, timestep, text):
        kwargs = dict(hidden_states=latents, timestep=timestep, return_dict=False, **text)
        if pipe.transformer.config.get("guidance_embeds", False):  # the pipeline's default guidance_scale
            scale = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
            kwargs["guidance"] = torch.full_like(timestep, float(scale) * 1000.0)
        return kwargs


RECIPES: tuple[Recipe, ...] = (WanRecipe(), HunyuanVideoRecipe())


def recipe_named(name: str) -> Recipe:
    """The recipe of the pipeline class called ``name``; ``ValueError`` naming the supported ones."""
    recipe = next((r for r in RECIPES if name in r.pipelines), None)
    if recipe is None:
        supported = ", ".join(p for r in RECIPES for p in r.pipelines)
        raise ValueError(f"finetune supports the flow-matching pipelines {supported}; got {name}")
    return recipe


def recipe_for(pipe: Any) -> Recipe:
    """The recipe of ``pipe``'s class; ``ValueError`` naming the supported pipelines otherwise, or
    when its scheduler is not flow-matching."""
    name = type(pipe).__name__
    recipe = recipe_named(name)
    scheduler = pipe.scheduler
    config = scheduler.config
    if not (type(scheduler).__name__.startswith("FlowMatch") or config.get("use_flow_sigmas", False)
            or config.get("prediction_type") == "flow_prediction"):  # fmt: skip
        raise ValueError(f"{name}'s scheduler {type(scheduler).__name__} is not flow-matching "
                         f"(prediction_type={config.get('prediction_type')!r}); finetune noises latents as rectified flow")  # fmt: skip
    recipe.check(pipe)
    return recipe


# --- the adapter ---------------------------------------------------------------------------------


def add_lora(transformer: Any, rank: int, targets=LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a PEFT LoRA (``lora_alpha = rank``; ``lora_B`` starts at zero,
    so the student starts as the base model) on ``targets``; returns its parameters, in float32
    (the base weights keep their dtype)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(pipe: Any, folder) -> None:
    """Write the transformer's adapter as ``pytorch_lora_weights.safetensors`` in ``folder``, the
    file ``pipe.load_lora_weights(folder)`` reads (keys ``transformer.*``, the LoRA config in the metadata)."""
    from peft.utils import get_peft_model_state_dict

    transformer = pipe.transformer
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)


# --- the distillation step -------------------------------------------------------------------------


class DistillSource:
    """Pattern source for distillation: the plan's patterns at ``step`` (the denoising step the
    training timestep belongs to), or every layer dense while ``dense`` (the teacher's pass)."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.step, self.dense = plan, 0, False
        self._source = plan_source(plan)

    def __call__(self, call: AttentionCall):
        if self.dense:
            return None
        return self._source(replace(call, step=self.step))


@dataclass
class Distiller:
    """One patched pipeline's distillation: ``loss(latents, text, step, noise)`` runs the teacher
    (adapter off, dense) and the student (adapter on, plan at ``step``) on the same noised input.

    Create it after :func:`add_lora`; :meth:`close` removes the plan.
    """

    pipe: Any
    recipe: Recipe
    plan: Plan
    steps: int  # denoising steps of the schedule the plan's step indices refer to
    backend: str = "auto"
    block_size: int | None = None

    def __post_init__(self) -> None:
        from .api import apply

        self.timesteps, self.sigmas = self.recipe.schedule(self.pipe, self.steps)
        self.source = DistillSource(self.plan)
        state = apply(self.pipe.transformer, self.plan, backend=self.backend, block_size=self.block_size)
        state.pattern_source = self.source

    def loss(self, latents: torch.Tensor, text: dict[str, torch.Tensor], step: int, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared difference of the student's and the teacher's outputs at denoising ``step``."""
        transformer = self.pipe.transformer
        device, dtype = transformer.device, transformer.dtype
        sigma = float(self.sigmas[step])
        noisy = ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(device, dtype)
        timestep = self.timesteps[step].expand(latents.shape[0]).to(device)
        text = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in text.items()}
        inputs = self.recipe.inputs(self.pipe, noisy, timestep, text)
        self.source.dense = True
        transformer.disable_adapters()
        try:
            with torch.no_grad():
                target = transformer(**inputs)[0].float()
        finally:
            transformer.enable_adapters()
            self.source.dense = False
        self.source.step = step
        prediction = transformer(**inputs)[0].float()
        return torch.nn.functional.mse_loss(prediction, target)

    def close(self) -> None:
        from .api import remove

        remove(self.pipe.transformer)


def latent_layout_grid(pipe: Any, latents: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) of the video tokens for one video's latents ``(C, f, h, w)``."""
    transformer = pipe.transformer
    return family_of(transformer).latent_grid(transformer, latents[None])
