"""Model families: one description per diffusers video transformer family, in one place.

A family is data plus a few functions:

- ``model_classes`` / ``processor_classes`` / ``processor_module``: what it recognises (by class
  name, so importing this module needs no diffusers) and the stock processors it replaces;
- ``self_attention``: the self-attention modules, as (block list, attribute) paths in layer order;
- ``latent``: how the layout comes from the input: ``"BCFHW"`` / ``"BFCHW"`` latents divided by
  ``patch(config)``, or ``"tokens"`` (packed ``(B, N, C)`` input with ``num_frames`` / ``height`` /
  ``width`` arguments);
- ``text_position``: where text sits in self-attention (none / prefix / suffix), ``uses_key_mask``
  and :meth:`Family.key_mask` for padded text;
- ``project`` / ``finish``: how q, k, v arrive, reproducing the diffusers 0.42 processor up to the
  attention call and after it, so a dense plan gives the unpatched model's output.

Nothing model-specific lives in the processor or the plan. Models whose attention has no 3D token
grid the plan can describe are not listed (``family_of`` refuses them, naming what is supported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


def _patch_3d(config) -> tuple[int, int, int]:
    """``patch_size`` as a (t, h, w) tuple (Wan, SkyReels-V2)."""
    return tuple(config.patch_size)


def _patch_t_and_hw(config) -> tuple[int, int, int]:
    """``patch_size_t`` (None: 1) and a square ``patch_size`` (HunyuanVideo, CogVideoX, LTX-Video)."""
    return (getattr(config, "patch_size_t", None) or 1, config.patch_size, config.patch_size)


class Family:
    """One model family's description (see the module docstring); subclasses set the data and
    ``project`` / ``finish``."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    # published models (diffusers configs; DESIGN.md "Models"): name -> (self-attention layers, heads)
    known_models: dict[str, tuple[int, int]] = {}
    processor_classes: tuple[str, ...] = ()
    processor_module: str = ""  # the diffusers module the stock processors live in
    self_attention: tuple[tuple[str, str], ...] = ()  # (block list attribute, attention attribute)
    latent: str = "BCFHW"  # input layout: "BCFHW", "BFCHW", or "tokens" (num_frames/height/width inputs)
    patch: Callable[[Any], tuple[int, int, int]] = staticmethod(_patch_t_and_hw)
    text_position: str = "none"  # where text tokens sit in self-attention: none / prefix / suffix
    uses_key_mask: bool = False  # whether the processor's attention_mask marks padded text keys

    def matches(self, model: Any) -> bool:
        return any(cls.__name__ in self.model_classes for cls in type(model).__mro__)

    def attention_modules(self, model: Any) -> list:
        """The self-attention modules to sparsify, in layer order."""
        return [getattr(block, attr) for blocks, attr in self.self_attention for block in getattr(model, blocks, ())]

    def spec(self, model: Any) -> ModelSpec:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return ModelSpec(self.name, len(self.attention_modules(model)), model.config.num_attention_heads, name)

    def latent_grid(self, model: Any, hidden_states: torch.Tensor, inputs: dict | None = None) -> tuple[int, int, int]:
        """(frames, height, width) of the video tokens after patchify, from the latent input
        (``inputs``: the forward's arguments by name)."""
        pt, ph, pw = self.patch(model.config)
        if self.latent == "tokens":
            f, h, w = ((inputs or {}).get(k) for k in ("num_frames", "height", "width"))
            if None in (f, h, w):
                raise RuntimeError(f"sparse-vdit: {type(model).__name__} needs num_frames, height and width "
                                   "arguments to know its token grid")  # fmt: skip
            return int(f) // pt, int(h) // ph, int(w) // pw
        dims = dict(zip(self.latent, hidden_states.shape))
        return dims["F"] // pt, dims["H"] // ph, dims["W"] // pw

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

    def key_mask(self, attention_mask: Any, seq_len: int) -> torch.Tensor | None:
        """The processor's ``attention_mask`` as keys kept ``[B, 1, 1, seq_len]`` (``uses_key_mask``)."""
        return attention_mask

    def project(self, attn, hidden_states, encoder_hidden_states, rotary) -> Projected:
        raise NotImplementedError

    def finish(self, attn, out: torch.Tensor, projected: Projected):
        raise NotImplementedError


def set_processor(module: Any, processor: Any) -> None:
    """Install ``processor`` on an attention module (Mochi's has no ``set_processor``)."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: adjacent channel pairs rotated, in the dtype of cos/sin, cast back."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).type_as(x)


class Wan(Family):
    """``WanTransformer3DModel`` (Wan2.1 and Wan2.2: T2V/I2V A14B experts, TI2V-5B): ``blocks[i].attn1``;
    no text in self-attention."""

    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    known_models = {"wan2.1-t2v-1.3b": (30, 12), "wan2.1-t2v-14b": (40, 40), "wan2.2-a14b": (40, 40),
                    "wan2.2-ti2v-5b": (30, 24)}  # fmt: skip
    processor_classes = ("WanAttnProcessor", "WanAttnProcessor2_0")
    processor_module = "diffusers.models.transformers.transformer_wan"
    self_attention = (("blocks", "attn1"),)
    patch = staticmethod(_patch_3d)

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


class WanVACE(Wan):
    """``WanVACETransformer3DModel``: the VACE control blocks (run first), then the Wan blocks; the
    same token grid."""

    name = "wan"
    model_classes = ("WanVACETransformer3DModel",)
    known_models: dict[str, tuple[int, int]] = {}
    self_attention = (("vace_blocks", "attn1"), ("blocks", "attn1"))


class SkyReelsV2(Wan):
    """``SkyReelsV2Transformer3DModel``: Wan's self-attention; calls with a (diffusion-forcing causal)
    attention mask run the stock processor, dense."""

    name = "skyreels_v2"
    model_classes = ("SkyReelsV2Transformer3DModel",)
    known_models = {"skyreels-v2-1.3b": (30, 12), "skyreels-v2-14b": (40, 40)}
    processor_classes = ("SkyReelsV2AttnProcessor", "SkyReelsV2AttnProcessor2_0")
    processor_module = "diffusers.models.transformers.transformer_skyreels_v2"


class HunyuanVideo(Family):
    """``HunyuanVideoTransformer3DModel``: dual-stream then single-stream blocks; text is a padded suffix."""

    name = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    known_models = {"hunyuan-video": (60, 24)}
    processor_classes = ("HunyuanVideoAttnProcessor2_0",)
    processor_module = "diffusers.models.transformers.transformer_hunyuan_video"
    self_attention = (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn"))
    text_position = "suffix"
    uses_key_mask = True
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


class HunyuanVideo15(HunyuanVideo):
    """``HunyuanVideo15Transformer3DModel``: dual-stream blocks only; text (image, ByT5 and MLLM
    tokens, valid first) is a padded suffix; the processor gets the text's ``[B, text]`` mask."""

    name = "hunyuan_video15"
    model_classes = ("HunyuanVideo15Transformer3DModel",)
    known_models = {"hunyuan-video-1.5": (54, 16)}
    processor_classes = ("HunyuanVideo15AttnProcessor2_0",)
    processor_module = "diffusers.models.transformers.transformer_hunyuan_video15"
    self_attention = (("transformer_blocks", "attn"),)

    def key_mask(self, attention_mask, seq_len):
        if attention_mask is None:
            return None
        video = seq_len - attention_mask.shape[1]
        return torch.nn.functional.pad(attention_mask.bool(), (video, 0), value=True)[:, None, None, :]


class Mochi(Family):
    """``MochiTransformer3DModel``: joint attention (``transformer_blocks[i].attn1``); text is a
    padded suffix given as its ``[B, text]`` mask (the processor attends each sample's real tokens)."""

    name = "mochi"
    model_classes = ("MochiTransformer3DModel",)
    known_models = {"mochi-1": (48, 24)}
    processor_classes = ("MochiAttnProcessor2_0",)
    processor_module = "diffusers.models.attention_processor"
    self_attention = (("transformer_blocks", "attn1"),)
    text_position = "suffix"
    uses_key_mask = True
    key_mask = HunyuanVideo15.key_mask

    def project(self, attn, hidden_states, encoder_hidden_states, rotary):
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        eq, ek, ev = (_heads(proj(encoder_hidden_states), attn.heads)
                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))  # fmt: skip
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        if rotary is not None:
            q, k = _mochi_rotary(q, *rotary), _mochi_rotary(k, *rotary)
        text = encoder_hidden_states.shape[1]
        return Projected(torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1), text, q.dtype)

    def finish(self, attn, out, projected):
        out = out.flatten(2, 3)
        video, text = out[:, : -projected.text], out[:, -projected.text :]
        video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def _mochi_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding: even/odd channels rotated in float32, interleaved back."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], -1).flatten(-2)


class LTXVideo(Family):
    """``LTXVideoTransformer3DModel``: ``transformer_blocks[i].attn1``; packed ``(B, N, C)`` latents
    (frame-major), the grid from the ``num_frames`` / ``height`` / ``width`` arguments; rotary on the
    flat projections."""

    name = "ltx_video"
    model_classes = ("LTXVideoTransformer3DModel",)
    known_models = {"ltx-video": (28, 32)}
    processor_classes = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")
    processor_module = "diffusers.models.transformers.transformer_ltx"
    self_attention = (("transformer_blocks", "attn1"),)
    latent = "tokens"

    def supports(self, attn, encoder_hidden_states, attention_mask):
        return encoder_hidden_states is None and attention_mask is None

    def project(self, attn, hidden_states, encoder_hidden_states, rotary):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if rotary is not None:
            q, k = apply_rotary_emb(q, rotary), apply_rotary_emb(k, rotary)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        return Projected(q, k, v, 0, q.dtype)

    def finish(self, attn, out, projected):
        out = out.flatten(2, 3).to(projected.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class CogVideoX(Family):
    """``CogVideoXTransformer3DModel`` (CogVideoX and 1.5): ``transformer_blocks[i].attn1``; text prefix."""

    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    known_models = {"cogvideox1.5-5b": (42, 48), "cogvideox-5b": (42, 48), "cogvideox-2b": (30, 30)}
    processor_classes = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")
    processor_module = "diffusers.models.attention_processor"
    self_attention = (("transformer_blocks", "attn1"),)
    latent = "BFCHW"
    text_position = "prefix"

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


FAMILIES: tuple[Family, ...] = (Wan(), HunyuanVideo(), CogVideoX(), WanVACE(), SkyReelsV2(), HunyuanVideo15(), LTXVideo(), Mochi())
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
