"""Timestamps that work on the CPU and on CUDA streams (events), the time between two, waiting for a
device, and the name of the device a measurement ran on."""

from __future__ import annotations

import platform
import time

import torch


def device_name(device: str | torch.device) -> str:
    """The device a result was measured on, for its record: the GPU's name for a CUDA device (as
    ``torch.cuda.get_device_name``), ``cpu (<processor>)`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
