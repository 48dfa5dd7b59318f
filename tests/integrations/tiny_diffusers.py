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


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


def wan(batch=2, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=LAYERS, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    g = _g()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=g),
        timestep=torch.full((batch,), 900.0),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
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
    mask = torch.zeros(batch, text, dtype=torch.long)
    for b in range(batch):
        mask[b, : valid[b % len(valid)]] = 1
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


BUILDERS = {"wan": wan, "hunyuan_video": hunyuan, "cogvideox": cogvideox, "cogvideox1.0": lambda **kw: cogvideox(version="1.0", **kw)}


def video_layout(name: str, text: int) -> VideoLayout:
    position = {"wan": "none", "hunyuan_video": "suffix"}.get(name, "prefix")
    return VideoLayout(FRAMES, 4, 4, text, position if text else "none")


def _masked(q, k, v, layout, patterns, valid):
    """(B, N, H, D) attention, each head with its token mask, each sample with its text padding."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        sample = layout if valid is None or valid[b] == layout.text else layout.with_text_valid(valid[b])
        table = compile_layer(patterns, sample, BLOCK)
        for h in range(q.shape[2]):
            mask = token_mask(table, h)
            out[b, :, h] = masked_attention(q[b : b + 1, :, h], k[b : b + 1, :, h], v[b : b + 1, :, h], mask, q.shape[-1] ** -0.5)[0]
    return out.to(q.dtype)


@contextmanager
def oracle(name: str, patterns_by_layer):
    """Run the *unpatched* model with per-head masked attention in its self-attention layers."""
    import pytest
    from diffusers.models.transformers import transformer_hunyuan_video, transformer_wan

    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _patch(name, patterns_by_layer, monkeypatch, transformer_wan, transformer_hunyuan_video)


def _patch(name, patterns_by_layer, monkeypatch, transformer_wan, transformer_hunyuan_video):
    calls = {"n": 0}
    layers = len(patterns_by_layer)

    def next_layer():
        layer = calls["n"] % layers
        calls["n"] += 1
        return patterns_by_layer[layer]

    if name == "wan":
        original = transformer_wan.dispatch_attention_fn

        def dispatch(query, key, value, attn_mask=None, **kwargs):
            if key.shape[1] != query.shape[1]:  # cross-attention
                return original(query, key, value, attn_mask=attn_mask, **kwargs)
            return _masked(query, key, value, video_layout(name, 0), next_layer(), None)

        monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", dispatch)
    elif name == "hunyuan_video":

        def dispatch(query, key, value, attn_mask=None, **kwargs):
            video = FRAMES * 16
            text = query.shape[1] - video
            valid = attn_mask.reshape(query.shape[0], -1)[:, video:].sum(-1).tolist()
            return _masked(query, key, value, video_layout(name, text), next_layer(), valid)

        monkeypatch.setattr(transformer_hunyuan_video, "dispatch_attention_fn", dispatch)
    else:

        def sdpa(query, key, value, attn_mask=None, **kwargs):
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
