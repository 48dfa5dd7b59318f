"""The diffusers video transformers the end-to-end scripts build: real-size configs and tiny ones.

Built on the meta device and materialised with random weights on the target device (no
download); inputs, the self-attention layout of an input, mixed plans of a target density, and
regional compilation. Used by e2e.py, sp.py, search_cost.py and overhead.py.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from dataclasses import dataclass, field

import torch

import common  # noqa: F401  (puts src/ on the path when run from a checkout)
from sparse_vdit import Plan, VideoLayout
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical


@dataclass(frozen=True)
class Bench:
    name: str
    cls: str  # diffusers class name
    config: dict
    latent: tuple  # hidden_states shape
    text: int  # text tokens given to the model
    text_valid: int | None = None  # real (unpadded) prompt tokens, HunyuanVideo
    extra: dict = field(default_factory=dict)  # HunyuanVideo 1.5: text_2 / text_2_valid (ByT5), image_tokens; LTX: grid
    seed: int = 0  # of the random weights and the mixed plans (the experts of one pipeline differ)

    def self_attention_text(self) -> tuple[int, int | None]:
        """(text tokens in self-attention, real ones or None): HunyuanVideo 1.5 joins image, ByT5
        and MLLM tokens (valid first)."""
        extra = self.extra.get("text_2", 0) + self.extra.get("image_tokens", 0)
        if self.text_valid is None:
            return self.text + extra, None
        return self.text + extra, self.text_valid + self.extra.get("text_2_valid", 0)


WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, attention_head_dim=128)  # fmt: skip
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))  # fmt: skip
COG15 = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
             flip_sin_to_cos=True, freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True,
             norm_eps=1e-5, num_attention_heads=48, num_layers=42, out_channels=16, patch_bias=False, patch_size=2,
             patch_size_t=2, sample_frames=81, sample_height=300, sample_width=300, spatial_interpolation_scale=1.875,
             temporal_compression_ratio=4, temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512,
             timestep_activation_fn="silu", use_learned_positional_embeddings=False,
             use_rotary_positional_embeddings=True)  # fmt: skip

# HunyuanVideo 1.5 720p T2V (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v): 8.3B, patch 1 on
# a 16x VAE; latents 32 channels + 33 of image condition
HUNYUAN15 = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                 num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
                 text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
                 rope_axes_dim=(16, 56, 56), target_size=960, task_type="t2v")  # fmt: skip
# the pipeline's text: 1000 MLLM tokens (120 real here), 256 ByT5 (16 real), 729 image tokens (padding in T2V)
HUNYUAN15_TEXT = dict(text_2=256, text_2_valid=16, image_tokens=729)
WAN14B = {**WAN, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# LTX-Video 0.9 (2B; Lightricks/LTX-Video): packed (B, tokens, 128) latents of a 32x / 8x VAE, patch 1
LTX = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
           attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
           qk_norm="rms_norm_across_heads")  # fmt: skip
# Mochi-1 preview (10B; genmo/mochi-1-preview): 12 latent channels of an 8x / 6x VAE, patch 2
MOCHI = dict(patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48, pooled_projection_dim=1536,
             in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=4096, time_embed_dim=256,
             activation_fn="swiglu", max_sequence_length=256)  # fmt: skip

MODELS = {
    "wan-1.3b": Bench("wan-1.3b", "WanTransformer3DModel", {**WAN, "num_attention_heads": 12, "ffn_dim": 8960,
                      "num_layers": 30}, (1, 16, 21, 60, 104), 512),  # fmt: skip
    "wan-14b": Bench("wan-14b", "WanTransformer3DModel", {**WAN, "num_attention_heads": 40, "ffn_dim": 13824,
                     "num_layers": 40}, (1, 16, 21, 90, 160), 512),  # fmt: skip
    "hunyuan": Bench("hunyuan", "HunyuanVideoTransformer3DModel", HUNYUAN, (1, 16, 33, 90, 160), 256, 64),
    "cogvideox1.5": Bench("cogvideox1.5", "CogVideoXTransformer3DModel", COG15, (1, 22, 16, 96, 170), 226),
    # Wan2.2-T2V-A14B 720p: two experts of Wan2.1-14B's architecture, each with its own weights and
    # plan; built one after the other (one 14B bf16 expert, ~28 GB, on the GPU at a time)
    "wan2.2-a14b-transformer": Bench("wan2.2-a14b-transformer", "WanTransformer3DModel", WAN14B,
                                     (1, 16, 21, 90, 160), 512, seed=0),  # fmt: skip
    "wan2.2-a14b-transformer_2": Bench("wan2.2-a14b-transformer_2", "WanTransformer3DModel", WAN14B,
                                       (1, 16, 21, 90, 160), 512, seed=1),  # fmt: skip
    "hunyuan1.5": Bench("hunyuan1.5", "HunyuanVideo15Transformer3DModel", HUNYUAN15, (1, 65, 31, 45, 80), 1000, 120,
                        HUNYUAN15_TEXT),  # fmt: skip
    # SkyReels-V2-T2V-14B-720P: Wan2.1-14B's architecture, 1280x720, 121 frames: 31 x 45 x 80 = 111,600 tokens
    "skyreels-v2-14b": Bench("skyreels-v2-14b", "SkyReelsV2Transformer3DModel", WAN14B, (1, 16, 31, 90, 160), 512),
    # LTX-Video 1280x768, 161 frames: 21 x 24 x 40 = 20,160 tokens (the grid is given as arguments)
    "ltx-video": Bench("ltx-video", "LTXVideoTransformer3DModel", LTX, (1, 20160, 128), 128,
                       extra={"grid": (21, 24, 40)}),  # fmt: skip
    # Mochi-1 848x480, 163 frames: 28 x 30 x 53 = 44,520 tokens + 256 text (64 real)
    "mochi": Bench("mochi", "MochiTransformer3DModel", MOCHI, (1, 12, 28, 60, 106), 256, 64),
}
ALIASES = {"wan2.2-a14b": ["wan2.2-a14b-transformer", "wan2.2-a14b-transformer_2"]}

# --dry-run: the same families, tiny (a few layers, 4 heads, small video), on the CPU
TINY = {
    "wan-1.3b": Bench("wan-1.3b", "WanTransformer3DModel", {**WAN, "attention_head_dim": 32, "text_dim": 32,
                      "num_attention_heads": 4, "ffn_dim": 64, "num_layers": 2}, (1, 16, 4, 16, 20), 8),  # fmt: skip
    "wan-14b": Bench("wan-14b", "WanTransformer3DModel", {**WAN, "attention_head_dim": 32, "text_dim": 32,
                     "num_attention_heads": 4, "ffn_dim": 64, "num_layers": 3}, (1, 16, 4, 16, 16), 8),  # fmt: skip
    "hunyuan": Bench("hunyuan", "HunyuanVideoTransformer3DModel", {**HUNYUAN, "num_attention_heads": 4,
                     "attention_head_dim": 32, "num_layers": 1, "num_single_layers": 2, "num_refiner_layers": 1,
                     "text_embed_dim": 32, "pooled_projection_dim": 16, "rope_axes_dim": (8, 12, 12)},
                     (1, 16, 4, 16, 16), 24, 9),  # fmt: skip
    "cogvideox1.5": Bench("cogvideox1.5", "CogVideoXTransformer3DModel", {**COG15, "num_attention_heads": 4,
                          "attention_head_dim": 32, "num_layers": 2, "text_embed_dim": 32, "time_embed_dim": 16,
                          "max_text_seq_length": 10}, (1, 8, 16, 16, 20), 10),  # fmt: skip
    "wan2.2-a14b-transformer": Bench("wan2.2-a14b-transformer", "WanTransformer3DModel", {**WAN,
                                     "attention_head_dim": 32, "text_dim": 32, "num_attention_heads": 4, "ffn_dim": 64,
                                     "num_layers": 2}, (1, 16, 4, 16, 16), 8, seed=0),  # fmt: skip
    "wan2.2-a14b-transformer_2": Bench("wan2.2-a14b-transformer_2", "WanTransformer3DModel", {**WAN,
                                       "attention_head_dim": 32, "text_dim": 32, "num_attention_heads": 4,
                                       "ffn_dim": 64, "num_layers": 2}, (1, 16, 4, 16, 16), 8, seed=1),  # fmt: skip
    "hunyuan1.5": Bench("hunyuan1.5", "HunyuanVideo15Transformer3DModel", {**HUNYUAN15, "in_channels": 8,
                        "out_channels": 4, "num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 2,
                        "num_refiner_layers": 1, "text_embed_dim": 32, "text_embed_2_dim": 16, "image_embed_dim": 16,
                        "rope_axes_dim": (8, 12, 12)}, (1, 8, 4, 8, 8), 12, 5,
                        {"text_2": 6, "text_2_valid": 2, "image_tokens": 4}),  # fmt: skip
    "skyreels-v2-14b": Bench("skyreels-v2-14b", "SkyReelsV2Transformer3DModel", {**WAN, "attention_head_dim": 32,
                             "text_dim": 32, "num_attention_heads": 4, "ffn_dim": 64, "num_layers": 2},
                             (1, 16, 4, 16, 16), 8),  # fmt: skip
    "ltx-video": Bench("ltx-video", "LTXVideoTransformer3DModel", {**LTX, "in_channels": 8, "out_channels": 8,
                       "num_attention_heads": 4, "attention_head_dim": 32, "cross_attention_dim": 128, "num_layers": 2,
                       "caption_channels": 32}, (1, 4 * 8 * 8, 8), 8, extra={"grid": (4, 8, 8)}),  # fmt: skip
    "mochi": Bench("mochi", "MochiTransformer3DModel", {**MOCHI, "num_attention_heads": 4, "attention_head_dim": 32,
                   "num_layers": 2, "pooled_projection_dim": 16, "in_channels": 4, "text_embed_dim": 32,
                   "time_embed_dim": 16, "max_sequence_length": 12}, (1, 4, 4, 16, 16), 12, 5),  # fmt: skip
}


@contextlib.contextmanager
def parameters_on_meta():
    """Module parameters go to the meta device as they are registered; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@torch.no_grad()
def build(bench: Bench, device: torch.device, dtype: torch.dtype, seed: int | None = None):
    """The transformer with random weights: parameters built on meta, materialised on ``device``
    (``seed``: default the bench's)."""
    import diffusers

    seed = bench.seed if seed is None else seed
    cls = getattr(diffusers, bench.cls)
    with parameters_on_meta():
        model = cls(**bench.config)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{name}".split(".")
            kind = torch.float32 if keep & set(full) else dtype
            value = torch.empty(param.shape, device=device, dtype=kind)
            if param.dim() >= 2:
                value.normal_(0.0, param[0].numel() ** -0.5, generator=g)
            elif name == "bias":
                value.zero_()
            elif "scale_shift" in name:
                value.normal_(0.0, 0.02, generator=g)
            else:
                value.fill_(1.0)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device, torch.float32 if buf.dtype == torch.float64 else buf.dtype)
    return model.eval()


def make_inputs(bench: Bench, model, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    text_dim = bench.config.get("text_dim") or bench.config.get("text_embed_dim") or bench.config["caption_channels"]
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    inputs = dict(hidden_states=randn(*bench.latent), encoder_hidden_states=randn(1, bench.text, text_dim),
                  timestep=torch.tensor([999], device=device), return_dict=False)  # fmt: skip
    if bench.cls == "HunyuanVideo15Transformer3DModel":
        c, x = bench.config, bench.extra
        masks = [torch.arange(n, device=device)[None] < valid for n, valid in
                 ((bench.text, bench.text_valid), (x["text_2"], x["text_2_valid"]))]  # fmt: skip
        inputs.update(encoder_attention_mask=masks[0].long(), encoder_hidden_states_2=randn(1, x["text_2"], c["text_embed_2_dim"]),
                      encoder_attention_mask_2=masks[1].long(), timestep=inputs["timestep"].to(dtype),
                      image_embeds=torch.zeros(1, x["image_tokens"], c["image_embed_dim"], device=device, dtype=dtype))  # fmt: skip
    elif bench.cls.startswith("Hunyuan"):
        mask = torch.zeros(1, bench.text, dtype=torch.long, device=device)
        mask[:, : bench.text_valid] = 1
        inputs.update(encoder_attention_mask=mask, pooled_projections=randn(1, bench.config["pooled_projection_dim"]),
                      guidance=torch.tensor([6000.0], device=device), timestep=inputs["timestep"].to(dtype))  # fmt: skip
    elif bench.cls.startswith("Mochi"):
        mask = torch.arange(bench.text, device=device)[None] < bench.text_valid
        inputs.update(encoder_attention_mask=mask.long())
    elif bench.cls.startswith("LTX"):
        frames, height, width = bench.extra["grid"]
        inputs.update(encoder_attention_mask=torch.ones(1, bench.text, device=device, dtype=dtype), num_frames=frames,
                      height=height, width=width, timestep=inputs["timestep"].to(dtype))  # fmt: skip
    if bench.cls.startswith("CogVideoX"):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        c = bench.config
        frames, h, w = bench.latent[1] // c["patch_size_t"], bench.latent[3] // c["patch_size"], bench.latent[4] // c["patch_size"]
        base = (c["sample_height"] // c["patch_size"], c["sample_width"] // c["patch_size"])
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=c["attention_head_dim"], crops_coords=None, grid_size=(h, w), temporal_size=frames,
            grid_type="slice", max_size=base, device=device,
        )  # fmt: skip
    return inputs


def layout_of(bench: Bench, model, inputs) -> VideoLayout:
    """The self-attention layout of this input (video grid after patchify + text), for plan densities."""
    from sparse_vdit.integrations.diffusers import family_of

    family = family_of(model)
    f, h, w = family.latent_grid(model, inputs["hidden_states"], inputs)
    if family.text_position == "none":
        return VideoLayout(f, h, w)
    text, valid = bench.self_attention_text()
    valid = valid if valid is not None and valid < text else None
    return VideoLayout(f, h, w, text, family.text_position, valid)


# --- plans -------------------------------------------------------------------------------------


def mixed_plan(spec, layout: VideoLayout, density: float, block_size: int, skip_share: float = 0.05, seed: int = 0) -> Plan:
    """A plan of about ``density`` (computed blocks at ``layout``) mixing the five patterns.

    ``skip_share`` of all heads skip, ``max(0, density - 0.2) / 2`` are dense, the rest are split
    evenly between diagonal, multi-diagonal and vertical (first frame + band); one band scale for
    all of them is found by bisection.
    """
    total = spec.num_layers * spec.num_heads
    kinds = ["skip"] * round(skip_share * total) + ["dense"] * round(max(0.0, density - 0.2) / 2 * total)
    kinds += [("diagonal", "multi_diagonal", "vertical")[i % 3] for i in range(total - len(kinds))]
    random.Random(seed).shuffle(kinds)
    frames = layout.frames

    def plan_at(scale: float) -> Plan:
        made = {"skip": skip(), "dense": dense(), "diagonal": diagonal(scale * frames),
                "multi_diagonal": multi_diagonal(scale), "vertical": vertical(((0.0, 1.0),), 0.8 * scale * frames)}  # fmt: skip
        heads = [made[k] for k in kinds]
        layers = [heads[i * spec.num_heads : (i + 1) * spec.num_heads] for i in range(spec.num_layers)]
        return Plan.from_layers(spec, layers, block_size=block_size, layout=layout,
                                made_by={"method": "bench-mix", "target_density": density, "scale": scale})  # fmt: skip

    lo, hi = 0.0, 1.0
    for _ in range(24):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan_at(mid).density(layout) < density else (lo, mid)
    return plan_at((lo + hi) / 2)


def transformer_blocks(model) -> list:
    """The repeated transformer blocks (what diffusers' ``compile_repeated_blocks`` compiles)."""
    names = ("blocks", "transformer_blocks", "single_transformer_blocks")
    return [block for name in names for block in getattr(model, name, ())]


def compile_blocks(model, backend: str) -> None:
    """Regional compilation: every block compiled in place, whole-graph (CogVideoX lacks
    ``_repeated_blocks``, so ``compile_repeated_blocks`` cannot be used for all three)."""
    for block in transformer_blocks(model):
        block.compile(fullgraph=True, backend=backend)


def cudnn_first():
    """SDPA with cuDNN given priority (what a user selects; torch picks FlashAttention-2 otherwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def mode_names(parser: argparse.ArgumentParser, text: str | None, dry_run: bool) -> list[str]:
    """``--modes`` (comma-separated; default eager and compiled, eager only on a dry run) checked."""
    modes = [m.strip() for m in (text or ("eager" if dry_run else "eager,compiled")).split(",")]
    if set(modes) - {"eager", "compiled"}:
        parser.error("--modes takes eager and/or compiled")
    return modes


def model_names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--models`` (comma-separated) checked against :data:`MODELS`; ``wan2.2-a14b`` names both experts."""
    names = [n for m in text.split(",") if m.strip() for n in ALIASES.get(m.strip(), [m.strip()])]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    return names
