"""Measured tile choice for the Triton kernel: candidates, a pruner, a timer, a JSON cache.

Opt-in: the launcher asks :func:`tuned_tiles` only when ``SPARSE_VDIT_TRITON_AUTOTUNE=1`` and the
inputs are on CUDA; otherwise its fixed rule (``launcher._tiles``) decides. A choice is cached per
(GPU name, compute capability, head dim, table block size, dtype, density bucket) in memory and as
JSON under :func:`cache_root` (``triton/tiles.json``), so each GPU kind tunes each shape once. At
low density each query tile visits few key tiles, so its fixed costs weigh more: a table is tuned
on a band table of its density bucket (:data:`DENSITY_BUCKETS`), dense ones on a dense table.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import statistics
from pathlib import Path
from typing import NamedTuple

import torch

from ...block_table import num_blocks
from ...files import write_text_whole
from ...cache import cache_root

ENV = "SPARSE_VDIT_TRITON_AUTOTUNE"
FORMAT = "sparse-vdit-triton-tiles"
VERSION = 1
BLOCK_M = (64, 128)
BLOCK_N = (32, 64, 128)
NUM_WARPS = (4, 8)
NUM_STAGES = (2, 3, 4)
MIN_TILE_AREA = 64 * 32
DENSITY_BUCKETS = (0.05, 0.1, 0.2, 0.4, 1.0)  # a table is tuned at the bucket nearest its density (log scale)
KIB = 1024


class Tiles(NamedTuple):
    """One launch configuration of the kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def enabled() -> bool:
    """Whether ``SPARSE_VDIT_TRITON_AUTOTUNE=1`` asks the launcher for measured tiles."""
    return os.environ.get(ENV) == "1"


def candidates() -> list[Tiles]:
    """Every configuration the tuner considers, before pruning."""
    return [Tiles(*c) for c in itertools.product(BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES)]


def shared_memory_estimate(tiles: Tiles, head_dim: int, elem_bytes: int) -> int:
    """Bytes of shared memory: the query tile plus ``num_stages`` buffered key and value tiles."""
    return (tiles.block_m + 2 * tiles.block_n * tiles.num_stages) * head_dim * elem_bytes


def prune(configs, *, block_size: int, head_dim: int, elem_bytes: int, smem_limit: int) -> list[Tiles]:
    """The configurations that can run and are worth timing.

    Kept: both tiles divide the table's ``block_size``, the shared-memory estimate fits
    ``smem_limit`` bytes, the tile holds at least 64 x 32 scores, and 8 warps only on 128-row tiles.
    """
    kept = []
    for c in map(Tiles._make, configs):
        if block_size % c.block_m or block_size % c.block_n:
            continue
        if shared_memory_estimate(c, head_dim, elem_bytes) > smem_limit:
            continue
        if c.block_m * c.block_n < MIN_TILE_AREA or (c.num_warps == 8 and c.block_m != 128):
            continue
        kept.append(c)
    return kept


def max_shared_memory(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA ``device`` in bytes (a per-generation guess if torch lacks it)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    if props.major == 9:
        return 228 * KIB
    if (props.major, props.minor) == (8, 0):
        return 164 * KIB
    return 99 * KIB


# ---------------------------------------------------------------------------------------------
# cache


def cache_path() -> Path:
    """The JSON file holding every tuned choice."""
    return cache_root() / "triton" / "tiles.json"


def density_bucket(density: float) -> float:
    """The entry of :data:`DENSITY_BUCKETS` nearest ``density`` in log scale."""
    import math

    d = min(max(float(density), 1e-6), 1.0)
    return min(DENSITY_BUCKETS, key=lambda b: abs(math.log(b / d)))


def cache_key(gpu: str, capability: tuple[int, int], head_dim: int, block_size: int, dtype: torch.dtype,
              density: float = 1.0) -> str:  # fmt: skip
    """The cache key of one tuning problem, e.g. ``NVIDIA H100 80GB HBM3/sm90/d128/block128/bfloat16``
    (dense bucket) or ``.../bfloat16/density0.1``."""
    key = f"{gpu}/sm{capability[0]}{capability[1]}/d{head_dim}/block{block_size}/{str(dtype).removeprefix('torch.')}"
    bucket = density_bucket(density)
    return key if bucket >= 1.0 else f"{key}/density{bucket:g}"


@functools.cache
def _identity(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def device_key(device: torch.device, head_dim: int, block_size: int, dtype: torch.dtype, density: float = 1.0) -> str:
    """:func:`cache_key` for a CUDA ``device``."""
    device = _cuda(device)
    gpu, capability = _identity(device.index if device.index is not None else torch.cuda.current_device())
    return cache_key(gpu, capability, head_dim, block_size, dtype, density)


_memory: dict[str, Tiles] = {}
_rule_only: set[str] = set()  # keys no candidate fits: the launcher's rule decides


def _read_entries(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        return {}
    return data.get("entries", {})


def load(key: str) -> Tiles | None:
    """The cached choice for ``key`` (memory, then the JSON file), or None."""
    hit = _memory.get(key)
    if hit is None:
        entry = _read_entries(cache_path()).get(key)
        if entry is not None:
            hit = _memory[key] = Tiles(*entry["tiles"])
    return hit


def store(key: str, tiles: Tiles, info: dict | None = None) -> Path:
    """Cache ``tiles`` for ``key`` in memory and in the JSON file (with ``info`` beside it); returns the file."""
    tiles = Tiles(*tiles)
    _memory[key] = tiles
    path = cache_path()
    entries = _read_entries(path)
    entries[key] = {"tiles": list(tiles), **(info or {})}
    return write_text_whole(path, json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}, indent=1))


# ---------------------------------------------------------------------------------------------
# timing


def _cuda(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"Triton tile tuning times kernels with CUDA events and needs a CUDA device, got {device}")
    return device


def band_ranges(heads: int, q_blocks: int, density: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-block ranges (starts, ends: int32 [heads, q_blocks, 1]) of a band around the diagonal
    that visits about ``density_bucket(density) * q_blocks`` blocks per query block (all at 1.0)."""
    half = max(0, round((density_bucket(density) * q_blocks - 1) / 2))
    rows = torch.arange(q_blocks, dtype=torch.int32, device=device)[None, :, None].expand(heads, -1, 1)
    if density_bucket(density) >= 1.0:
        return torch.zeros_like(rows).contiguous(), torch.full_like(rows, q_blocks).contiguous()
    return (rows - half).clamp_min(0).contiguous(), (rows + half + 1).clamp_max(q_blocks).contiguous()


def autotune(
    batch: int,
    heads: int,
    n: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int,
    device,
    *,
    reps: int = 5,
    save: bool = True,
    density: float = 1.0,
) -> tuple[Tiles, dict[Tiles, float]]:
    """Time every pruned configuration (and the launcher's rule) on this problem; cache and return the fastest.

    Random ``[batch, n, heads, head_dim]`` inputs, a table of one key-block range per query block
    (dense, or a band at ``density``'s bucket), the launcher's real ``forward``; each configuration gets a warm-up call, then ``reps``
    calls timed with CUDA events, median. Configurations that fail to compile or launch are
    skipped. Returns (fastest, median ms of each configuration that ran).
    """
    from . import launcher

    device = _cuda(device)
    rule = Tiles(*launcher._tiles(block_size, head_dim, device))
    configs = prune(candidates(), block_size=block_size, head_dim=head_dim, elem_bytes=dtype.itemsize,
                    smem_limit=max_shared_memory(device))  # fmt: skip
    if rule not in configs:
        configs.append(rule)

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    starts, ends = band_ranges(heads, num_blocks(n, block_size), density, device)
    kv_num_blocks = (ends - starts).sum(-1, dtype=torch.int32)

    orders: dict = {}  # the work order of each tile height, built once (as a table keeps it)

    def call(tiles):
        block_m = tiles[0]
        if block_m not in orders:
            orders[block_m] = launcher._schedule(kv_num_blocks, block_size // block_m, num_blocks(n, block_m),
                                                 launcher.option("schedule"))  # fmt: skip
        return launcher.forward(q, k, v, kv_num_blocks, None, block_size=block_size, kv_len=n, softmax_scale=head_dim**-0.5,
                                ranges=(starts, ends), tiles=tiles, schedule=orders[block_m])  # fmt: skip

    times, errors = {}, {}
    for tiles in configs:
        try:
            call(tiles)
            torch.cuda.synchronize(device)
        except Exception as exc:  # e.g. triton's OutOfResources: the estimate is only an estimate
            errors[tiles] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            call(tiles)
            end.record()
        torch.cuda.synchronize(device)
        times[tiles] = statistics.median(s.elapsed_time(e) for s, e in events)
    if not times:
        raise RuntimeError(f"no Triton tile configuration ran: {errors}")
    best = min(times, key=times.get)
    if save:
        info = {
            "ms": times[best],
            "rule": list(rule),
            "rule_ms": times.get(rule),
            "problem": {"batch": batch, "heads": heads, "n": n, "density": density_bucket(density)},
            "triton": _triton_version(),
            "torch": torch.__version__,
            "timed": len(times),
            "failed": len(errors),
        }
        store(device_key(device, head_dim, block_size, dtype, density), best, info)
    return best, times


def tuned_tiles(
    batch: int, heads: int, n: int, head_dim: int, dtype: torch.dtype, block_size: int, device: torch.device,
    density: float = 1.0,
) -> Tiles | None:
    """The cached choice for this GPU, shape and density bucket, tuning on this problem when there is none.

    None (the launcher's rule decides) when no candidate divides ``block_size``, or when a CUDA
    graph is being captured and nothing is cached (timing cannot run during a capture).
    """
    key = device_key(device, head_dim, block_size, dtype, density)
    hit = load(key)
    if hit is not None:
        return hit
    if key in _rule_only or torch.cuda.is_current_stream_capturing():
        return None
    if not prune(candidates(), block_size=block_size, head_dim=head_dim, elem_bytes=dtype.itemsize,
                 smem_limit=max_shared_memory(device)):  # fmt: skip
        _rule_only.add(key)
        return None
    return autotune(batch, heads, n, head_dim, dtype, block_size, device, density=density)[0]


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
