"""Oracle block masks as pattern sources: the best any block mask of a given density can keep.

Both oracles keep, per (head, query block), the ``density`` share of key blocks (at least one)
with the most attention mass, and return the layer's :class:`~sparse_vdit.block_table.BlockTable`
directly (:func:`~sparse_vdit.block_table.table_from_mask`), so a whole generation runs with them:

- :class:`PerCallOracle`: the mass of this very call's q and k (an online method with perfect
  information, e.g. an ideal SVG; it computes full attention scores to decide, so it is a bound,
  not a method to time);
- :class:`StaticOracle`: one mask per (layer, head), from the mass summed over calibration
  generations (:class:`MassRecorder`): the bound for an offline plan with one step range and
  free-form masks.

Masks are in frame-major block order (token-major blocks, as multi-diagonal heads use, are a
different tiling). Steps before ``warmup_steps`` run dense, as the plans' warm-up does.
"""

from __future__ import annotations

import torch

from ..block_table import BlockTable, num_blocks, table_from_mask
from ..layout import VideoLayout

MASS_BYTES = 1 << 29  # attention scores held at once while summing block mass (query rows in chunks)


@torch.no_grad()
def block_mass(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block: int, budget: int = MASS_BYTES) -> torch.Tensor:
    """Attention mass per (head, query block, key block) of ``(B, N, H, D)`` inputs, summed over the
    batch and the block's query rows: float32 ``[H, query blocks, key blocks]`` on q's device.

    Keys beyond ``layout.kv_len`` (padded text) get none. Exact softmax in float32; query rows go in
    block-aligned chunks whose scores fit in ``budget`` bytes.
    """
    b, n, h, d = q.shape
    kv = layout.kv_len
    qb, kb = num_blocks(n, block), num_blocks(kv, block)
    keys = k[:, :kv].transpose(1, 2).float()  # [B, H, kv, D]
    out = torch.zeros(h, qb, kb, dtype=torch.float32, device=q.device)
    rows = max(1, budget // (2 * 4 * b * h * kv) // block) * block
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        p = torch.softmax((q[:, r0:r1].transpose(1, 2).float() @ keys.transpose(-1, -2)) * d**-0.5, -1)
        pad_rows = -(r1 - r0) % block
        p = torch.nn.functional.pad(p, (0, kb * block - kv, 0, pad_rows))
        out[:, r0 // block : r0 // block + p.shape[2] // block] = p.reshape(b, h, -1, block, kb, block).sum((0, 3, 5))
    return out


def top_blocks(mass: torch.Tensor, density: float) -> torch.Tensor:
    """bool like ``mass`` ``[..., key blocks]``: per row the ``density`` share of key blocks with the most mass (>= 1)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    kb = mass.shape[-1]
    count = min(kb, max(1, round(density * kb)))
    index = mass.topk(count, dim=-1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, index, True)


class MassRecorder:
    """A pattern source that runs every call dense and sums its block mass per layer (for :class:`StaticOracle`).

    ``mass[layer]``: float32 ``[H, query blocks, key blocks]`` summed over the calls from step
    ``from_step`` on (on the CPU); ``layout``: the video layout seen.
    """

    def __init__(self, block: int, from_step: int = 0) -> None:
        self.block, self.from_step = block, from_step
        self.mass: dict[int, torch.Tensor] = {}
        self.layout: VideoLayout | None = None

    def __call__(self, call) -> None:
        if call.step >= self.from_step:
            if self.layout is not None and call.layout != self.layout:
                raise RuntimeError(f"calibration saw two layouts, {self.layout.describe()} and {call.layout.describe()}")
            self.layout = call.layout
            mass = block_mass(call.q, call.k, call.layout, self.block).cpu()
            self.mass[call.layer] = self.mass[call.layer] + mass if call.layer in self.mass else mass
        return None


class _Oracle:
    def __init__(self, density: float, block: int, warmup_steps: int) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {density!r}")
        self.density, self.block, self.warmup_steps = density, block, warmup_steps

    def __call__(self, call) -> BlockTable | None:
        if call.step < self.warmup_steps:
            return None
        with torch.no_grad():
            return table_from_mask(call.layout, self.block, self.keep(call), self.name)


class PerCallOracle(_Oracle):
    """Per call, each query block's ``density`` share of key blocks with the most mass in this call."""

    name = "oracle-per-call"

    def keep(self, call) -> torch.Tensor:
        return top_blocks(block_mass(call.q, call.k, call.layout, self.block), self.density)


class StaticOracle(_Oracle):
    """One mask per (layer, head): the top key blocks per query block of the calibration ``mass``
    (``{layer: [H, Qb, Kb]}``, e.g. :attr:`MassRecorder.mass`); layers without mass run dense."""

    name = "oracle-static"

    def __init__(self, mass: dict[int, torch.Tensor], density: float, block: int, warmup_steps: int = 0) -> None:
        super().__init__(density, block, warmup_steps)
        self.masks = {layer: top_blocks(m, density) for layer, m in mass.items()}
        self._tables: dict = {}

    def __call__(self, call) -> BlockTable | None:
        if call.step < self.warmup_steps or call.layer not in self.masks:
            return None
        key = (call.layer, call.layout, call.q.device)
        table = self._tables.get(key)
        if table is None:
            keep = self.masks[call.layer].to(call.q.device)
            table = self._tables[key] = table_from_mask(call.layout, self.block, keep, self.name)
        return table


__all__ = ["MassRecorder", "PerCallOracle", "StaticOracle", "block_mass", "top_blocks"]
