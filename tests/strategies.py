"""Hypothesis strategies shared by the property tests: small video layouts and patterns of every kind; and
their settings (:func:`examples`)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from sparse_vdit.layout import VideoLayout
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical, with_sink

WIDTHS = st.floats(0.0, 3.0, allow_nan=False)  # in frames: diagonal, spatial, vertical's band
SHARES = st.floats(0.0, 0.6, allow_nan=False)  # of the video: multi_diagonal, temporal
COLUMNS = st.tuples(WIDTHS, st.floats(0.05, 2.0, allow_nan=False)).map(lambda c: (c[0], c[0] + c[1]))  # in frames
SINKS = st.one_of(st.none(), st.floats(0.1, 1.5, allow_nan=False))  # frames' worth of keys, or no sink


@st.composite
def patterns(draw):
    """Any pattern (dense, skip, the bands, vertical stripes), with an attention sink or not."""
    pattern = draw(st.one_of(
        st.just(dense()), st.just(skip()), st.builds(diagonal, WIDTHS), st.builds(spatial, WIDTHS),
        st.builds(multi_diagonal, SHARES), st.builds(temporal, SHARES),
        st.builds(vertical, st.lists(COLUMNS, min_size=1, max_size=2), WIDTHS),
    ))  # fmt: skip
    sink = draw(SINKS)
    return pattern if sink is None else with_sink(pattern, sink)


@st.composite
def layouts(draw, max_frames: int = 4, max_height: int = 6, max_width: int = 9, max_text: int = 24, min_keys: int = 1):
    """A small layout: text before, after (padded or not) or none; at least ``min_keys`` keys (gradient tests take
    2: with one key every gradient but dv is exactly zero, no relative error to measure)."""
    position = draw(st.sampled_from(["none", "prefix", "suffix"]))
    text = 0 if position == "none" else draw(st.integers(1, max_text))
    valid = draw(st.one_of(st.none(), st.integers(0, text))) if position == "suffix" else None
    frames, height, width = (draw(st.integers(1, m)) for m in (max_frames, max_height, max_width))
    layout = VideoLayout(frames, height, width, text, position, valid)
    assume(layout.kv_len >= min_keys)
    return layout


def examples(default: int):
    """Settings for a property test: ``default`` examples, the same on every run (CI stays deterministic), or with
    ``SPARSE_VDIT_EXAMPLES=N`` in the environment N new random ones (a longer search, run by hand)."""
    n = int(os.environ.get("SPARSE_VDIT_EXAMPLES", "0"))
    return settings(max_examples=n or default, derandomize=not n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
