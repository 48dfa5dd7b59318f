"""Tiny diffusers transformers of each family (built from config, CPU) and an independent oracle.

The oracle patches the attention *function* the stock diffusers processors call (not our
processor), so the model runs its own q/k/v/rotary/text code and only the attention becomes
per-head masked attention, with token masks from ``tests/helpers.py``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from helpers import masked_attention, token_mask
from sparse_vdit import VideoLayout, compile_layer

HEADS, HEAD_DIM, LAYERS, BLOCK = 4, 16, 2, 16
FRAMES, LATENT = 3, 8  # 3 frames of 8x8 latents -> 4x4 tokens per frame after (1|2, 2, 2) patchify


def _text_mask(batch, valid, text):
    """``[batch, text]`` long: sample ``b`` keeps its first ``valid[b % len(valid)]`` tokens."""
    return (torch.arange(text)[None] < torch.tensor([valid[b % len(valid)] for b in range(batch)])[:, None]).long()


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=LAYERS, rope_max_seq_len=32)  # fmt: skip


def wan(batch=2, seed=0, cls="WanTransformer3DModel", **config):
    """Wan2.1 / Wan2.2 A14B expert (and, by ``cls``, the Wan-architecture models)."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls)(**{**WAN_CONFIG, **config}).eval()
    g = _g()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=g),
        timestep=torch.full((batch,), 900.0),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        return_dict=False,
    )
    return model, inputs


def wan_ti2v(batch=2, seed=0):
    """Wan2.2 TI2V-5B: per-token timesteps ``(batch, tokens)`` (``expand_timesteps``)."""
    model, inputs = wan(batch, seed)
    inputs["timestep"] = torch.full((batch, FRAMES * 16), 900.0)
    inputs["timestep"][:, :16] = 0.0  # the conditioning first frame is clean
    return model, inputs


def wan_vace(batch=2, seed=0):
    model, inputs = wan(batch, seed, cls="WanVACETransformer3DModel", vace_layers=[0, 1], vace_in_channels=4)
    inputs["control_hidden_states"] = torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=_g(3))
    return model, inputs


def skyreels(batch=2, seed=0):
    return wan(batch, seed, cls="SkyReelsV2Transformer3DModel")


def hunyuan15(batch=2, valid=(3, 7), seed=0):
    """HunyuanVideo 1.5 (patch 1: 3 frames of 4x4 latents); text = 2 image + 3 ByT5 + 7 MLLM tokens."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
    ).eval()  # fmt: skip
    g = _g()
    mask = _text_mask(batch, valid, 7)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, FRAMES, 4, 4, generator=g),
        timestep=torch.full((batch,), 900.0),
        encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
        encoder_attention_mask=mask,
        encoder_hidden_states_2=torch.randn(batch, 3, 8, generator=g),
        encoder_attention_mask_2=torch.tensor([[1, 1, 0]] * batch),
        image_embeds=torch.zeros(batch, 2, 8),
        return_dict=False,
    )
    return model, inputs


def ltx(batch=2, seed=0):
    """LTX-Video: packed (batch, tokens, channels) latents, the grid as arguments."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        cross_attention_dim=HEADS * HEAD_DIM, num_layers=LAYERS, caption_channels=16,
    ).eval()  # fmt: skip
    g = _g()
    inputs = dict(
        hidden_states=torch.randn(batch, FRAMES * 16, 4, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
        timestep=torch.full((batch,), 900.0),
        encoder_attention_mask=torch.ones(batch, 5),
        num_frames=FRAMES, height=4, width=4,
        return_dict=False,
    )
    return model, inputs


def hunyuan(batch=2, valid=(3, 7), seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()  # fmt: skip
    g = _g()
    text = 7
    mask = _text_mask(batch, valid, text)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=g),
        timestep=torch.full((batch,), 900),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.full((batch,), 6000.0),
        return_dict=False,
    )
    return model, inputs


def cogvideox(batch=2, seed=0, version="1.5"):
    """CogVideoX 1.5 (rotary, temporal patch 2) or 1.0 (sinusoidal positions, no temporal patch)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(seed)
    rotary = version == "1.5"
    latent_frames = 2 * FRAMES if rotary else FRAMES
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=LAYERS, sample_width=LATENT, sample_height=LATENT,
        sample_frames=(latent_frames - 1) * 4 + 1, patch_size=2, patch_size_t=2 if rotary else None,
        max_text_seq_length=6, use_rotary_positional_embeddings=rotary, patch_bias=not rotary,
    ).eval()  # fmt: skip
    g = _g()
    inputs = dict(
        hidden_states=torch.randn(batch, latent_frames, 4, LATENT, LATENT, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
        timestep=torch.full((batch,), 900),
        return_dict=False,
    )
    if rotary:
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=HEAD_DIM, crops_coords=None, grid_size=(4, 4), temporal_size=FRAMES, grid_type="slice",
            max_size=(4, 4), device="cpu",
        )  # fmt: skip
    return model, inputs


def mochi(batch=2, valid=(3, 7), seed=0):
    """Mochi: joint attention, text a padded suffix (the processor attends each sample's real tokens)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS,
        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=7,
    ).eval()  # fmt: skip
    g = _g()
    mask = _text_mask(batch, valid, 7)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, 16, generator=g),
        timestep=torch.full((batch,), 900),
        encoder_attention_mask=mask,
        return_dict=False,
    )
    return model, inputs


BUILDERS = {"wan": wan, "hunyuan_video": hunyuan, "cogvideox": cogvideox, "cogvideox1.0": lambda **kw: cogvideox(version="1.0", **kw),
            "wan2.2-ti2v": wan_ti2v, "wan-vace": wan_vace, "skyreels_v2": skyreels, "hunyuan_video15": hunyuan15,
            "ltx_video": ltx, "mochi": mochi}  # fmt: skip
TEXT_POSITION = {"hunyuan_video": "suffix", "hunyuan_video15": "suffix", "mochi": "suffix", "cogvideox": "prefix", "cogvideox1.0": "prefix"}
# the diffusers module whose dispatch_attention_fn each model's self-attention calls (the oracle patches it)
DISPATCH = {"wan": "transformer_wan", "wan2.2-ti2v": "transformer_wan", "wan-vace": "transformer_wan",
            "skyreels_v2": "transformer_skyreels_v2", "hunyuan_video": "transformer_hunyuan_video",
            "hunyuan_video15": "transformer_hunyuan_video15", "ltx_video": "transformer_ltx"}  # fmt: skip


def video_layout(name: str, text: int) -> VideoLayout:
    return VideoLayout(FRAMES, 4, 4, text, TEXT_POSITION.get(name, "none") if text else "none")


def _masked(q, k, v, layout, patterns, valid):
    """(B, N, H, D) attention, each head with its token mask, each sample with its text padding."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        sample = layout if valid is None or valid[b] == layout.text else layout.with_text_valid(valid[b])
        table = compile_layer(patterns, sample, BLOCK)
        for h in range(q.shape[2]):
            mask = token_mask(table, h).to(q.device)
            out[b, :, h] = masked_attention(q[b : b + 1, :, h], k[b : b + 1, :, h], v[b : b + 1, :, h], mask, q.shape[-1] ** -0.5)[0]
    return out.to(q.dtype)


SAMPLE_LOOP = {"mochi"}  # processors that attend sample by sample (one attention call per sample)


@contextmanager
def oracle(name: str, patterns_by_layer, batch: int = 2):
    """Run the *unpatched* model with per-head masked attention in its self-attention layers;
    ``calls["n"]``: self-attention layer calls seen."""
    import importlib

    import pytest

    calls = {"n": 0}
    layers = len(patterns_by_layer)
    per_layer = batch if name in SAMPLE_LOOP else 1
    raw = {"n": 0}

    def next_layer():
        layer = (raw["n"] // per_layer) % layers
        raw["n"] += 1
        calls["n"] = raw["n"] // per_layer
        return patterns_by_layer[layer]

    with pytest.MonkeyPatch.context() as monkeypatch:
        if name in DISPATCH:
            module = importlib.import_module(f"diffusers.models.transformers.{DISPATCH[name]}")
            original = module.dispatch_attention_fn

            def dispatch(query, key, value, attn_mask=None, **kwargs):
                video = FRAMES * 16
                if TEXT_POSITION.get(name) is None:
                    if key.shape[1] != query.shape[1] or attn_mask is not None:  # cross-attention
                        return original(query, key, value, attn_mask=attn_mask, **kwargs)
                    return _masked(query, key, value, video_layout(name, 0), next_layer(), None)
                text = query.shape[1] - video
                keep = attn_mask.reshape(query.shape[0], -1, query.shape[1])[:, 0]  # [B, 1, 1, N] or [B, 1, N, N]: a video row
                valid = keep[:, video:].sum(-1).tolist()
                return _masked(query, key, value, video_layout(name, text), next_layer(), valid)

            monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)
        else:
            original_sdpa = torch.nn.functional.scaled_dot_product_attention

            def sdpa(query, key, value, attn_mask=None, **kwargs):
                if query.shape[2] < FRAMES * 16:  # Mochi's text pooling
                    return original_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)
                q, k, v = (t.transpose(1, 2) for t in (query, key, value))
                text = q.shape[1] - FRAMES * 16
                return _masked(q, k, v, video_layout(name, text), next_layer(), None).transpose(1, 2)

            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        yield calls


def undo_compile(model) -> None:
    """Clean up after a test that ran ``compile_repeated_blocks`` on a patched tiny model: the
    blocks uncompiled, sparse-vdit removed, dynamo's caches reset."""
    import torch._dynamo

    import sparse_vdit

    for block in model.blocks:
        block._compiled_call_impl = None
    sparse_vdit.remove(model)
    torch._dynamo.reset()
