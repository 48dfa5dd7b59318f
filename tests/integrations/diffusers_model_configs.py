"""diffusers' own tiny model-test configs, one per supported family (issue #17).

Each :class:`Case` holds the ``get_init_dict()`` / ``get_dummy_inputs()`` facts of the family's
test in diffusers' ``tests/models/transformers/test_models_transformer_*.py`` (main branch,
read 2026-12; written here, not copied): the same config and input shapes, with one change where
diffusers' head size is one our kernels refuse at ``apply`` (a multiple of 8 from 8 to 256): Wan,
SkyReels-V2 and Wan VACE use ``attention_head_dim=12``, HunyuanVideo ``10`` (its ``rope_axes_dim``
``(2, 4, 4)`` then ``(4, 6, 6)``, which must sum to the head size); here they are 16. Inputs are
seeded, so every call of ``inputs()`` gives the same tensors (diffusers' contract for its mixin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _timestep(batch: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Case:
    """One family's diffusers test config: model class name, init dict, inputs, per-sample output shape."""

    model_class: str
    init: dict[str, Any]
    make_inputs: Callable[[], dict[str, Any]]
    output_shape: tuple[int, ...]
    diffusers_test: str  # the diffusers test module it comes from
    changed: dict[str, Any] = field(default_factory=dict)  # diffusers' values we changed (see the module docstring)

    def cls(self):
        import diffusers

        return getattr(diffusers, self.model_class)

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.cls()(**self.init)

    def inputs(self) -> dict[str, Any]:
        return self.make_inputs()


_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32)  # fmt: skip


def _wan_inputs(frames: int) -> Callable[[], dict[str, Any]]:
    def inputs():
        return dict(hidden_states=_randn(1, 4, frames, 16, 16, seed=0), encoder_hidden_states=_randn(1, 12, 16, seed=1),
                    timestep=_timestep(1))  # fmt: skip

    return inputs


def _vace_inputs():
    return dict(hidden_states=_randn(1, 16, 2, 16, 16, seed=0), encoder_hidden_states=_randn(1, 12, 32, seed=1),
                control_hidden_states=_randn(1, 48, 2, 16, 16, seed=2), timestep=_timestep(1))  # fmt: skip


def _hunyuan_inputs():
    return dict(hidden_states=_randn(1, 4, 1, 16, 16, seed=0), timestep=_timestep(1).float(),
                encoder_hidden_states=_randn(1, 12, 16, seed=1), pooled_projections=_randn(1, 8, seed=2),
                encoder_attention_mask=torch.ones(1, 12), guidance=_timestep(1, seed=8).float())  # fmt: skip


def _hunyuan15_inputs():
    return dict(hidden_states=_randn(1, 4, 1, 8, 8, seed=0), timestep=torch.tensor([1.0]),
                encoder_hidden_states=_randn(1, 6, 16, seed=1), encoder_hidden_states_2=_randn(1, 4, 8, seed=2),
                encoder_attention_mask=torch.ones(1, 6), encoder_attention_mask_2=torch.ones(1, 4),
                image_embeds=torch.zeros(1, 3, 12))  # fmt: skip


def _cogvideox_inputs(frames: int) -> Callable[[], dict[str, Any]]:
    def inputs():
        return dict(hidden_states=_randn(2, frames, 4, 8, 8, seed=0), encoder_hidden_states=_randn(2, 8, 8, seed=1),
                    timestep=_timestep(2))  # fmt: skip

    return inputs


_COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                  text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=8)  # fmt: skip


def _mochi_inputs():
    return dict(hidden_states=_randn(2, 4, 2, 16, 16, seed=0), encoder_hidden_states=_randn(2, 16, 16, seed=1),
                timestep=_timestep(2), encoder_attention_mask=torch.ones(2, 16, dtype=torch.bool))  # fmt: skip


def _ltx_inputs():
    return dict(hidden_states=_randn(2, 2 * 16 * 16, 4, seed=0), encoder_hidden_states=_randn(2, 16, 16, seed=1),
                timestep=_timestep(2), encoder_attention_mask=torch.ones(2, 16, dtype=torch.bool), num_frames=2,
                height=16, width=16)  # fmt: skip


CASES: dict[str, Case] = {
    "wan": Case("WanTransformer3DModel", _WAN, _wan_inputs(2), (4, 2, 16, 16), "test_models_transformer_wan.py",
                {"attention_head_dim": 12}),
    "wan_vace": Case("WanVACETransformer3DModel",
                     {**_WAN, "in_channels": 16, "out_channels": 16, "text_dim": 32, "num_layers": 4, "vace_layers": [0, 2],
                      "vace_in_channels": 48},
                     _vace_inputs, (16, 2, 16, 16), "test_models_transformer_wan_vace.py", {"attention_head_dim": 12}),
    "skyreels_v2": Case("SkyReelsV2Transformer3DModel", _WAN, _wan_inputs(1), (4, 1, 16, 16),
                        "test_models_transformer_skyreels_v2.py", {"attention_head_dim": 12}),
    "hunyuan_video": Case("HunyuanVideoTransformer3DModel",
                          dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                               num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                               text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None),
                          _hunyuan_inputs, (4, 1, 16, 16), "test_models_transformer_hunyuan_video.py",
                          {"attention_head_dim": 10, "rope_axes_dim": (2, 4, 4)}),
    "hunyuan_video15": Case("HunyuanVideo15Transformer3DModel",
                            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                 num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                 text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16,
                                 task_type="t2v"),
                            _hunyuan15_inputs, (4, 1, 8, 8), "test_models_transformer_hunyuan_1_5.py"),
    "cogvideox": Case("CogVideoXTransformer3DModel", _COGVIDEOX, _cogvideox_inputs(1), (1, 4, 8, 8),
                      "test_models_transformer_cogvideox.py (CogVideoXTransformerTests)"),
    "cogvideox1.5": Case("CogVideoXTransformer3DModel",
                         {**_COGVIDEOX, "num_layers": 2, "patch_size_t": 2, "use_rotary_positional_embeddings": True},
                         _cogvideox_inputs(2), (2, 4, 8, 8), "test_models_transformer_cogvideox.py (CogVideoX1_5TransformerTests)",
                         {"output_shape": (1, 4, 8, 8)}),  # diffusers' value; its test_output assert cannot fail
    "mochi": Case("MochiTransformer3DModel",
                  dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                       in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                       activation_fn="swiglu", max_sequence_length=16),
                  _mochi_inputs, (4, 2, 16, 16), "test_models_transformer_mochi.py"),
    "ltx_video": Case("LTXVideoTransformer3DModel",
                      dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                           num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16),
                      _ltx_inputs, (512, 4), "test_models_transformer_ltx.py"),
}  # fmt: skip
