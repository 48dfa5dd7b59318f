"""Timestamps that work on the CPU and on CUDA streams (events), and the time between two."""

from __future__ import annotations

import time

import torch


def clock(like: torch.Tensor):
    """A timestamp on ``like``'s device: a recorded CUDA event, or ``time.perf_counter()``."""
    if like.is_cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(start, end) -> float:
    """Seconds from ``start`` to ``end`` (two :func:`clock` values; waits for a CUDA ``end``)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def seconds_per_step(timings) -> dict[int, float]:
    """Sum ``(step, start, end)`` clock pairs into seconds per step (waits for CUDA events)."""
    out: dict[int, float] = {}
    for step, start, end in timings:
        out[step] = out.get(step, 0.0) + seconds_between(start, end)
    return out
