"""What a candidate pattern costs, relative to dense attention (dense = 1), for the search's loss.

- :class:`BlockCost`: the share of key blocks it visits (the paper's ``1 - sparsity``).
- :class:`MeasuredCost`: its measured time on this device at this layout over the dense kernel's
  (cuDNN SDPA, or FlashAttention-4 dense where that is the backend), from a :class:`CostTable`
  cached per device and layout as JSON under :func:`cache_dir`; missing entries are measured.
- :class:`FixedCost`: given numbers (a cost table file from another run, or a test's fake table).

``python -m sparse_vdit.methods.cost_table --frames 21 --height 30 --width 52 --heads 12`` measures
and caches the table of the default candidates at one layout and prints it.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import cache_root
from ..files import write_text_whole
from ..kernels import dense as dense_kernels
from ..kernels import resolve_backend, sparse_attention
from ..layout import VideoLayout
from ..patterns import Pattern, compile_layer
from ..timing import device_name, synchronize

FORMAT = "sparse-vdit-costs"
VERSION = 1


def cache_dir() -> Path:
    """``cache_root()/costs``: ``$SPARSE_VDIT_CACHE/costs``, else ``$XDG_CACHE_HOME/sparse-vdit/costs``."""
    return cache_root() / "costs"


@dataclass(frozen=True)
class Shape:
    """What a cost depends on besides the pattern: layout, heads, head dim, dtype, device, backend."""

    layout: VideoLayout
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    block: int
    backend: str = "auto"


class BlockCost:
    """Relative cost = share of (query block, key block) pairs visited (text included)."""

    name = "blocks"

    def relative(self, key: str, pattern: Pattern, shape: Shape) -> float:
        return compile_layer([pattern], shape.layout, shape.block).density

    def describe(self) -> dict:
        return {"kind": "blocks"}


class FixedCost:
    """Given relative costs, looked up by candidate key, then by pattern name; else block counts."""

    name = "fixed"

    def __init__(self, costs: Mapping[str, float], source: str = "given") -> None:
        for key, value in costs.items():
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"cost of {key!r} must be a finite number >= 0, got {value!r}")
        self.costs, self.source = dict(costs), source
        self._blocks = BlockCost()

    def relative(self, key: str, pattern: Pattern, shape: Shape) -> float:
        for name in (key, str(pattern), pattern.name):
            if name in self.costs:
                return float(self.costs[name])
        return self._blocks.relative(key, pattern, shape)

    def describe(self) -> dict:
        return {"kind": "fixed", "source": self.source, "costs": self.costs}


@dataclass
class CostTable:
    """Measured milliseconds of patterns (all heads of one layer) and of dense, at one shape."""

    meta: dict
    dense_ms: float
    ms: dict[str, float] = field(default_factory=dict)

    def relative(self, key: str) -> float:
        return self.ms[key] / self.dense_ms

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **self.meta, "dense_ms": self.dense_ms, "ms": self.ms}

    def save(self, path: Path) -> Path:
        return write_text_whole(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read cost table {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{path} is not a sparse-vdit cost table ("format" must be {FORMAT!r})')
        meta = {k: v for k, v in data.items() if k not in ("format", "version", "dense_ms", "ms")}
        return cls(meta, float(data["dense_ms"]), {str(k): float(v) for k, v in data["ms"].items()})

    def relative_costs(self) -> dict[str, float]:
        return {key: ms / self.dense_ms for key, ms in self.ms.items()}


def table_meta(shape: Shape) -> dict:
    """What a measured cost table depends on (device, torch, backend, layout, block, heads, head dim, dtype):
    its cache key."""
    layout = shape.layout
    backend = resolve_backend(
        shape.backend, torch.empty(0, 1, 1, shape.head_dim, dtype=shape.dtype, device=shape.device)
    )
    return {
        "device": device_name(shape.device),
        "torch": torch.__version__,
        "backend": backend,
        "layout": layout.to_dict(),
        "block_size": shape.block,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "dtype": str(shape.dtype).removeprefix("torch."),
    }


def table_path(meta: dict, root: Path | None = None) -> Path:
    """Cache file of a table: one per device, torch, backend, layout, block, heads, head dim and dtype."""
    layout = meta["layout"]
    label = f"{layout['frames']}x{layout['height']}x{layout['width']}"
    if layout["text"]:
        label += f"+{layout['text']}{layout['text_position'][0]}"
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    device = "".join(ch if ch.isalnum() else "-" for ch in meta["device"]).strip("-").lower()
    return (root or cache_dir()) / f"{device}-{label}-h{meta['heads']}x{meta['head_dim']}-{digest}.json"


def time_ms(fn, inputs: Sequence[tuple], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn(*inputs[i % len])`` (CUDA events on a GPU, wall clock elsewhere).

    Input sets rotate so that the L2 cache does not hold the previous call's data.
    """
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    synchronize(device)
    times = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def random_inputs(shape: Shape, sets: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Random q, k, v sets (never zeros), enough of them to exceed ~128 MB so L2 hits stay rare."""
    n = shape.layout.num_tokens
    size = 3 * n * shape.heads * shape.head_dim * torch.empty(0, dtype=shape.dtype).element_size()
    sets = sets or max(2, min(8, math.ceil((128 << 20) / size)))
    gen = torch.Generator(device=shape.device).manual_seed(0)
    return [
        tuple(torch.randn(1, n, shape.heads, shape.head_dim, generator=gen, device=shape.device, dtype=shape.dtype)
              for _ in range(3))
        for _ in range(sets)
    ]  # fmt: skip


def measure(patterns: Mapping[str, Pattern], shape: Shape, *, reps: int = 20, progress: bool = True) -> CostTable:
    """Time dense and each pattern (on every head of one layer) at ``shape``; a fresh :class:`CostTable`."""
    from tqdm.auto import tqdm

    meta = table_meta(shape)
    inputs = random_inputs(shape)
    layout, scale = shape.layout, shape.head_dim**-0.5
    use_fa4 = meta["backend"] == "fa4"

    def dense(q, k, v):
        return dense_kernels.forward(q, k, v, kv_len=layout.kv_len, softmax_scale=scale, use_fa4=use_fa4)

    table = CostTable(meta, time_ms(dense, inputs, shape.device, reps))
    for key, pattern in tqdm(patterns.items(), desc="cost table", disable=not progress, leave=False):
        table.ms[key] = _time_pattern(pattern, shape, inputs, reps)
    return table


def _time_pattern(pattern: Pattern, shape: Shape, inputs, reps: int) -> float:
    table = compile_layer([pattern] * shape.heads, shape.layout, shape.block, shape.device)
    return time_ms(lambda q, k, v: sparse_attention(q, k, v, table, backend=shape.backend), inputs, shape.device, reps)


class MeasuredCost:
    """Relative cost = measured time over dense time at the search's shape, cached on disk.

    The first call at a shape loads the cached table (``cache_dir() / <device>-<layout>-...json``)
    and measures the patterns it lacks, all at once when :meth:`prepare` is given the candidates.
    """

    name = "measured"

    def __init__(self, root: str | Path | None = None, reps: int = 20, progress: bool = True) -> None:
        self.root = Path(root) if root is not None else None
        self.reps, self.progress = reps, progress
        self.tables: dict[Shape, tuple[CostTable, Path]] = {}

    def table(self, shape: Shape) -> tuple[CostTable, Path]:
        hit = self.tables.get(shape)
        if hit is None:
            meta = table_meta(shape)
            path = table_path(meta, self.root)
            table = CostTable.load(path) if path.exists() else None
            if table is None or table.meta != meta:
                table = measure({}, shape, reps=self.reps, progress=False)
                table.save(path)
            hit = self.tables[shape] = (table, path)
        return hit

    def prepare(self, patterns: Mapping[str, Pattern], shape: Shape) -> None:
        """Measure (and cache) every pattern of ``patterns`` the table does not have yet."""
        table, path = self.table(shape)
        missing = {k: p for k, p in patterns.items() if k not in table.ms}
        if missing:
            inputs = random_inputs(shape)
            from tqdm.auto import tqdm

            for key, pattern in tqdm(missing.items(), desc="cost table", disable=not self.progress, leave=False):
                table.ms[key] = _time_pattern(pattern, shape, inputs, self.reps)
            table.save(path)

    def relative(self, key: str, pattern: Pattern, shape: Shape) -> float:
        self.prepare({key: pattern}, shape)
        return self.tables[shape][0].relative(key)

    def describe(self) -> dict:
        return {"kind": "measured", "tables": [str(path) for _, path in self.tables.values()]}


def as_cost_model(cost) -> BlockCost | FixedCost | MeasuredCost:
    """``"blocks"``, ``"measure"``, a cost table file, a ``{key or name: relative cost}`` dict, or a model."""
    if cost is None or cost == "blocks":
        return BlockCost()
    if cost == "measure":
        return MeasuredCost()
    if isinstance(cost, Mapping):
        return FixedCost(cost)
    if isinstance(cost, (str, Path)):
        path = Path(cost)
        if not path.exists():
            raise ValueError(f"cost must be 'blocks', 'measure', a cost table file or a dict; no file {path}")
        return FixedCost(CostTable.load(path).relative_costs(), source=str(path))
    if all(hasattr(cost, name) for name in ("relative", "describe")):
        return cost
    raise TypeError(f"cost must be 'blocks', 'measure', a cost table file, a dict or a cost model; got {cost!r}")
