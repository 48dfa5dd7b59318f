"""Model families: how each diffusers self-attention lays out q, k, v, norms, rotary and text.

A family adapter reproduces the math of the diffusers 0.42 processor it replaces up to the
attention call (``project``) and after it (``finish``), so that a dense plan gives the unpatched
model's output. Models are recognised by class name, so importing this module needs no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...plan import ModelSpec, PlanError, register_family, register_spec_resolver


@dataclass(frozen=True)
class Projected:
    """q, k, v ``(batch, seq, heads, head_dim)`` in sequence order, and what ``finish`` needs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    text: int  # text tokens in the sequence (before or after the video, per the family)
    dtype: torch.dtype  # dtype the processor casts the attention output to


class Family:
    """Base adapter; subclasses fill in the model-specific parts."""

    name: str = ""
    text_position: str = "none"  # where text tokens sit in self-attention: none / prefix / suffix
    model_classes: tuple[str, ...] = ()
    # published models (diffusers configs; DESIGN.md "Models"): name -> (self-attention layers, heads)
    known_models: dict[str, tuple[int, int]] = {}
    processor_classes: tuple[str, ...] = ()
    processor_module: str = ""  # the diffusers module the stock processors live in
    uses_key_mask: bool = False  # whether the processor's attention_mask is a text key-padding mask

    def matches(self, model: Any) -> bool:
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    def attention_modules(self, model: Any) -> list:
        """The self-attention modules to sparsify, in layer order."""
        raise NotImplementedError

    def spec(self, model: Any) -> ModelSpec:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return ModelSpec(self.name, len(self.attention_modules(model)), model.config.num_attention_heads, name)

    def latent_grid(self, model: Any, hidden_states: torch.Tensor, inputs: dict | None = None) -> tuple[int, int, int]:
        """(frames, height, width) of the video tokens after patchify, from the latent input
        (``inputs``: the forward's other arguments by name)."""
        raise NotImplementedError

    def head_dim(self, model: Any) -> int:
        return model.config.attention_head_dim

    def check_model(self, model: Any) -> None:
        """Refuse at ``apply`` what no kernel can run (head sizes)."""
        from ...kernels.checks import head_dim_problem

        problem = head_dim_problem(self.head_dim(model))
        if problem:
            raise ValueError(f"sparse-vdit cannot run {type(model).__name__}'s self-attention: {problem}")

    def supports(self, attn: Any, encoder_hidden_states: Any, attention_mask: Any) -> bool:
        """Whether this call is the self-attention we sparsify (else the original processor runs)."""
        return True

    def project(self, attn, hidden_states, encoder_hidden_states, rotary) -> Projected:
        raise NotImplementedError

    def finish(self, attn, out: torch.Tensor, projected: Projected):
        raise NotImplementedError


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: adjacent channel pairs rotated, in the dtype of cos/sin, cast back."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


class Wan(Family):
    """``WanTransformer3DModel`` (T2V and I2V): ``blocks[i].attn1``; no text in self-attention."""

    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    known_models = {"wan2.1-t2v-1.3b": (30, 12), "wan2.1-t2v-14b": (40, 40)}
    processor_classes = ("WanAttnProcessor", "WanAttnProcessor2_0")
    processor_module = "diffusers.models.transformers.transformer_wan"

    def attention_modules(self, model):
        return [block.attn1 for block in model.blocks]

    def latent_grid(self, model, hidden_states, inputs=None):
        pt, ph, pw = model.config.patch_size
        _, _, f, h, w = hidden_states.shape
        return f // pt, h // ph, w // pw

    def supports(self, attn, encoder_hidden_states, attention_mask):
        return encoder_hidden_states is None and attention_mask is None and getattr(attn, "add_k_proj", None) is None

    def project(self, attn, hidden_states, encoder_hidden_states, rotary):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if rotary is not None:
            q, k = _wan_rotary(q, *rotary), _wan_rotary(k, *rotary)
        return Projected(q, k, v, 0, q.dtype)

    def finish(self, attn, out, projected):
        out = out.flatten(2, 3).type_as(projected.q)
        return attn.to_out[1](attn.to_out[0](out))


class HunyuanVideo(Family):
    """``HunyuanVideoTransformer3DModel``: dual-stream then single-stream blocks; text is a padded suffix."""

    name = "hunyuan_video"
    text_position = "suffix"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    known_models = {"hunyuan-video": (60, 24)}
    processor_classes = ("HunyuanVideoAttnProcessor2_0",)
    processor_module = "diffusers.models.transformers.transformer_hunyuan_video"
    uses_key_mask = True

    def attention_modules(self, model):
        return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]

    def latent_grid(self, model, hidden_states, inputs=None):
        p, pt = model.config.patch_size, model.config.patch_size_t
        _, _, f, h, w = hidden_states.shape
        return f // pt, h // p, w // p

    def project(self, attn, hidden_states, encoder_hidden_states, rotary):
        from diffusers.models.embeddings import apply_rotary_emb

        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None  # single-stream: text joins before the projections
        if single and text:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            video = q.shape[1] - text if single else q.shape[1]
            q = torch.cat([apply_rotary_emb(q[:, :video], rotary, sequence_dim=1), q[:, video:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :video], rotary, sequence_dim=1), k[:, video:]], dim=1)
        if not single and text:
            eq, ek, ev = (_heads(proj(encoder_hidden_states), attn.heads)
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # fmt: skip
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        return Projected(q, k, v, text, q.dtype)

    def finish(self, attn, out, projected):
        out = out.flatten(2, 3).to(projected.dtype)
        if not projected.text:
            return out, None
        video, text = out[:, : -projected.text], out[:, -projected.text :]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


class CogVideoX(Family):
    """``CogVideoXTransformer3DModel`` (CogVideoX and 1.5): ``transformer_blocks[i].attn1``; text prefix."""

    name = "cogvideox"
    text_position = "prefix"
    model_classes = ("CogVideoXTransformer3DModel",)
    known_models = {"cogvideox1.5-5b": (42, 48), "cogvideox-5b": (42, 48), "cogvideox-2b": (30, 30)}
    processor_classes = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
    processor_module = "diffusers.models.attention_processor"

    def attention_modules(self, model):
        return [block.attn1 for block in model.transformer_blocks]

    def latent_grid(self, model, hidden_states, inputs=None):
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        _, f, _, h, w = hidden_states.shape  # CogVideoX latents are (batch, frames, channels, h, w)
        return f // pt, h // p, w // p

    def supports(self, attn, encoder_hidden_states, attention_mask):
        return encoder_hidden_states is not None and attention_mask is None

    def project(self, attn, hidden_states, encoder_hidden_states, rotary):
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rotary is not None:
            q = torch.cat([q[:, :text], apply_rotary_emb(q[:, text:], rotary, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :text], apply_rotary_emb(k[:, text:], rotary, sequence_dim=1)], dim=1)
        return Projected(q, k, v, text, q.dtype)

    def finish(self, attn, out, projected):
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
        return out[:, projected.text :], out[:, : projected.text]


FAMILIES: tuple[Family, ...] = (Wan(), HunyuanVideo(), CogVideoX())
for _family in FAMILIES:
    register_family(_family.name, _family.known_models)


def transformer_of(pipe_or_transformer: Any) -> Any:
    """The denoising transformer of a pipeline (``pipe.transformer``), or the argument itself
    (unwrapped from ``torch.compile``)."""
    model = getattr(pipe_or_transformer, "transformer", None)
    model = pipe_or_transformer if model is None else model
    return getattr(model, "_orig_mod", model)


def family_of(model: Any) -> Family:
    """The adapter for a diffusers transformer; a clear error for unsupported models."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    names = ", ".join(c for f in FAMILIES for c in f.model_classes)
    raise TypeError(f"sparse-vdit supports {names}; got {type(model).__name__}")


def model_spec(pipe_or_transformer: Any) -> ModelSpec:
    """Family, self-attention layers and heads of a supported diffusers pipeline or transformer."""
    model = transformer_of(pipe_or_transformer)
    return family_of(model).spec(model)


def _resolve_spec(obj: Any) -> ModelSpec | None:
    model = transformer_of(obj)
    if not any(f.matches(model) for f in FAMILIES):
        return None
    try:
        return model_spec(model)
    except (AttributeError, PlanError):
        return None


register_spec_resolver(_resolve_spec)
