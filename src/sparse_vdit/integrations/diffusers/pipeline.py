"""Loading a diffusers pipeline from a local folder or the Hugging Face cache (never the network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class PipelineLoadError(ValueError):
    """A model folder or name that no local pipeline can be loaded from."""


def load_pipeline(model: str, dtype: torch.dtype, device: str, text_encoders: bool = True):
    """``DiffusionPipeline.from_pretrained`` from a local folder or the hub cache, never the network.

    Without ``text_encoders`` the tokenizers and text encoders are not loaded (prompt embeddings
    are given instead).
    """
    import diffusers
    from diffusers import DiffusionPipeline

    # diffusers 0.42 renamed `torch_dtype` to `dtype`
    new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42)
    kwargs: dict[str, Any] = {"dtype" if new else "torch_dtype": dtype, "local_files_only": True}
    try:
        if not text_encoders:
            config = DiffusionPipeline.load_config(model, local_files_only=True)
            kwargs.update({k: None for k in config if k.startswith(("text_encoder", "tokenizer"))})
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        if Path(model).exists():
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PipelineLoadError(f"cannot load a diffusers pipeline from {model}: {cause}") from None
        from huggingface_hub.constants import HF_HUB_CACHE

        raise PipelineLoadError(
            f"{model!r} is neither a local folder nor in the Hugging Face cache ({HF_HUB_CACHE}); "
            f"download it first (`hf download {model}`) or pass a folder"
        ) from None
    return pipe.to(device)
