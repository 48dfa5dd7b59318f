"""The fidelity organism's texture detail (organism/detail.py): deterministic, moving with what it
textures, and invisible to captions."""

import dataclasses

import numpy as np
import torch

from sparse_vdit.organism import data as D
from sparse_vdit.organism.detail import OBJECT_CELLS, sample_detail

torch.set_num_threads(1)
FRAMES, HEIGHT, WIDTH = 6, 48, 64  # a small wide video, as the fidelity spec is wide
ASPECT = WIDTH / HEIGHT


def render(scenes, detail: float) -> torch.Tensor:
    return D.render(D.scene_params(scenes, FRAMES, detail), HEIGHT, WIDTH)


def test_detail_is_deterministic_for_a_seed_and_differs_between_scenes():
    a, b = sample_detail(5, 3, objects=2, aspect=ASPECT), sample_detail(5, 3, objects=2, aspect=ASPECT)
    for field in ("background", "background_coarse", "objects"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.objects.shape == (2, 3, OBJECT_CELLS, OBJECT_CELLS)
    assert not np.array_equal(a.background, sample_detail(5, 4, 2, ASPECT).background)
    assert not np.array_equal(a.background, sample_detail(6, 3, 2, ASPECT).background)
    one = D.make_batch(11, 3, frames=FRAMES, height=HEIGHT, width=WIDTH, detail=0.3)
    two = D.make_batch(11, 3, frames=FRAMES, height=HEIGHT, width=WIDTH, detail=0.3)
    assert torch.equal(one.videos, two.videos)


def test_captions_and_scenes_are_unchanged_by_detail():
    for i in range(40):
        plain = D.sample_scene(2, i, FRAMES, ASPECT)
        textured = D.sample_scene(2, i, FRAMES, ASPECT, detail=True)
        assert plain.detail is None and textured.detail is not None
        assert textured.caption == plain.caption
        assert np.array_equal(textured.bg_offsets, plain.bg_offsets)
        assert all(np.array_equal(p.positions, t.positions) for p, t in zip(plain.objects, textured.objects))
    plain = D.make_batch(2, 4, frames=FRAMES, height=HEIGHT, width=WIDTH)
    textured = D.make_batch(2, 4, frames=FRAMES, height=HEIGHT, width=WIDTH, detail=0.3)
    assert textured.captions == plain.captions
    assert not torch.equal(textured.videos, plain.videos)  # the texture is there


def test_a_still_background_is_identical_across_frames_and_textured():
    still = next(s for s in (D.sample_scene(9, i, FRAMES, ASPECT, detail=True) for i in range(200))
                 if s.bg_motion == "still")  # fmt: skip
    empty = dataclasses.replace(still, objects=())  # the background alone
    video = render([empty], 0.3)[0]
    assert torch.equal(video, video[:1].expand_as(video))  # no frame differs
    flat = render([empty], 0.0)[0]
    assert (video - flat).abs().mean() > 0.02  # the detail is visible, not a rounding error


def test_a_panning_background_texture_moves_with_the_camera():
    pan = next(s for s in (D.sample_scene(9, i, FRAMES, ASPECT, detail=True) for i in range(200))
               if s.bg_motion == "pans" and s.bg_direction in ("left", "right"))  # fmt: skip
    video = render([dataclasses.replace(pan, objects=())], 0.3)[0]
    assert not torch.equal(video[0], video[-1])
    shift = (pan.bg_offsets[-1, 0] - pan.bg_offsets[0, 0]) * HEIGHT  # pixels the pattern moved
    dx = int(round(shift))
    first, last = video[0], video[-1]
    moved = last[..., max(dx, 0) : WIDTH + min(dx, 0)]
    source = first[..., max(-dx, 0) : WIDTH + min(-dx, 0)]
    # the last frame is the first shifted by the pan (to within the sub-pixel part of the shift)
    assert (moved - source).abs().mean() < 0.5 * (last - first).abs().mean()
