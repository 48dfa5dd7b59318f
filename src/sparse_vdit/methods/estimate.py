"""Candidate errors against dense attention: on a few sampled query blocks, or on whole outputs.

The probe computes the exact attention of the sampled query rows once per head, kept as
per-key-block partial sums (a numerator ``[key blocks, head_dim]``, a denominator and the block's
score maximum per row). Any candidate's output on those rows is then a masked combination of the
partials: ``rows x key blocks x head_dim`` work per candidate instead of ``rows x tokens x
head_dim``, so a dozen candidates cost about two dense passes over the sampled rows. Token-major
candidates use partials over keys in token-major order. Nothing of size ``N x N`` is formed.
On CUDA the partials come from one Triton kernel (:mod:`sparse_vdit.kernels.triton.partials`)
that never stores the scores; the torch path (:func:`_partials`) is its reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..block_table import num_blocks
from ..layout import VideoLayout
from .candidates import Candidate, Fixed, MassVertical, num_key_blocks, row_mask

PROBE_BYTES = 1 << 30  # partial sums kept at once (heads are probed in chunks under this)
PROBE_FREE_SHARE = 4  # with the Triton kernel on CUDA: up to 1/4 of the free memory, if more
KERNELS = ("auto", "torch", "triton")
logger = logging.getLogger("sparse_vdit")
_triton_failed = False  # set once "auto" saw the Triton partials fail; torch from then on


def default_sample_blocks(num_blocks: int) -> int:
    """8 query blocks, but at most an eighth of them (at least 2): ~3% of the rows at Wan 480p."""
    return max(2, min(8, num_blocks // 8))


def sample_query_blocks(num_blocks: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` query blocks, one drawn uniformly from each of ``count`` equal strata (sorted)."""
    count = min(count, num_blocks)
    edges = torch.linspace(0, num_blocks, count + 1, dtype=torch.float64)
    lo, hi = edges[:-1].floor().long(), edges[1:].floor().long()
    hi = torch.maximum(hi, lo + 1)
    offset = (torch.rand(count, generator=generator, dtype=torch.float64) * (hi - lo)).long()
    return torch.unique(lo + offset)


def block_rows(blocks: torch.Tensor, block: int, num_tokens: int) -> torch.Tensor:
    """Sequence positions of the tokens of ``blocks`` (the last block may be ragged)."""
    rows = (blocks[:, None] * block + torch.arange(block)[None, :]).flatten()
    return rows[rows < num_tokens]


@dataclass
class Probe:
    """Errors of every candidate on the probed rows, and the attention mass per key block.

    ``sq[c, h]``: sum of squared differences to dense of candidate ``c``, head ``h``;
    ``ref[h]``: sum of squares of the dense output; ``count``: elements summed per head;
    ``mass[h, j]``: mean share of the probed rows' attention on frame-major key block ``j``;
    ``patterns[c][h]``: the candidate's pattern for head ``h`` (fitted ones from ``mass``).
    """

    sq: torch.Tensor  # float64 [C, H], CPU
    ref: torch.Tensor  # float64 [H], CPU
    count: int
    mass: torch.Tensor  # float32 [H, key blocks], CPU
    patterns: list[tuple]


def probe(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    block: int,
    rows: torch.Tensor,
    candidates: Sequence[Candidate],
    *,
    softmax_scale: float | None = None,
    budget: int | None = None,
    kernel: str = "auto",
    gram: torch.Tensor | None = None,
) -> Probe:
    """Candidate errors on the query ``rows`` (frame-major sequence positions) of ``(B, N, H, D)`` inputs.

    ``gram`` (``[H, D, D]``, e.g. ``W_h^T W_h`` of each head's columns of the output projection):
    squared norms are taken as ``x^T G_h x``, i.e. of what the head adds to the layer's output.

    Heads go in chunks whose partial sums fit in ``budget`` bytes (default :data:`PROBE_BYTES`,
    or a quarter of the free GPU memory where that is more and the Triton kernel runs: fewer
    chunks, fewer launches); on CUDA the fp32 matmuls run on TensorFloat-32. Results stay on
    the device until one transfer at the end. ``kernel`` computes the partials: ``"triton"``
    (fused, scores never stored), ``"torch"``, or ``"auto"``: Triton on CUDA where it applies,
    torch otherwise (and from the first Triton failure on, with a warning).
    """
    global _triton_failed
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        applies = _triton_applies(block, q.shape[-1], q.dtype)
        kernel = "triton" if q.is_cuda and not _triton_failed and applies else "torch"
    try:
        return _probe(q, k, v, layout, block, rows, candidates, softmax_scale, budget, kernel, gram)
    except Exception as err:  # noqa: BLE001 - only where "auto" chose triton
        if kernel != "triton" or _triton_failed:
            raise
        _triton_failed = True
        logger.warning("sparse-vdit search: the Triton probe failed (%s: %s); using torch from now on",
                       type(err).__name__, err)  # fmt: skip
        return _probe(q, k, v, layout, block, rows, candidates, softmax_scale, budget, "torch", gram)


def _triton_applies(block: int, dim: int, dtype: torch.dtype) -> bool:
    try:
        from ..kernels.triton.partials import supports
    except ImportError:
        return False
    return supports(block, dim, dtype)


def _probe(q, k, v, layout, block, rows, candidates, softmax_scale, budget, kernel, gram=None) -> Probe:
    batch, _, heads, dim = q.shape
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    device = q.device
    setup = _Setup(layout, block, rows.to(device), candidates, scale, kernel)
    setup.gram = None if gram is None else gram.to(device, torch.float64)
    result = Probe(
        sq=torch.zeros(len(candidates), heads, dtype=torch.float64, device=device),
        ref=torch.zeros(heads, dtype=torch.float64, device=device),
        count=batch * len(rows) * dim,
        mass=torch.zeros(heads, setup.kb, dtype=torch.float32, device=device),
        patterns=[],
    )
    chosen = {i: torch.zeros(heads, setup.kb, dtype=torch.bool, device=device) for i in setup.fitted}
    if budget is None:
        budget = PROBE_BYTES
        if device.type == "cuda" and kernel == "triton":
            budget = max(budget, torch.cuda.mem_get_info(device)[0] // PROBE_FREE_SHARE)
    per_head = batch * len(rows) * setup.kb * (dim + 2) * 4 * (2 if setup.token_major is not None else 1)
    chunk = max(1, min(heads, budget // max(per_head, 1)))
    with _tf32(device):
        for h0 in range(0, heads, chunk):
            _probe_chunk(setup, q, k, v, slice(h0, min(h0 + chunk, heads)), result, chosen)
    result.sq, result.ref, result.mass = result.sq.cpu(), result.ref.cpu(), result.mass.cpu()
    chosen = {i: c.cpu() for i, c in chosen.items()}
    for i, c in enumerate(candidates):
        fitted = i in chosen
        result.patterns.append(
            tuple(c.pattern_from(row, layout, block) for row in chosen[i]) if fitted else (c.pattern,) * heads
        )
    return result


class _Setup:
    """What a probe call needs for every head chunk: row query blocks, fixed masks, key order."""

    def __init__(self, layout: VideoLayout, block: int, rows: torch.Tensor, candidates, scale: float, kernel: str):
        device = rows.device
        self.layout, self.block, self.rows, self.candidates, self.scale = layout, block, rows, candidates, scale
        self.kernel = kernel
        self.kb = num_key_blocks(layout, block)
        q_blocks = {False: rows // block, True: layout.frame_major_order(device)[rows] // block}
        # fixed candidates: one mask [1, r, kb] for every head; fitted ones keep their band here
        self.masks = {i: _all_rows_mask(c.pattern if isinstance(c, Fixed) else c.band(), layout, block,
                                        device)[q_blocks[c.token_major]][None] for i, c in enumerate(candidates)}  # fmt: skip
        self.fitted = [i for i, c in enumerate(candidates) if isinstance(c, MassVertical)]
        self.groups = {
            order: [i for i, c in enumerate(candidates) if c.token_major == order] for order in (False, True)
        }
        need_tm = bool(self.groups[True])  # keys in token-major order (padded text is never moved)
        self.token_major = layout.token_major_order(device)[: layout.kv_len] if need_tm else None


@lru_cache(maxsize=256)
def _all_rows_mask(pattern, layout: VideoLayout, block: int, device: torch.device) -> torch.Tensor:
    """:func:`row_mask` of every query block ``[query blocks, key blocks]``, kept per device."""
    return row_mask(pattern, layout, block, torch.arange(num_blocks(layout.num_tokens, block), device=device))


def _probe_chunk(setup: _Setup, q, k, v, hs: slice, result: Probe, chosen: dict) -> None:
    """Errors, reference norms and mass of the heads ``hs``, written into ``result`` / ``chosen``."""
    layout, kb, rows = setup.layout, setup.kb, setup.rows
    if setup.kernel == "triton":
        from ..kernels.triton.partials import block_partials

        qr, kh, vh = q[:, rows, hs], k[:, :, hs], v[:, :, hs]
        orders = {False: None} | ({True: setup.token_major} if setup.token_major is not None else {})
        parts = {
            key: block_partials(qr, kh, vh, kv_len=layout.kv_len, block=setup.block, softmax_scale=setup.scale,
                                order=order)
            for key, order in orders.items()
        }  # fmt: skip
    else:
        qh = q[:, rows, hs].float().transpose(1, 2)  # [B, h, r, D]
        kh, vh = (t[:, : layout.kv_len, hs].float().transpose(1, 2) for t in (k, v))  # [B, h, kv, D]
        scores = (qh @ kh.transpose(-1, -2)) * setup.scale  # [B, h, r, kv]
        parts = {False: _partials(scores, vh, setup.block, kb)}
        if setup.token_major is not None:
            parts[True] = _partials(scores[..., setup.token_major], vh[:, :, setup.token_major], setup.block, kb)
        del scores
    dense = _combine(parts[False], torch.ones(1, 1, len(rows), kb, dtype=torch.bool, device=q.device))[0]
    gram = None if setup.gram is None else setup.gram[hs]
    result.ref[hs] = squared_norms(dense, gram).sum((0, 2))
    head_mass = _block_share(parts[False]).mean((0, 2))  # [h, kb]
    result.mass[hs] = head_mass
    masks = dict(setup.masks)
    for i in setup.fitted:  # stripes on each head's heaviest key blocks, plus the band
        picked = setup.candidates[i].select(head_mass, layout, setup.block)  # [h, kb]
        chosen[i][hs] = picked
        masks[i] = masks[i] | picked[:, None, :]
    heads = hs.stop - hs.start
    for order, index in setup.groups.items():
        if index:
            stacked = torch.stack([masks[i].expand(heads, -1, -1) for i in index])  # [c, h, r, kb]
            out = _combine(parts[order], stacked)  # [c, B, h, r, D]
            result.sq[index, hs] = squared_norms(out - dense[None], gram).sum((1, 3))


@contextmanager
def _tf32(device: torch.device):
    """fp32 matmuls on TensorFloat-32 inside (CUDA only)."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda":
        yield
        return
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def _partials(scores: torch.Tensor, v: torch.Tensor, block: int, kb: int):
    """Per key block: score maximum ``m``, ``z = sum exp(s - m)`` and ``a = sum exp(s - m) v``.

    ``scores`` ``[B, h, r, kv]``, ``v`` ``[B, h, kv, D]`` -> ``a [B, h, r, kb, D]``, ``z``, ``m`` ``[B, h, r, kb]``.
    """
    b, h, r, kv = scores.shape
    pad = kb * block - kv
    s = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")).view(b, h, r, kb, block)
    vv = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, kb, block, -1)
    m = s.amax(-1)  # every block has at least one real key
    e = torch.exp(s - m[..., None])
    z = e.sum(-1)
    a = torch.einsum("bhrkt,bhktd->bhrkd", e, vv)
    return a, z, m


def _combine(parts, mask: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted outputs over the visited key blocks: ``mask`` ``[c, h|1, r, kb]`` -> ``[c, B, h, r, D]``.

    Rows that visit no key block come out zero (as a ``skip`` head).
    """
    a, z, m = parts
    visible = torch.where(mask[:, None], m[None], float("-inf"))  # [c, B, h, r, kb]
    top = visible.amax(-1, keepdim=True)
    w = torch.exp(visible - torch.where(torch.isfinite(top), top, 0.0))  # 0 where not visited
    num = (w.permute(1, 2, 3, 0, 4) @ a).permute(3, 0, 1, 2, 4)  # [B, h, r, c, kb] @ [B, h, r, kb, D]
    den = (w * z[None]).sum(-1, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)


def _block_share(parts) -> torch.Tensor:
    """Share of each row's attention on each key block ``[B, h, r, kb]``."""
    _, z, m = parts
    w = torch.exp(m - m.amax(-1, keepdim=True)) * z
    return w / w.sum(-1, keepdim=True)


def mass_only(
    q, k, v, layout: VideoLayout, block: int, rows: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Attention mass per frame-major key block of the probed rows, float32 ``[H, key blocks]`` (CPU)."""
    return probe(q, k, v, layout, block, rows, (), softmax_scale=softmax_scale).mass


def squared_norms(x: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``|x|^2`` over the last dim, or ``x^T G_h x`` with ``gram`` ``[h, D, D]`` (heads are dim -3)."""
    x = x.double()
    if gram is None:
        return x.square().sum(-1)
    return ((x @ gram.to(x.device, torch.float64)) * x).sum(-1)


def output_errors(
    out: torch.Tensor, dense: torch.Tensor, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per head: sum of squared differences, sum of squares of ``dense``, elements per head (``(B, N, H, D)``);
    with ``gram`` ``[H, D, D]`` the squares are ``x^T G_h x`` (see :func:`probe`)."""
    if gram is None:
        diff = (out.float() - dense.float()).square().sum((0, 1, 3), dtype=torch.float64)
        ref = dense.float().square().sum((0, 1, 3), dtype=torch.float64)
    else:
        diff = squared_norms((out.float() - dense.float()).transpose(1, 2), gram).sum((0, 2))
        ref = squared_norms(dense.float().transpose(1, 2), gram).sum((0, 2))
    return diff.cpu(), ref.cpu(), dense.shape[0] * dense.shape[1] * dense.shape[3]
