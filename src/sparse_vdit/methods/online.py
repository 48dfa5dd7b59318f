"""Online block selection from pooled q/k (top-p over block scores), and the hybrid with an offline plan.

:class:`TopP` decides each layer call's table from the data, on the device, in the spirit of
SVG2 / XAttention / SpargeAttn (the pooled-score variant, without SVG2's k-means permutation):

1. mean-pool q and k over each block of ``block_size`` tokens (the ragged last block and the last
   key block before padded text over their real tokens only): ``[B, H, Qb, D]``, ``[B, H, Kb, D]``;
2. pooled scores ``q_i . k_j * scale + log(tokens in key block j)`` (a key block stands for its
   tokens, as SVG2 weights a centroid by its cluster size), softmax over the key blocks, averaged
   over the batch: ``[H, Qb, Kb]`` estimated attention mass (one table serves the batch);
3. per (head, query block) keep the smallest set of key blocks whose mass reaches ``p``, ranked by
   mass with the *forced* blocks first (the query block's own, diagonal block; every text key
   block; every block of a text query row: DESIGN.md's text rules), at least ``min_density`` and
   at most ``max_density`` of the key blocks, and never fewer than the forced ones.

Nothing of size N x N is formed: the work is two poolings (one read of q and k), a
``Qb x Kb`` score matrix per head and a sort of its rows (a fixed budget, the top-k: one
``torch.topk`` per row for the threshold, no sort). On CUDA the whole selection runs through
``torch.compile`` (its small ops fused; the same blocks). The table is built on the device with a
range width fixed by the budget (:func:`max_runs`) and its index form filled in the same way, so
deciding reads nothing back to the host (the Triton and FA4 backends then launch without a sync).

:class:`Hybrid`: the heads an offline plan made sparse (the search found a pattern within its
error bound: *stable* heads) keep the plan's pattern, row for row; the heads it left dense get
:class:`TopP`'s selection, recomputed every ``every`` steps (tables reused in between).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..block_table import (DEFAULT_BLOCK, BlockTable, MaskHead, compact_positions, declare_run_length, mask_ranges,
                           num_blocks, run_length, valid_block_size)
from ..layout import VideoLayout
from ..patterns import compile_layer
from ..patterns.base import Geometry, text_intervals
from ..plan import Plan
from ..timing import clock, seconds_per_step
from .cluster import ClusterState, PermutedTable, flat_index, gather

NAME = "top-p"


# --- the rule --------------------------------------------------------------------------------


def _pool(x: torch.Tensor, length: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean of ``x[:, :length]`` ``(B, N, H, D)`` over each block of ``block`` tokens: ``[B, H, blocks, D]``."""
    b, _, h, d = x.shape
    full = length // block
    sums = x[:, : full * block].reshape(b, full, block, h, d).sum(2, dtype=dtype)
    if full * block < length:  # the ragged last block
        sums = torch.cat([sums, x[:, full * block : length].sum(1, dtype=dtype)[:, None]], 1)
    return (sums / _block_tokens(length, block, x.device, dtype)[None, :, None, None]).transpose(1, 2)


def _block_tokens(length: int, block: int, device, dtype) -> torch.Tensor:
    """Tokens in each block covering ``length`` tokens (the last one may be ragged)."""
    # built on the device from an arange: assigning a Python number to a CUDA element copies it
    # from the host synchronously (the GPU no-sync test caught it)
    starts = torch.arange(num_blocks(length, block), device=device, dtype=dtype) * block
    return (length - starts).clamp(max=block)


def pooled_mass(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block: int,
                softmax_scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Estimated attention mass per (head, query block, key block) from mean-pooled q and k.

    ``(B, N, H, D)`` inputs; float32 (float64 for float64 inputs) ``[H, Qb, Kb]`` on q's device,
    each row summing to 1: the softmax over key blocks of ``mean(q_block) . mean(k_block) * scale
    + log(tokens of the key block)``, averaged over the batch. Key blocks cover ``layout.kv_len``.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    kv = layout.kv_len
    qp, kp = _pool(q, q.shape[1], block, dtype), _pool(k, kv, block, dtype)
    scores = (qp @ kp.transpose(-1, -2)) * scale + _block_tokens(kv, block, q.device, dtype).log()
    return torch.softmax(scores, -1).mean(0)


@lru_cache(maxsize=64)
def forced_blocks(layout: VideoLayout, block: int, device: torch.device, diagonal: bool = True) -> torch.Tensor:
    """bool ``[Qb, Kb]``: the blocks every selection keeps: each query block's own key block
    (frame-major; unless ``diagonal`` is false), every valid text key block, and the whole row of a
    text query block."""
    geometry = Geometry(layout, block)
    qb, kb = geometry.num_q_blocks, geometry.num_kv_blocks
    lo, hi = text_intervals(geometry)  # [Qb, 2]: text columns, whole rows of text queries
    column = torch.arange(kb)
    forced = ((column[None, None, :] >= lo[..., None]) & (column[None, None, :] < hi[..., None])).any(1)
    rows = torch.arange(min(qb, kb))
    forced[rows, rows] = diagonal
    return forced.to(device)


def budget_blocks(layout: VideoLayout, block: int, min_density: float, max_density: float) -> tuple[int, int]:
    """(fewest, most) key blocks a query block keeps by mass, from shares of the key blocks."""
    kb = num_blocks(layout.kv_len, block)
    low = min(kb, max(1, math.ceil(min_density * kb - 1e-9)))
    return low, min(kb, max(low, math.floor(max_density * kb + 1e-9)))


def select_blocks(mass: torch.Tensor, forced: torch.Tensor, p: float, min_blocks: int, max_blocks: int) -> torch.Tensor:
    """bool like ``mass`` ``[H, Qb, Kb]``: the top-p rule on estimated mass (see the module docstring).

    Per row, key blocks ranked by mass with the ``forced`` ones (bool ``[Qb, Kb]``) first (ties in
    key-block order); the first ``n`` are kept, ``n`` the shortest prefix whose mass reaches ``p``,
    clamped to ``[min_blocks, max_blocks]``, and at least the number of forced blocks. A fixed
    budget (``min_blocks == max_blocks``) goes through :func:`top_k_keep` (same blocks, no sort).
    """
    if min_blocks == max_blocks:
        return top_k_keep(mass, forced, max_blocks)
    forced = forced.expand_as(mass)
    order = torch.sort(mass + 2.0 * forced, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(mass, -1, order)
    before = torch.cumsum(ranked, -1) - ranked  # mass of the blocks ranked above
    reach = (before < p).sum(-1, keepdim=True)  # shortest prefix with mass >= p
    keep_count = torch.maximum(reach.clamp(min_blocks, max_blocks), forced.sum(-1, keepdim=True))
    rank = torch.arange(mass.shape[-1], device=mass.device)
    return torch.zeros(mass.shape, dtype=torch.bool, device=mass.device).scatter_(-1, order, rank < keep_count)


def top_k_keep(mass: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`select_blocks` with a fixed budget of ``count`` blocks: per row every forced block and
    the ``count - forced`` others of highest mass (ties to the lower key block), by one
    ``torch.topk`` for the threshold and a prefix count of the ties at it (no sort, no scatter)."""
    picks = (count - forced.sum(-1, keepdim=True)).clamp(min=0)  # [Qb, 1] non-forced blocks to keep
    others = mass.masked_fill(forced, float("-inf"))
    top = torch.topk(others, min(count, mass.shape[-1]), dim=-1, sorted=True).values  # [H, Qb, count]
    threshold = top.gather(-1, (picks - 1).clamp(min=0).expand(*top.shape[:-1], 1))
    above = others > threshold
    tied = others == threshold
    wanted = picks - above.sum(-1, keepdim=True)  # ties at the threshold still to keep, lowest first
    chosen = (above | (tied & (torch.cumsum(tied, -1) <= wanted))) & (picks > 0)
    return chosen | forced


def group_keys(mass: torch.Tensor, forced: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass and forced flags of aligned groups of ``group`` key blocks (the last group may be short):
    ``[H, Qb, ceil(Kb / group)]`` summed mass, ``[Qb, groups]`` any block forced."""
    pad = -mass.shape[-1] % group
    mass = torch.nn.functional.pad(mass, (0, pad)).unflatten(-1, (-1, group)).sum(-1)
    forced = torch.nn.functional.pad(forced, (0, pad)).unflatten(-1, (-1, group)).any(-1)
    return mass, forced


def ungroup(keep: torch.Tensor, group: int, kb: int) -> torch.Tensor:
    """Each group's flag on its ``group`` key blocks: ``[..., groups]`` -> ``[..., kb]``."""
    return keep.repeat_interleave(group, -1)[..., :kb] if group > 1 else keep


@lru_cache(maxsize=256)
def max_runs(layout: VideoLayout, block: int, max_blocks: int) -> int:
    """A bound on the runs of kept key blocks in any row of :func:`select_blocks` (text rows are one run)."""
    geometry = Geometry(layout, block)
    lo, hi = text_intervals(geometry)
    text_columns = int((hi[:, 0] - lo[:, 0]).max()) if geometry.num_q_blocks else 0
    return max(1, max_blocks + text_columns + 1)


def max_kept(layout: VideoLayout, block: int, max_blocks: int) -> int:
    """A bound on the key blocks any row of :func:`select_blocks` keeps (text query rows keep all)."""
    kb = num_blocks(layout.kv_len, block)
    return kb if layout.text else min(kb, max(1, max_blocks))


def index_form(keep: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[H, Qb, width]``: each row's kept key blocks ascending, later slots repeating the
    last one (0 for an empty row): the table's ``kv_indices`` form, built without a host sync."""
    position = torch.arange(keep.shape[-1], device=keep.device)
    last = torch.where(keep, position, -1).amax(-1, keepdim=True).clamp(min=0).to(torch.int32)
    return compact_positions(keep, width, last)


def selection(q: torch.Tensor, k: torch.Tensor, forced: torch.Tensor, layout: VideoLayout, block: int, p: float,
              low: int, high: int, group: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`online_table`'s work (pool, score, select, ranges): the kept blocks (bool ``[H, Qb, Kb]``)
    and their ranges (int32 ``[H, Qb, width]`` starts, ends), budget ``[low, high]`` in groups of
    ``group`` key blocks, ``forced`` bool ``[Qb, Kb]``."""
    mass = pooled_mass(q, k, layout, block)
    if group > 1:
        mass, forced = group_keys(mass, forced, group)
    keep = ungroup(select_blocks(mass, forced, p, low, high), group, num_blocks(layout.kv_len, block))
    return (keep, *mask_ranges(keep, width))


COMPILE = "cuda"  # online_table's default: the selection through torch.compile on CUDA ("always", "never")
COMPILE_CHOICES = ("cuda", "always", "never")


def check_compile(compile: str | None) -> None:
    """Raise ``ValueError`` unless ``compile`` is None or one of :data:`COMPILE_CHOICES`."""
    if compile is not None and compile not in COMPILE_CHOICES:
        # "triton" (the selection as Triton kernels) was removed in #22: 2x slower than the compiled one on
        # Wan-14B 720p, no faster end to end (BENCHMARKS.md)
        raise ValueError(f"top-p: compile must be None or one of {COMPILE_CHOICES}, got {compile!r}")


@lru_cache(maxsize=1)
def compiled_selection():
    """:func:`selection` through ``torch.compile`` (compiled once per shape; the small ops fused)."""
    from ..kernels.flex import bump_recompile_limits

    bump_recompile_limits()  # one compile per (layout, heads, budget): more than dynamo's default 8
    return torch.compile(selection, fullgraph=True, dynamic=False)


def group_budget(layout: VideoLayout, block: int, min_density: float, max_density: float, group: int) -> tuple[int, int]:
    """(fewest, most) groups of ``group`` key blocks a query block keeps by mass (shares of the groups)."""
    if group == 1:
        return budget_blocks(layout, block, min_density, max_density)
    groups = -(-num_blocks(layout.kv_len, block) // group)
    low = min(groups, max(1, math.ceil(min_density * groups - 1e-9)))
    return low, min(groups, max(low, math.floor(max_density * groups + 1e-9)))


@torch.no_grad()
def online_table(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block: int = DEFAULT_BLOCK, p: float = 0.9,
                 min_density: float = 0.0, max_density: float = 1.0, name: str = NAME, diagonal: bool = True,
                 key_group: int = 1, compile: str | None = None) -> BlockTable:  # fmt: skip
    """The :class:`~sparse_vdit.block_table.BlockTable` of :func:`select_blocks` for ``(B, N, H, D)`` q and k.

    Built on q's device with no host sync (fixed range width from the budget); its ``kv_indices``
    form is filled the same way (FA4 and FlexAttention read it). ``diagonal=False``: the query
    block's own key block is not forced (for permuted orders, where it means nothing).
    ``key_group > 1``: the rule runs on aligned groups of that many key blocks (summed mass, the
    budget as shares of the groups), so kept blocks come in runs: a variant, not the default rule.
    ``compile``: ``"cuda"`` (the default, :data:`COMPILE`: ``torch.compile`` for CUDA inputs),
    ``"always"`` or ``"never"``; the same blocks either way.
    """
    if isinstance(key_group, bool) or not isinstance(key_group, int) or key_group < 1:
        raise ValueError(f"top-p: key_group must be an int >= 1, got {key_group!r}")
    low, high = group_budget(layout, block, min_density, max_density, key_group)
    forced = forced_blocks(layout, block, q.device, diagonal)
    check_compile(compile)
    compile = compile or COMPILE
    compiled = compile == "always" or (compile == "cuda" and q.device.type == "cuda")
    kb = forced.shape[-1]
    runs = min(max_runs(layout, block, high), kb // 2 + 1)  # no row has more runs than either
    keep, starts, ends = (compiled_selection() if compiled else selection)(q, k, forced, layout, block, p, low, high,
                                                                          key_group, runs)  # fmt: skip
    table = BlockTable(layout, block, (MaskHead(name),) * keep.shape[0], starts, ends,
                       torch.zeros(keep.shape[0], dtype=torch.bool, device=keep.device))  # fmt: skip
    width = max_kept(layout, block, high * key_group)
    table.form("kv_indices", lambda t: index_form(keep, width))
    # the shortest run the rule keeps stands for the mean (measured on the bench's inputs: 1.33 blocks
    # ungrouped, 2.65 in pairs), so the Triton kernel's mode is chosen without reading the table back
    return declare_run_length(table, key_group)


# --- the pattern sources ---------------------------------------------------------------------


def _check(p, min_density, max_density, every, block_size) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top-p: p must lie in (0, 1], got {p!r}")
    if not 0.0 <= min_density <= max_density <= 1.0 or max_density <= 0.0:
        raise ValueError(f"top-p: need 0 <= min_density <= max_density <= 1 and max_density > 0, got "
                         f"{min_density!r}, {max_density!r}")  # fmt: skip
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"top-p: every must be an int >= 1, got {every!r}")
    if block_size is not None and not valid_block_size(block_size):
        raise ValueError(f"top-p: block_size must be a power of two >= 16, got {block_size!r}")


class _Reuse:
    """Tables per layer, reused for ``every`` steps; a replaced table's derived forms are dropped
    at once (a new table per call would otherwise hold its forms until the shared budget fills)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.tables: dict = {}  # layer -> (step, key, table)
        self.last_step = -1

    def get(self, step: int, layer: int, key) -> BlockTable | None:
        if step < self.last_step:  # a new generation
            self.clear()
        self.last_step = step
        hit = self.tables.get(layer)
        if hit is not None and self.every > 1 and hit[1] == key and 0 <= step - hit[0] < self.every:
            return hit[2]
        return None

    def put(self, step: int, layer: int, key, table):
        old = self.tables.get(layer)
        if old is not None and old[2] is not table:
            getattr(old[2], "table", old[2]).drop_forms()
        self.tables[layer] = (step, key, table)
        return table

    def clear(self) -> None:
        for _, _, table in self.tables.values():
            getattr(table, "table", table).drop_forms()
        self.tables.clear()


class TopP:
    """Online top-p block selection as a pattern source: ``source(call) -> BlockTable | None``.

    Args:
        p: mass share each query block keeps (of the pooled estimate), in (0, 1].
        min_density, max_density: budget per query block as shares of the key blocks (forced
            blocks may pass the maximum). ``min_density == max_density`` makes it a top-k.
        warmup_steps, warmup_layers: dense steps and layers first.
        every: recompute a layer's table every ``every`` steps (reused in between; 1: every call).
        block_size: of the tables (default: the integration's, ``call.state.block_size``; else 128).
        cluster_iters: 0 (default): blocks of the sequence as it is. ``n >= 1``: SVG2-style, each
            (sample, head)'s video queries and keys are first sorted by ``n`` k-means rounds
            (:mod:`~sparse_vdit.methods.cluster`; centroids kept per layer between calls), the
            selection is made per (sample, head) in those orders (no forced diagonal block), and
            the call returns a :class:`~sparse_vdit.methods.cluster.PermutedTable`.
        key_group: 1 (default): the rule on key blocks. ``g > 1``: on aligned groups of ``g`` key
            blocks (summed mass, budget as shares of the groups): kept blocks come in runs of ``g``,
            which the Triton kernel reads as fewer, longer ranges (a variant: its own fidelity row).
        compile: how :func:`online_table` runs the selection (``"cuda"``: compiled on CUDA inputs).

    Counts: ``calls`` (tables computed) and ``reused`` (calls served by a kept table). With
    ``timing = True`` every selection is timed (:meth:`profile_seconds`; CUDA events, no sync until read).
    """

    name = NAME

    def __init__(self, p: float = 0.9, *, min_density: float = 0.0, max_density: float = 1.0, warmup_steps: int = 0,
                 warmup_layers: int = 0, every: int = 1, block_size: int | None = None,
                 cluster_iters: int = 0, key_group: int = 1, compile: str | None = None) -> None:  # fmt: skip
        _check(p, min_density, max_density, every, block_size)
        if isinstance(key_group, bool) or not isinstance(key_group, int) or key_group < 1:
            raise ValueError(f"top-p: key_group must be an int >= 1, got {key_group!r}")
        check_compile(compile)
        self.key_group, self.compile = key_group, compile
        if isinstance(cluster_iters, bool) or not isinstance(cluster_iters, int) or cluster_iters < 0:
            raise ValueError(f"top-p: cluster_iters must be an int >= 0, got {cluster_iters!r}")
        self.cluster_iters, self.clusters = cluster_iters, ClusterState()
        self.p, self.min_density, self.max_density = float(p), float(min_density), float(max_density)
        self.warmup_steps, self.warmup_layers, self.block_size = warmup_steps, warmup_layers, block_size
        self.reuse = _Reuse(every)
        self.calls = self.reused = 0
        self.timing, self._timings, self._step = False, [], 0

    def table(self, q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block: int | None = None) -> BlockTable:
        """This source's selection for q and k (``(B, N, H, D)``), as a table of ``block`` (default: its own)."""
        self.calls += 1
        block = block or self.block_size or DEFAULT_BLOCK
        start = clock(q) if self.timing else None
        table = online_table(q, k, layout, block, self.p, self.min_density, self.max_density, self.name,
                             key_group=self.key_group, compile=self.compile)  # fmt: skip
        if start is not None:
            self._timings.append((self._step, start, clock(q)))
        return table

    def clustered(self, q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block: int, layer: int) -> PermutedTable:
        """The selection in per-(sample, head) k-means orders of q and of k (``cluster_iters`` rounds)."""
        self.calls += 1
        start = clock(q) if self.timing else None
        b, _, h, _ = q.shape
        q_index = flat_index(self.clusters.orders(q, layout, block, self.cluster_iters, ("q", layer)), layout, b, h)
        k_index = flat_index(self.clusters.orders(k, layout, block, self.cluster_iters, ("k", layer)), layout, b, h)
        qg, kg = gather(q, q_index), gather(k, k_index)
        table = online_table(qg, kg, layout, block, self.p, self.min_density, self.max_density, f"{self.name}-clustered",
                             diagonal=False, key_group=self.key_group, compile=self.compile)  # fmt: skip
        if start is not None:
            self._timings.append((self._step, start, clock(q)))
        return PermutedTable(table, q_index, k_index, qg, kg, tuple(q.shape))

    def profile_seconds(self) -> dict[int, float]:
        """Seconds spent selecting, per step, since :meth:`reset_timings` (needs ``timing``; synchronises)."""
        return seconds_per_step(self._timings)

    def reset_timings(self) -> None:
        self._timings.clear()

    def block_for(self, call) -> int:
        """The table block of a call: the source's own, else the integration's."""
        return self.block_size or getattr(getattr(call, "state", None), "block_size", None) or DEFAULT_BLOCK

    def __call__(self, call) -> BlockTable | None:
        if call.step < self.warmup_steps or call.layer < self.warmup_layers:
            return None
        self._step = call.step
        key = (call.layout, call.q.shape[2], call.q.device)
        table = self.reuse.get(call.step, call.layer, key)
        if table is not None:
            self.reused += 1
            return table
        block = self.block_for(call)
        if self.cluster_iters:
            made = self.clustered(call.q, call.k, call.layout, block, call.layer)
        else:
            made = self.table(call.q, call.k, call.layout, block)
        return self.reuse.put(call.step, call.layer, key, made)

    def __repr__(self) -> str:
        return (f"TopP(p={self.p:g}, min_density={self.min_density:g}, max_density={self.max_density:g}, "
                f"every={self.reuse.every}, block_size={self.block_size}, key_group={self.key_group})")  # fmt: skip


def stable_heads(patterns) -> tuple[int, ...]:
    """The heads of a plan's layer that keep their pattern in :class:`Hybrid`: every head the plan
    made sparse (the offline search found a pattern within its error bound); dense heads go online."""
    return tuple(h for h, pattern in enumerate(patterns) if pattern.name != "dense")


class Hybrid:
    """An offline plan's stable heads as planned, the others selected online (:class:`TopP`).

    Per call after the plan's warm-up: the layer's patterns from ``plan``; heads with a sparse
    pattern keep its table rows exactly (token-major heads included); the plan's dense heads get
    ``online``'s selection from their own q and k (recomputed every ``online.reuse.every`` steps).
    A layer the plan keeps wholly dense goes online entirely; the plan's warm-up runs dense.
    """

    name = "hybrid"

    def __init__(self, plan: Plan, online: TopP) -> None:
        if online.block_size is not None and plan.block_size != online.block_size:
            raise ValueError(f"hybrid: the plan's block size {plan.block_size} differs from the online "
                             f"selection's {online.block_size}")  # fmt: skip
        self.plan, self.online = plan, online

    def _patterns(self, call) -> tuple:
        patterns = self.plan.step_range(call.step).layers[call.layer]
        if call.heads is not None and len(patterns) != call.q.shape[2]:
            patterns = patterns[call.heads.start : call.heads.stop]
        return patterns

    def __call__(self, call) -> BlockTable | tuple | None:
        plan = self.plan
        if call.step < plan.warmup_steps or call.layer < plan.warmup_layers:
            return None
        patterns = self._patterns(call)
        self.online._step = call.step
        stable = set(stable_heads(patterns))
        online = tuple(h for h in range(len(patterns)) if h not in stable)
        if not online:
            return patterns
        key = (call.layout, patterns, call.q.device)
        table = self.online.reuse.get(call.step, call.layer, key)
        if table is not None:
            self.online.reused += 1
            return table
        if len(online) == len(patterns):
            table = self.online.table(call.q, call.k, call.layout, plan.block_size)
        else:  # selected on every head (one compiled shape for any number of online heads), rows taken
            chosen = self.online.table(call.q, call.k, call.layout, plan.block_size)
            static = compile_layer(patterns, call.layout, plan.block_size, call.q.device)
            table = merge_heads(static, chosen, online)
        return self.online.reuse.put(call.step, call.layer, key, table)

    def __repr__(self) -> str:
        return f"Hybrid({self.online!r}, plan of {self.plan.num_layers} layers)"


def merge_heads(static: BlockTable, chosen: BlockTable, heads: tuple[int, ...]) -> BlockTable:
    """``static`` with its rows of ``heads`` replaced by ``chosen``'s (head ``heads[i]`` <- row ``i``; a
    ``chosen`` of as many heads as ``static``: head ``h`` <- its row ``h``).

    Same layout and block size; ranges padded with empty ranges to the wider of the two, index lists
    (``kv_indices``) merged the same way. No host sync and no host-to-device copy once ``static``'s
    forms are built (it is a cached plan table: the head masks and its padded rows are kept with it),
    so a layer call does not stall the GPU queue. Its :func:`~sparse_vdit.block_table.run_length` is
    declared from the parts'.
    """
    if (static.layout != chosen.layout or static.block_size != chosen.block_size
            or chosen.num_heads not in (len(heads), static.num_heads)):  # fmt: skip
        raise ValueError("merge_heads: the tables differ in layout or block size, or heads do not match")
    mask, rows, token_major = static.form(("merge_heads.maps", heads, chosen.num_heads),
                                          lambda t: _merge_maps(t, heads, chosen.num_heads))  # fmt: skip

    def merged(name: str, b: torch.Tensor, pad) -> torch.Tensor:
        a = getattr(static, name)
        width = max(a.shape[-1], b.shape[-1])
        a = static.form(("merge_heads.padded", name, width), lambda t: pad(a, width))
        b = pad(b.to(a.device), width)
        b = b if rows is None else b.index_select(0, rows)
        return torch.where(mask.view(-1, *(1,) * (b.dim() - 1)), b, a)

    patterns = list(static.patterns)
    for h in heads:
        patterns[h] = MaskHead(chosen.patterns[0].name)
    starts = merged("range_starts", chosen.range_starts, _pad_empty)
    ends = merged("range_ends", chosen.range_ends, _pad_empty)
    table = BlockTable(static.layout, static.block_size, tuple(patterns), starts, ends, token_major)
    table.form("kv_indices", lambda t: merged("kv_indices", chosen.kv_indices, _pad_last))
    replaced = set(heads)
    kept = tuple(h for h in range(static.num_heads) if h not in replaced)
    runs = [(len(heads), run_length(chosen))] + ([(len(kept), run_length(static.heads(kept)))] if kept else [])
    return declare_run_length(table, mean_run_length(runs))


def _merge_maps(static: BlockTable, heads: tuple[int, ...], chosen_heads: int):
    """(bool [H] mask of ``heads``, the row of ``chosen`` each head reads or None for row h <- h, the
    merged table's token-major flags) on ``static``'s device: made once per plan table and heads."""
    mask = torch.zeros(static.num_heads, dtype=torch.bool)
    mask[list(heads)] = True
    rows = None
    if chosen_heads != static.num_heads:
        rows = torch.zeros(static.num_heads, dtype=torch.long)
        rows[list(heads)] = torch.arange(len(heads))
        rows = rows.to(static.device)
    mask = mask.to(static.device)
    return mask, rows, static.token_major & ~mask


def _pad_empty(x: torch.Tensor, width: int) -> torch.Tensor:
    """Ranges ``[..., R]`` widened to ``width`` with empty ranges ``[0, 0)``."""
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """Index lists ``[..., W]`` widened to ``width`` by repeating each row's last slot (as ``kv_indices`` pads)."""
    if x.shape[-1] == width:
        return x
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], width - x.shape[-1])], -1)


def mean_run_length(parts) -> float:
    """Run length of heads joined in one table from ``(heads, run length)`` parts, heads taken to visit
    as many blocks each (equal density): the blocks over the ranges, ``sum(n) / sum(n / r)``."""
    parts = [(n, r) for n, r in parts if n and r > 0]
    return sum(n for n, _ in parts) / sum(n / r for n, r in parts) if parts else 0.0


__all__ = ["Hybrid", "TopP", "budget_blocks", "forced_blocks", "group_budget", "group_keys", "index_form", "max_kept",
           "max_runs", "mean_run_length", "merge_heads", "online_table", "pooled_mass", "select_blocks", "selection", "stable_heads",
           "top_k_keep", "ungroup"]  # fmt: skip
