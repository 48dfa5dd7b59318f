"""Each family's rotary embedding as a :class:`~sparse_vdit.kernels.head_order.Rotary`'s parts, so the
processor can apply it in the fused pass that also permutes token-major heads (issue 21).

The families' ``project`` apply the rotary exactly as diffusers does when given the tables; here
the same tables are described for the kernel instead (which rows, which channel-pair rule), and
``project`` is called without them. A family not listed keeps its own rotary (no fusion).
"""

from __future__ import annotations

from typing import Any

import torch


# family name -> (pair rule, whether the rotated rows start after the text prefix)
_CONVENTIONS = {
    "wan": ("wan", False),  # WanAttnProcessor: cos[..., 0::2], sin[..., 1::2]; every token (no text)
    "hunyuan_video": ("interleaved", False),  # apply_rotary_emb on the video rows, text after them
    "cogvideox": ("interleaved", True),  # apply_rotary_emb on the rows after the text prefix
}


def fused_by_default(family_name: str) -> bool:
    """Whether a family's processor fuses its rotary into the permutation pass unless told otherwise:
    every family with a convention here. Measured (bench/processor_attention.py --sweep, H200, issue 21):
    with the pass's launch defaults the whole Triton call is faster fused on all four shapes (Wan-1.3B /
    Wan-14B / HunyuanVideo / CogVideoX1.5, multi-diagonal and mixed, 5-40%), and so is the dense call
    (FA4's fused call with these defaults: bench/gpu_session.sh's processor-default step)."""
    return family_name in _CONVENTIONS


def fusable(family_name: str, attn: Any, rotary: Any) -> bool:
    """Whether this call's rotary embedding can be applied by the fused pass."""
    if rotary is None or family_name not in _CONVENTIONS or getattr(attn, "is_cross_attention", False):
        return False
    return isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)


def rotary_parts(family_name: str, rotary: Any, text: int, head_dim: int, device: torch.device):
    """``(cos, sin, start, pairs)`` of a :class:`Rotary` for a call whose ``project`` ran without its
    tables (``text``: text tokens); plain tensors and constants, so a compiled graph passes them on."""
    pairs, after_text = _CONVENTIONS[family_name]
    cos, sin = (t.to(device).reshape(-1, head_dim) for t in rotary)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, text if after_text else 0, pairs
