import numpy as np
import pytest
import torch

from sparse_vdit.organism import data as D

SCENES = [D.sample_scene(3, i) for i in range(300)]


def test_batches_are_deterministic_by_seed_and_independent_of_batching():
    a, b = D.make_batch(7, 4), D.make_batch(7, 4)
    assert torch.equal(a.videos, b.videos) and a.captions == b.captions
    tail = D.make_batch(7, 2, start=2)
    assert torch.equal(tail.videos, a.videos[2:]) and tail.captions == a.captions[2:]
    other = D.make_batch(8, 4)
    assert not torch.equal(other.videos, a.videos)
    assert other.captions != a.captions


def test_video_shape_dtype_and_range():
    b = D.make_batch(0, 3)
    assert b.videos.shape == (3, D.FRAMES, 3, D.HEIGHT, D.WIDTH)
    assert b.videos.dtype == torch.float32
    assert b.videos.min() >= -1 and b.videos.max() <= 1
    assert b.videos.std() > 0.1  # not blank
    assert not torch.equal(b.videos[:, 0], b.videos[:, -1])  # something moves
    small = D.make_batch(0, 2, frames=5, height=32, width=48)
    assert small.videos.shape == (2, 5, 3, 32, 48)


def test_dataset_items_match_batches():
    ds = D.VideoDataset(seed=5, length=3)
    video, caption = ds[1]
    b = D.make_batch(5, 1, start=1)
    assert torch.equal(video, b.videos[0]) and caption == b.captions[0]
    with pytest.raises(IndexError):
        ds[3]


def test_scene_variety():
    objects = [o for s in SCENES for o in s.objects]
    assert {o.shape for o in objects} == set(D.SHAPES)
    assert {o.colour for o in objects} == set(D.COLOURS)
    assert {o.texture for o in objects} == set(D.TEXTURES)
    assert {o.motion for o in objects} == set(D.MOTIONS)
    assert {s.background for s in SCENES} == set(D.BACKGROUNDS)
    assert {s.bg_motion for s in SCENES} == {"still", "scrolls", "pans"}
    assert {len(s.objects) for s in SCENES} == {1, 2, 3}
    assert sum(any(o.front for o in s.objects) for s in SCENES) > 30


def _clauses(caption):
    return [c.split() for c in caption.split(", ")]


def test_caption_words_follow_from_attributes():
    for s in SCENES:
        clauses = _clauses(s.caption)
        for o, words in zip(s.objects, clauses):
            expect = [o.colour, o.texture, o.shape, o.motion]
            expect += [] if o.motion == "stays" else [o.direction]
            expect += ["in", "front"] if o.front else []
            assert words == expect, s.caption
        rest = clauses[len(s.objects) :]
        if s.bg_motion == "pans":
            assert rest == [[s.background, "background"], ["camera", "pans", s.bg_direction]]
        else:
            tail = ["still"] if s.bg_motion == "still" else ["scrolls", s.bg_direction]
            assert rest == [[s.background, "background", *tail]]


def _dir(word):
    return np.array(D.DIRECTIONS[word])


def test_motion_words_describe_the_trajectories():
    for s in SCENES:
        ramp_cam = s.camera - s.camera[0]
        for o in s.objects:
            world = o.positions + ramp_cam
            step = np.diff(o.positions, axis=0)
            if o.motion == "stays":
                assert np.allclose(world, world[0]) and np.allclose(o.angles, o.angles[0])
            elif o.motion == "moves":
                delta = world[-1] - world[0]
                d = _dir(o.direction)
                assert delta @ d > 0.25 and abs(delta @ d[::-1]) < 1e-9
            elif o.motion == "bounces":  # screen space, off the frame edges
                d = _dir(o.direction)
                along = step @ d
                assert along[0] > 0 and (along < 0).any(), (s.caption, o.positions)
            elif o.motion == "rotates":
                spin = np.diff(o.angles) * D.SPINS[o.direction]
                assert (spin > 0).all() and o.shape in D.ROTATABLE
        if s.bg_motion == "still":
            assert np.allclose(s.bg_offsets, 0) and np.allclose(s.camera, 0)
        else:
            d = _dir(s.bg_direction)
            moved = s.camera if s.bg_motion == "pans" else s.bg_offsets
            assert (moved[-1] - moved[0]) @ d > 0.1
            if s.bg_motion == "pans":  # the scene moves against the camera
                assert np.allclose(s.bg_offsets, -s.camera)


def test_objects_stay_in_frame_and_overlap_only_when_captioned():
    for s in SCENES:
        for i, o in enumerate(s.objects):
            assert D._inside(o, 1.0)
            for p in s.objects[:i]:
                if not o.front:
                    assert D._apart(o, p)
            if o.front:
                gaps = [np.linalg.norm(o.positions - p.positions, axis=1).min() for p in s.objects[:i]]
                assert min(gaps) < o.size + max(p.size for p in s.objects[:i])


def test_rendered_content_matches_attributes():
    scenes = [s for s in SCENES[:40]]
    params = D.scene_params(scenes)
    video, cover = D.render(params, masks=True)
    h = D.HEIGHT
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(h) + 0.5, indexing="ij")
    checked = 0
    for b, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            occluded = o.front or any(p.front for p in s.objects[j + 1 :])
            if occluded:  # hidden for a while at most: visible at the start or the end
                assert max(cover[b, j, 0].sum(), cover[b, j, -1].sum()) > 10
                continue
            for t in range(D.FRAMES):
                m = cover[b, j, t]
                assert m.sum() > 10
                if o.shape == "triangle":  # its centroid is not its centre
                    continue
                cy, cx = (m * yy).sum() / m.sum(), (m * xx).sum() / m.sum()
                assert abs(cx - o.positions[t, 0] * h) < 0.75 and abs(cy - o.positions[t, 1] * h) < 0.75
                checked += 1
            if o.texture == "plain":
                inside = cover[b, j, 0] > 0.99
                rgb = video[b, 0][:, inside].mean(1)
                assert torch.allclose(rgb, torch.tensor(D.COLOURS[o.colour]), atol=0.01)
    assert checked > 100
    assert torch.all(cover.sum(1) <= 1 + 1e-5)


def test_vocabulary_encode_and_embed():
    v = D.Vocabulary()
    caption = SCENES[0].caption
    ids = v.encode(caption)
    assert [v.words[i] for i in ids] == v.split(caption)
    assert all(len(v.encode(s.caption)) <= v.tokens for s in SCENES)
    with pytest.raises(ValueError):
        v.encode("purple square")
    e = v.embed([caption, ""])
    assert e.shape == (2, v.tokens, v.dim) and e.dtype == torch.float32
    assert torch.all(e[1] == 0) and torch.all(e[0, len(ids) :] == 0)
    assert torch.equal(e, D.Vocabulary().embed([caption, ""]))  # fixed, not learned
    assert not torch.equal(e, D.Vocabulary(seed=1).embed([caption, ""]))
    # the clause context binds attributes to objects: swapping colours changes every token
    a = v.embed("red plain square stays, blue plain disc stays, gradient background still")
    b = v.embed("blue plain square stays, red plain disc stays, gradient background still")
    assert not torch.allclose(a[0, 2], b[0, 2])
