"""The organism: a small Wan video DiT trained here on procedural captioned videos.

``data`` (the video generator and caption vocabulary) needs only torch and numpy; ``model`` and
``train`` need diffusers and are imported on first use of their names.
"""

from .data import Scene, VideoDataset, Vocabulary, make_batch, render, sample_scene

_MODEL = (
    "OrganismSpec",
    "build_organism",
    "decode_video",
    "encode_video",
    "load_organism",
    "load_spec",
    "organism_config",
    "sample",
    "save_organism",
    "to_dtype",
)

__all__ = ["Scene", "VideoDataset", "Vocabulary", "make_batch", "render", "sample_scene", *_MODEL]


def __getattr__(name):
    if name in _MODEL:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
