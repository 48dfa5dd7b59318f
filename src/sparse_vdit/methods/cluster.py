"""SVG2-style clustering before online block selection: k-means of q and of k per (sample, head).

Each (sample, head)'s video tokens are grouped by a few k-means iterations (queries and keys
separately, as SVG2 does), on the device, and sorted by cluster, so that a block of 128
consecutive tokens of the permuted order holds tokens of one cluster (similar vectors) rather
than neighbours in space: pooled block scores then estimate the attention mass better. Text
tokens stay where they are (the text rules still hold by block).

:func:`permuted_selection` returns a :class:`PermutedTable`: the gathered q and k, one
:class:`~sparse_vdit.block_table.BlockTable` row per (sample, head) in the permuted orders, and
what ``attend`` needs to gather v and scatter the output back. The integration runs it through
its ``attend`` (:meth:`SparseState.compute`), one launch for the whole batch (samples become
heads of one batch-1 call). Nothing N x N: the k-means costs ``iters x N x clusters x D`` per
(sample, head), in chunks of heads; no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_table import BlockTable, num_blocks
from ..layout import VideoLayout

SCORE_BYTES = 1 << 30  # distance scores held at once by the k-means (heads in chunks)


@torch.no_grad()
def kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int, budget: int = SCORE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``x`` ``[G, V, D]`` from ``centroids`` ``[G, C, D]``, ``iters`` rounds.

    Returns (labels int64 ``[G, V]``: each point's nearest centroid after the last update, ties to
    the lower index; the final centroids ``[G, C, D]`` float32). A cluster left empty keeps its
    centroid. Distances as ``|c|^2 - 2 x.c``, the products in x's dtype (bf16 inputs: bf16 products,
    float32 sums); heads go in chunks whose scores fit ``budget``.
    """
    groups, points, dim = x.shape
    count = centroids.shape[1]
    centroids = centroids.float().clone()
    chunk = max(1, budget // max(1, 4 * points * count))
    labels = torch.empty(groups, points, dtype=torch.long, device=x.device)
    for round_ in range(iters + 1):
        for g0 in range(0, groups, chunk):
            g1 = min(groups, g0 + chunk)
            xs, cs = x[g0:g1], centroids[g0:g1]
            products = xs @ cs.to(xs.dtype).transpose(1, 2)  # in x's dtype: bf16 on the GPU runs on tensor cores
            distance = (cs * cs).sum(-1)[:, None, :] - 2 * products.float()
            labels[g0:g1] = distance.argmin(-1)
            if round_ == iters:
                continue
            sums = torch.zeros_like(cs).scatter_add_(1, labels[g0:g1, :, None].expand(-1, -1, dim), xs.float())
            sizes = torch.zeros(g1 - g0, count, device=x.device).scatter_add_(
                1, labels[g0:g1], torch.ones(g1 - g0, points, device=x.device))  # fmt: skip
            centroids[g0:g1] = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], cs)
    return labels, centroids


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[G, V, D]`` -> ``[G, ceil(V / block), D]`` float32: the mean of each block of tokens (the
    k-means's first centroids: the positional blocks)."""
    groups, points, dim = x.shape
    full = points // block
    means = x[:, : full * block].reshape(groups, full, block, dim).float().mean(2)
    if full * block < points:
        means = torch.cat([means, x[:, full * block :].float().mean(1, keepdim=True)], 1)
    return means


def cluster_order(labels: torch.Tensor) -> torch.Tensor:
    """int64 ``[G, V]``: the tokens sorted by cluster (ascending), in sequence order within one."""
    points = labels.shape[1]
    key = labels * points + torch.arange(points, device=labels.device)
    return key.argsort(-1)


def _groups(x: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """``(B, N, H, D)`` -> the video tokens per (sample, head): ``[B * H, V, D]`` (a view where possible)."""
    b, _, h, d = x.shape
    v0 = layout.video_start
    return x[:, v0 : v0 + layout.video_tokens].permute(0, 2, 1, 3).reshape(b * h, layout.video_tokens, d)


def flat_index(order: torch.Tensor, layout: VideoLayout, batch: int, heads: int) -> torch.Tensor:
    """int64 ``[N, B * H]``: row of ``x.reshape(B * N * H, D)`` that position ``n`` of (sample, head)
    ``g = b * H + h`` reads, the video part in ``order`` (``[B * H, V]``), text in place."""
    n = layout.num_tokens
    device = order.device
    position = torch.arange(n, device=device).expand(batch * heads, n).clone()
    v0 = layout.video_start
    position[:, v0 : v0 + layout.video_tokens] = order + v0
    g = torch.arange(batch * heads, device=device)
    b, h = g // heads, g % heads
    return ((b[:, None] * n + position) * heads + h[:, None]).transpose(0, 1).contiguous()


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, N, H, D)`` -> ``(1, N, B * H, D)`` read through :func:`flat_index`'s ``index``."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index.reshape(-1)).view(1, *index.shape, x.shape[-1])


def scatter(y: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`gather`: ``(1, N, B * H, D)`` back to ``shape`` ``(B, N, H, D)``."""
    out = y.new_empty(shape[0] * shape[1] * shape[2], shape[3])
    out.index_copy_(0, index.reshape(-1), y.reshape(-1, shape[3]))
    return out.view(shape)


@dataclass(eq=False)
class PermutedTable:
    """A selection made in per-(sample, head) cluster orders; ``attend`` runs it (see the module docstring).

    ``table`` has one row per (sample, head), ``g = b * H + h``, in the permuted orders (queries in
    ``q_index``'s, keys and values in ``k_index``'s); ``q`` and ``k`` are the gathered inputs.
    """

    table: BlockTable
    q_index: torch.Tensor  # int64 [N, B * H]
    k_index: torch.Tensor
    q: torch.Tensor | None  # (1, N, B * H, D), gathered by the selection (dropped once used)
    k: torch.Tensor | None
    shape: tuple[int, int, int, int]

    @property
    def density(self) -> float:
        return self.table.density

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Attention of the call ``(q, k, v)`` with this selection: gather, one launch, scatter back.

        The gathered q and k made by the selection serve the first call (then are let go); a table
        reused at a later step gathers that step's q and k.
        """
        from ..kernels import sparse_attention

        if tuple(q.shape) != self.shape:
            raise ValueError(f"a permuted table of inputs {self.shape} for inputs {tuple(q.shape)}")
        qg, kg = self.q, self.k
        self.q = self.k = None
        qg = gather(q, self.q_index) if qg is None else qg
        kg = gather(k, self.k_index) if kg is None else kg
        out = sparse_attention(qg, kg, gather(v, self.k_index), self.table, q.shape[-1] ** -0.5, backend)
        return scatter(out, self.q_index, self.shape)


class ClusterState:
    """Per-layer k-means centroids kept between calls (warm starts, as SVG2 reuses its centroids)."""

    def __init__(self) -> None:
        self.centroids: dict = {}

    def orders(self, x: torch.Tensor, layout: VideoLayout, block: int, iters: int, key) -> torch.Tensor:
        """int64 ``[B * H, V]``: the cluster order of ``x``'s video tokens per (sample, head)."""
        groups = _groups(x, layout)
        start = self.centroids.get(key)
        if start is None or start.shape[0] != groups.shape[0] or start.shape[1] != num_blocks(layout.video_tokens, block):
            start = block_means(groups, block)
        labels, centroids = kmeans(groups, start, iters)
        self.centroids[key] = centroids
        return cluster_order(labels)

    def clear(self) -> None:
        self.centroids.clear()


__all__ = ["ClusterState", "PermutedTable", "block_means", "cluster_order", "flat_index", "gather", "kmeans", "scatter"]
