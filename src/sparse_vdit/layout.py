"""How a self-attention sequence is laid out: video tokens (frame-major) plus optional text."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

TEXT_POSITIONS = ("none", "prefix", "suffix")


@dataclass(frozen=True)
class VideoLayout:
    """`frames x height x width` video tokens in frame-major order, plus text tokens.

    Video token ``i = f * S + p`` with ``S = height * width`` and ``p = y * width + x``.
    Text tokens sit before (``"prefix"``, CogVideoX) or after (``"suffix"``, HunyuanVideo) the
    video tokens, or there are none (``"none"``, Wan self-attention). ``text_valid`` is the number
    of real text tokens of a padded prompt; padding is always at the end of the text, and padded
    text tokens are never attended to as keys (the model masks them).
    """

    frames: int
    height: int
    width: int
    text: int = 0
    text_position: str = "none"
    text_valid: int | None = None

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoLayout.{name} must be a positive int, got {value!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if not isinstance(self.text, int) or self.text < 0:
            raise ValueError(f"VideoLayout.text must be a non-negative int, got {self.text!r}")
        if (self.text > 0) != (self.text_position != "none"):
            raise ValueError(
                f"text={self.text} with text_position={self.text_position!r}: text tokens need "
                "'prefix' or 'suffix', and 'none' needs text=0"
            )
        if self.text_valid is not None:
            if not 0 <= self.text_valid <= self.text:
                raise ValueError(f"text_valid={self.text_valid} must lie in [0, text={self.text}]")
            if self.text_valid < self.text and self.text_position != "suffix":
                raise ValueError("padded text (text_valid < text) is only supported for a text suffix")

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame, ``S = height * width``."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.frame_tokens

    @property
    def num_tokens(self) -> int:
        """Length of the whole sequence (video and text, padding included)."""
        return self.video_tokens + self.text

    @property
    def video_start(self) -> int:
        """Sequence position of the first video token."""
        return self.text if self.text_position == "prefix" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text_position == "prefix" else self.video_tokens

    @property
    def kv_len(self) -> int:
        """Keys that take part in attention: padded text tokens at the end are left out."""
        pad = 0 if self.text_valid is None else self.text - self.text_valid
        return self.num_tokens - pad

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (``VideoLayout(**d)`` builds it back)."""
        return {
            "frames": self.frames,
            "height": self.height,
            "width": self.width,
            "text": self.text,
            "text_position": self.text_position,
            "text_valid": self.text_valid,
        }

    def with_text_valid(self, text_valid: int | None) -> VideoLayout:
        return VideoLayout(self.frames, self.height, self.width, self.text, self.text_position, text_valid)

    def token_major_order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sequence permutation ``perm`` with ``x_token_major = x[:, perm]``.

        Video tokens go from frame-major ``f * S + p`` to token-major ``p * F + f``; text stays.
        The inverse is :meth:`frame_major_order`.
        """
        return _orders(self, True, torch.device(device))

    def frame_major_order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Inverse of :meth:`token_major_order`: ``x = x_token_major[:, inverse]``."""
        return _orders(self, False, torch.device(device))

    def describe(self) -> str:
        text = "" if self.text == 0 else f" + {self.text} text ({self.text_position}"
        if self.text and self.text_valid is not None and self.text_valid < self.text:
            text += f", {self.text_valid} valid"
        text += ")" if self.text else ""
        return f"{self.frames}x{self.height}x{self.width} = {self.video_tokens} video tokens{text}"


@lru_cache(maxsize=64)
def _orders(layout: VideoLayout, token_major: bool, device: torch.device) -> torch.Tensor:
    """The permutation, built once per layout and device (callers must not write into it)."""
    if device.type != "cpu":
        return _orders(layout, token_major, torch.device("cpu")).to(device)
    f, s = layout.frames, layout.frame_tokens
    # position j of the token-major video sequence holds frame-major token p*F+f -> f*S+p
    j = torch.arange(layout.video_tokens)
    source = (j % f) * s + j // f
    perm = torch.arange(layout.num_tokens)
    start = layout.video_start
    perm[start : start + layout.video_tokens] = source + start
    if token_major:
        return perm
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(layout.num_tokens)
    return inverse
