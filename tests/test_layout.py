import pytest
import torch

from sparse_vdit.layout import VideoLayout


@pytest.mark.parametrize(
    "layout",
    [VideoLayout(3, 4, 5), VideoLayout(2, 3, 7, 6, "prefix"), VideoLayout(4, 2, 3, 5, "suffix", text_valid=2)],
    ids=["video-only", "text-prefix", "text-suffix-padded"],
)
def test_token_major_permutation_round_trips_and_is_token_major(layout):
    perm, inverse = layout.token_major_order(), layout.frame_major_order()
    x = torch.randn(1, layout.num_tokens, 2)
    assert torch.equal(x[:, perm][:, inverse], x)
    f, s, v0 = layout.frames, layout.frame_tokens, layout.video_start
    for j in range(layout.video_tokens):
        p, frame = divmod(j, f)
        assert perm[v0 + j] == v0 + frame * s + p
    text = [i for i in range(layout.num_tokens) if not v0 <= i < v0 + layout.video_tokens]
    assert all(perm[i] == i for i in text)


def test_counts():
    layout = VideoLayout(33, 45, 80, 256, "suffix", text_valid=100)
    assert layout.frame_tokens == 3600
    assert layout.num_tokens == 118_800 + 256
    assert layout.kv_len == 118_800 + 100
    assert layout.text_start == 118_800 and layout.video_start == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(frames=0, height=2, width=2), "frames"),
        (dict(frames=2, height=2, width=2, text=3), "text tokens need"),
        (dict(frames=2, height=2, width=2, text_position="middle"), "text_position"),
        (dict(frames=2, height=2, width=2, text=3, text_position="suffix", text_valid=4), "text_valid"),
        (dict(frames=2, height=2, width=2, text=3, text_position="prefix", text_valid=2), "suffix"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VideoLayout(**kwargs)
