"""Sparse VideoGen's choices as its reference code makes them (svg-project/Sparse-VideoGen).

Each rule below names the file and function of the reference it follows (read at commits
19c2662a / 3ffe25f4 of that repository). ``F`` frames, ``S`` tokens a frame, positions counted
in a head's own order (frame-major, or token-major for temporal heads; text never moves):

- **Executed mask** (one FlexAttention mask for every head after the layout transformation;
  ``svg/models/wan/utils.py::generate_temporal_head_mask_mod``): Wan keeps a pair when
  ``|q - k| <= ceil(w * S / 128) * 128`` or ``k < S`` (the "first frame sink", in the head's own
  order); HunyuanVideo (``svg/models/hyvideo/utils.py``) and CogVideoX (``svg/models/cog/utils.py``)
  when ``|q - k| < floor(w * S / 128) * 128``, or the row or the column is (real) text; no sink
  (CogVideoX's ``attn_sink`` is off by default).
- **Width** ``w`` in frames from the density (``sparsity_to_width``, the same in every family):
  ``w = N (1 - sqrt(1 - (d N^2 - 2 N T) / N^2)) / S`` with ``N = T + F S`` and ``T`` the text
  tokens (``context_length``: 0 on Wan, 256 on HunyuanVideo). Their ``sparsity`` argument is
  the computed share ``d`` (0.25 in their scripts).
- **Profile masks** (``get_attention_mask``): a band of 128-token blocks, ``|i - j| < floor(c S /
  128)`` with ``c = 2`` on Wan (plus the same first-frame sink) and ``c = 1.5`` on HunyuanVideo
  (plus every text row and column); built in frame-major order for the spatial mask and in
  token-major order for the temporal one. CogVideoX's are loaded from files the repository does
  not ship: the HunyuanVideo rule stands in (ours).
- **Rows** (``sample_mse``): ``torch.randint(0, sample_mse_max_row, (64,))``: 64 rows drawn *with
  replacement* from the first 10,000 positions (``--num_sampled_rows 64``,
  ``--sample_mse_max_row 10000``).
- **Choice**: the mean squared error of the sampled rows' outputs per mask, per (batch sample,
  head); ``argmin`` (a tie goes to spatial).

Where we differ, and why: the errors are computed in float32 (theirs in the inputs' dtype,
bf16); padded text keys are left out of the exact rows as the model masks them (their
``sample_mse`` attends to them on HunyuanVideo); rows are seeded by ``(seed, step, layer)`` (theirs
come from the global generator); the sink of a table ends on a block boundary (up to ``block - 1``
keys more than the first frame, in the executed and profile masks alike); their 128-token rounding
uses the table's block (128 by default); a band the reference rounds to nothing still keeps each
query's own block.
- **Dense warm-up** (``wan_t2v_inference.py``; the scripts under ``scripts/``): the first
  ``floor(first_times_fp * steps)`` steps and ``floor(first_layers_fp * layers)`` layers run dense
  (``attention_core_logic``'s ``full_attention_flag``, their only fallback). Wan T2V 0.3 / 0.03,
  Wan I2V 0.35 / 0.03 (density 0.3), HunyuanVideo T2V 0.1 / 0.03.

Our tables are block tables: the executed mask is covered by the key blocks holding at least
one kept pair (every reference pair is computed; a few more are), the profile masks exactly
(they are block masks already) when the video starts on a block boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import VideoLayout
from ..patterns import Pattern, spatial, temporal, with_sink

REFERENCE_BLOCK = 128  # the reference's block (its masks' rounding unit); ours is the table's


@dataclass(frozen=True)
class ReferenceConfig:
    """One model/task's settings in the reference code (see the module docstring for sources)."""

    warmup_step_fraction: float  # first_times_fp
    warmup_layer_fraction: float  # first_layers_fp
    density: float  # their "sparsity"
    profile_frames: float  # block_thres = frame_size * profile_frames
    sink: bool  # kv < token_per_frame in the executed and profile masks
    inclusive: bool  # |q - k| <= band (Wan, rounded up) or < band (rounded down)
    sampled_rows: int = 64
    max_row: int = 10_000

    def band_tokens(self, layout: VideoLayout, density: float | None = None, block: int = REFERENCE_BLOCK) -> int:
        """Largest ``|q - k|`` the executed mask keeps (own order); -1 if none."""
        d = self.density if density is None else density
        context = 0 if self.sink else layout.text  # Wan passes context_length = 0
        mul = sparsity_to_width(d, context, layout.frames, layout.frame_tokens)
        if self.inclusive:
            return math.ceil(mul * layout.frame_tokens / block) * block
        return math.floor(mul * layout.frame_tokens / block) * block - 1

    def profile_blocks(self, layout: VideoLayout, block: int = REFERENCE_BLOCK) -> int:
        """``K``: the profile masks keep blocks ``|i - j| < K``."""
        return int(self.profile_frames * layout.frame_tokens // block)

    def warmup_steps(self, num_steps: int) -> int:
        return math.floor(self.warmup_step_fraction * num_steps)

    def warmup_layers(self, num_layers: int) -> int:
        return math.floor(self.warmup_layer_fraction * num_layers)


WAN_T2V = ReferenceConfig(0.3, 0.03, 0.25, 2.0, sink=True, inclusive=True)
WAN_I2V = ReferenceConfig(0.35, 0.03, 0.3, 2.0, sink=True, inclusive=True)
HUNYUAN_T2V = ReferenceConfig(0.1, 0.03, 0.25, 1.5, sink=False, inclusive=False)
CONFIGS = {("wan", "t2v"): WAN_T2V, ("wan", "i2v"): WAN_I2V, ("hunyuan_video", "t2v"): HUNYUAN_T2V,
           ("hunyuan_video", "i2v"): HUNYUAN_T2V, ("cogvideox", "t2v"): HUNYUAN_T2V,
           ("cogvideox", "i2v"): HUNYUAN_T2V}  # fmt: skip
_FAMILY_BY_TEXT = {"none": "wan", "suffix": "hunyuan_video", "prefix": "cogvideox"}


def reference_config(family: str | None, name: str | None, layout: VideoLayout) -> ReferenceConfig:
    """The reference's settings for a model (family and name from its ModelSpec, if known);
    without them, or for a family the reference has none for (SkyReels-V2, LTX-Video, Mochi,
    HunyuanVideo 1.5), the family follows the layout (no text: Wan; text suffix: HunyuanVideo)."""
    task = "i2v" if name and "i2v" in name.lower() else "t2v"
    if (family, task) not in CONFIGS:
        family = _FAMILY_BY_TEXT[layout.text_position]
    return CONFIGS[(family, task)]


def sparsity_to_width(density: float, context: int, frames: int, frame_tokens: int) -> float:
    """The reference's ``sparsity_to_width``: band width in frames for a computed share ``density``."""
    seq = context + frames * frame_tokens
    share = (density * seq**2 - 2 * seq * context) / seq**2
    return seq * (1 - math.sqrt(1 - min(max(share, 0.0), 1.0))) / frame_tokens


def _cover(max_distance: int, layout: VideoLayout, block: int) -> tuple[float, float]:
    """(spatial frames, temporal fraction) of bands holding exactly the key blocks with a key within
    ``max_distance`` tokens of a query of the block: blocks ``d`` apart have tokens ``d * block -
    block + 1`` apart at least (a ragged last block only ends early), so ``d <= (max_distance +
    block - 1) // block``; their centres lie ``d * block`` apart (a ragged one up to
    ``(block - 1) / 2`` less), hence the quarter block of slack."""
    blocks = (max_distance + block - 1) // block
    half = blocks * block + block / 4 if max_distance >= 0 else 0.0
    return half / layout.frame_tokens, half / layout.video_tokens


def executed_patterns(config: ReferenceConfig, layout: VideoLayout, density: float, block: int) -> tuple[Pattern, Pattern]:
    """(spatial, temporal) patterns whose tables cover the reference's executed mask at ``density``.

    The band is rounded with the table's ``block`` where the reference rounds with 128.
    """
    ws, wt = _cover(config.band_tokens(layout, density, block), layout, block)
    s, t = spatial(ws), temporal(min(wt, 1.0))
    return (with_sink(s), with_sink(t)) if config.sink else (s, t)


def profile_patterns(config: ReferenceConfig, layout: VideoLayout, block: int) -> tuple[Pattern, Pattern]:
    """(spatial, temporal) patterns equal to the reference's profile masks (``|i - j| < K`` blocks
    of the head's order, plus the sink on Wan) when the video starts on a block boundary."""
    k = max(config.profile_blocks(layout, block), 1)  # K = 0 (a frame under half a block) keeps the own block
    half = (k - 0.5) * block  # centres of blocks K apart are K * block apart (a ragged one: > -64)
    s, t = spatial(half / layout.frame_tokens), temporal(min(half / layout.video_tokens, 1.0))
    return (with_sink(s), with_sink(t)) if config.sink else (s, t)


def reference_rows(layout: VideoLayout, count: int, max_row: int, step: int, layer: int, seed: int = 0) -> torch.Tensor:
    """``count`` sequence positions drawn with replacement from ``[0, min(max_row, tokens))``
    (int64, CPU), as the reference's ``sample_mse``; seeded by ``(seed, step, layer)`` where the
    reference uses the global generator."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + layer)
    return torch.randint(0, min(max_row, layout.num_tokens), (count,), generator=g)


__all__ = ["CONFIGS", "HUNYUAN_T2V", "REFERENCE_BLOCK", "ReferenceConfig", "WAN_I2V", "WAN_T2V", "executed_patterns",
           "profile_patterns", "reference_config", "reference_rows", "sparsity_to_width"]  # fmt: skip
