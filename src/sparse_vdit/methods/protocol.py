"""What a method implements: a pattern source, called once per self-attention layer call.

The integrations (:mod:`sparse_vdit.integrations.diffusers`) build an :class:`AttentionCall` for
every layer call and ask the installed pattern source for one pattern per head (``None``: dense;
a compiled :class:`~sparse_vdit.block_table.BlockTable` of the call's layout, run as it is;
a :class:`~sparse_vdit.patterns.HeadChoice`: a per-(sample, head) choice among candidates, kept on
the device where the backend reads it there; or an object with ``attend(q, k, v, backend)`` and
``density``, which runs the call itself, e.g. :class:`~sparse_vdit.methods.cluster.PermutedTable`);
observers see every call after it ran. Methods
(plans, SVG, the offline search) implement these callables here, below the integrations, so they
need not know any model library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..block_table import BlockTable
from ..layout import VideoLayout
from ..patterns import HeadChoice, Pattern
from ..plan import Plan


class Computes(Protocol):
    """What runs attention for a call (the integration's shared state)."""

    def compute(self, q, k, v, layout: VideoLayout, patterns: Sequence[Pattern] | HeadChoice | None) -> torch.Tensor: ...


@dataclass(eq=False)
class AttentionCall:
    """One self-attention call: what a pattern source decides from (tensors are ``(B, N, H, D)``)."""

    step: int
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: VideoLayout
    state: Computes | Any
    heads: range | None = None  # global head indices of q's heads under Ulysses parallelism (None: all)

    def dense_output(self) -> torch.Tensor:
        """Dense attention of this call on the fastest dense kernel."""
        return self.state.compute(self.q, self.k, self.v, self.layout, None)

    def output(self, patterns: Sequence[Pattern] | HeadChoice | None) -> torch.Tensor:
        """Attention of this call with one pattern per head (``None``: dense) or a :class:`HeadChoice`."""
        return self.state.compute(self.q, self.k, self.v, self.layout, patterns)


PatternSource = Callable[[AttentionCall], "Sequence[Pattern] | BlockTable | HeadChoice | None"]
Observer = Callable[[AttentionCall, "Sequence[Pattern] | BlockTable | HeadChoice | None", torch.Tensor], None]


def plan_source(plan: Plan) -> PatternSource:
    """The pattern source of a fixed plan: its patterns for (step, layer), ``None`` where dense."""

    def source(call: AttentionCall):
        if plan.is_dense(call.step, call.layer):
            return None
        return plan.patterns_for(call.step, call.layer)

    source.plan = plan  # type: ignore[attr-defined]
    return source
