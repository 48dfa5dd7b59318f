"""SVG's profiling: sampled query rows, their masks, and their exact and masked attention.

:func:`sampled_outputs` computes, for a few query rows, the exact attention output and the outputs
under each candidate pattern's mask (from the patterns' block tables, in each pattern's own token
order; never an ``N x N`` mask); :func:`sampled_errors` turns them into per-head errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ..block_table import is_power_of_two
from ..kernels import registry
from ..layout import VideoLayout
from ..patterns import Pattern, compile_layer

ERRORS = ("output", "mass")
DEFAULT_CHUNK = 1 << 24  # score elements (samples x heads x rows x keys) computed at once
# errors_and_choice's Triton kernel (one launch instead of six): "auto" on CUDA, True also on the CPU
# (the interpreter; tests), False never (the torch operations, as before: benchmarks compare both)
FUSED_CHOICE: bool | str = "auto"


# --- sampled rows and their masks ------------------------------------------------------------


def sample_rows(layout: VideoLayout, count: int, step: int, layer: int, seed: int = 0) -> torch.Tensor:
    """``count`` distinct query positions (int64, CPU, ascending), one per equal slice of the video.

    A function of ``(seed, step, layer)`` only. All video tokens if ``count`` exceeds them.
    """
    video = layout.video_tokens
    if count >= video:
        return torch.arange(video) + layout.video_start
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + layer)
    edges = torch.arange(count + 1, dtype=torch.float64) * (video / count)
    u = torch.rand(count, generator=g, dtype=torch.float64)
    rows = torch.floor(edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp(max=video - 1)
    return rows + layout.video_start


def token_major_positions(pos: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """Where sequence positions ``pos`` (frame-major) sit in the token-major order; text stays.

    Index arithmetic equal to ``layout.frame_major_order()[pos]``: video token ``f * S + p`` goes
    to ``p * F + f``.
    """
    v0, s, f = layout.video_start, layout.frame_tokens, layout.frames
    i = pos - v0
    video = (i >= 0) & (i < layout.video_tokens)
    return torch.where(video, v0 + (i % s) * f + torch.div(i, s, rounding_mode="floor"), pos)


@lru_cache(maxsize=32)
def _key_blocks(layout: VideoLayout, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block index of every key ``[0, kv_len)`` in frame-major and in token-major order."""
    keys = torch.arange(layout.kv_len, device=device)
    return keys // block, token_major_positions(keys, layout) // block


def row_ranges(
    rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[len(patterns), rows, ranges]``: each sampled row's key-block ranges under each pattern.

    The rows of the patterns' block tables for the rows' query blocks, in each pattern's own
    token order (token-major block numbers for ``temporal``); unused slots are empty ranges.
    """
    starts, ends = [], []
    for pattern in patterns:
        table = compile_layer([pattern], layout, block, rows.device)
        position = token_major_positions(rows, layout) if pattern.token_major else rows
        starts.append(table.range_starts[0, position // block])
        ends.append(table.range_ends[0, position // block])
    width = max(x.shape[1] for x in starts)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return torch.stack([pad(x) for x in starts]), torch.stack([pad(x) for x in ends])


def row_masks(rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int) -> torch.Tensor:
    """Bool ``[len(patterns), rows, kv_len]``: the keys each sampled row visits under each pattern.

    :func:`row_ranges` compared with every key's block index (frame-major or token-major), on
    ``rows.device``: no ``N x N`` mask and no per-head mask.
    """
    starts, ends = row_ranges(rows, layout, patterns, block)
    frame_kb, token_kb = _key_blocks(layout, block, rows.device)
    out = []
    for i, pattern in enumerate(patterns):
        kb = token_kb if pattern.token_major else frame_kb
        out.append(((kb >= starts[i, ..., None]) & (kb < ends[i, ..., None])).any(1))
    return torch.stack(out)


@lru_cache(maxsize=64)
def position_ranges(
    layout: VideoLayout, patterns: tuple[Pattern, ...], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[len(patterns), NR, num_tokens]`` contiguous on ``device``: :func:`row_ranges` of every
    query position, built once per (layout, patterns, block, device) and kept resident, so that a
    call sends only its rows (the fused kernel reads the ranges at the rows' positions)."""
    positions = torch.arange(layout.num_tokens)
    starts, ends = row_ranges(positions, layout, patterns, block)
    return starts.transpose(1, 2).contiguous().to(device), ends.transpose(1, 2).contiguous().to(device)


def fused_inputs(
    rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel's rows (int32 ``[R]``, one queued copy) and the patterns' per-position ranges
    (int32 ``[2, NR, num_tokens]``, resident: :func:`position_ranges`) on ``device``."""
    starts, ends = position_ranges(layout, tuple(patterns), block, torch.device(device))
    rows = rows.to(torch.int32)
    if rows.device != starts.device:
        if starts.device.type == "cuda" and rows.device.type == "cpu":  # queued without a host sync
            rows = rows.pin_memory()
        rows = rows.to(starts.device, non_blocking=True)
    return rows, starts, ends


PROFILE_BACKENDS = ("auto", "torch", "triton")


def _triton_ok(q: torch.Tensor, patterns: Sequence[Pattern]) -> bool:
    """Whether the sampled rows' Triton kernels take these inputs here (two masks, a power-of-two head dim
    of 16-256, a Triton dtype, Triton on this device)."""
    dim = q.shape[-1]
    if len(patterns) != 2 or dim < 16 or dim > 256 or not is_power_of_two(dim) or q.dtype not in registry.API_DTYPES:
        return False
    return registry.available("triton", q.device)[0]


def sampled_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    layout: VideoLayout,
    patterns: Sequence[Pattern],
    block: int,
    *,
    softmax_scale: float | None = None,
    backend: str = "torch",
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the sampled ``rows`` and the same rows under each pattern's mask.

    Args:
        q, k, v: ``(batch, seq, heads, dim)`` at ``layout`` (keys beyond ``layout.kv_len`` unused).
        rows: int64 ``[R]`` query positions, on the CPU (cheapest for ``"triton"``) or q's device.
        backend: ``"torch"``: scores ``[heads_per_chunk, R, kv_len]`` for a chunk of heads at a
            time (``chunk`` elements), masks from :func:`row_masks`; memory
            ``O(chunk + patterns x R x kv_len)``. ``"triton"``: one fused pass over the keys
            (:mod:`sparse_vdit.kernels.triton.sampled`, two patterns), scores never stored.
            Matmuls in q's dtype (float32 accumulation), softmax and sums in float32.

    Returns:
        outputs float32 ``[B, H, 1 + M, R, D]`` (exact first, each renormalised over its own keys)
        and the attention mass each keeps, float32 ``[B, H, 1 + M, R]`` (the exact one is 1).
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    batch, _, heads, dim = q.shape
    kv_len = layout.kv_len
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    if backend == "triton":
        from ..kernels.triton.sampled import sampled_outputs as fused

        rows, starts, ends = fused_inputs(rows, layout, patterns, block, q.device)
        geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
        return fused(q, k, v, rows, starts, ends, tuple(p.token_major for p in patterns),
                     kv_len=kv_len, softmax_scale=scale, block_size=block, layout=geometry)  # fmt: skip
    rows = rows.to(q.device)
    m, r = len(patterns), rows.numel()
    masks = row_masks(rows, layout, patterns, block)
    keep = torch.cat([masks.new_ones(1, r, kv_len), masks]).view(1, m + 1, r, kv_len)
    q_rows = q.index_select(1, rows) * scale  # [B, R, H, D]
    outputs = torch.empty(batch, heads, m + 1, r, dim, dtype=torch.float32, device=q.device)
    masses = torch.empty(batch, heads, m + 1, r, dtype=torch.float32, device=q.device)
    group = max(1, min(heads, chunk // max(1, r * kv_len)))
    for b in range(batch):
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            qc = q_rows[b, :, h0:h1].transpose(0, 1)  # [h, R, D]
            kc = k[b, :kv_len, h0:h1].transpose(0, 1)  # [h, kv, D], a strided view
            vc = v[b, :kv_len, h0:h1].transpose(0, 1)
            probs = torch.softmax(torch.bmm(qc, kc.transpose(1, 2)), dim=-1)  # float32 inside
            kept = torch.where(keep, probs[:, None], 0).view(h1 - h0, (m + 1) * r, kv_len)
            mass = kept.sum(-1, dtype=torch.float32).view(h1 - h0, m + 1, r)
            o = torch.bmm(kept, vc).float().view(h1 - h0, m + 1, r, dim)
            outputs[b, h0:h1] = o / mass.clamp_min(1e-30)[..., None]
            masses[b, h0:h1] = mass / mass[:, :1].clamp_min(1e-30)
    return outputs, masses


def sampled_errors(
    outputs: torch.Tensor, masses: torch.Tensor, error: str = "output", per_sample: bool = False
) -> torch.Tensor:
    """float32 ``[M, heads]``: how far each mask's rows are from the exact rows (:func:`sampled_outputs`).

    ``"output"``: mean squared error of the outputs over rows, dims and batch; ``"mass"``:
    exact attention mass outside the mask, mean over rows and batch. ``per_sample``: not averaged
    over the batch, ``[M, batch, heads]`` (the reference decides per sample and head).
    """
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    if error == "mass":
        per = (1 - masses[:, :, 1:]).mean(-1)  # [B, H, M]
    else:
        per = (outputs[:, :, 1:] - outputs[:, :, :1]).square().mean((-1, -2))
    return per.permute(2, 0, 1).contiguous() if per_sample else per.mean(0).T.contiguous()


def errors_and_choice(
    outputs: torch.Tensor, masses: torch.Tensor, error: str = "output", per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sampled_errors` and each (sample, head)'s mask with the lower error, int32 ``[B, H]``
    (``argmin``: ties go to the first), both on the outputs' device: no host sync.

    With ``error="output"`` and two masks, on CUDA (see :data:`FUSED_CHOICE`), one Triton launch
    (:func:`sparse_vdit.kernels.triton.sampled.choose`) instead of six torch operations; the
    errors then differ from :func:`sampled_errors` by float32 summation order only.
    """
    fused = FUSED_CHOICE is True or (FUSED_CHOICE == "auto" and outputs.is_cuda)
    if fused and error == "output" and outputs.shape[2] == 3 and _triton_ok(outputs, (None, None)):
        from ..kernels.triton.sampled import choose

        return choose(outputs.contiguous(), per_sample)
    errors = sampled_errors(outputs, masses, error, per_sample)
    selected = errors.argmin(0).to(torch.int32)
    if selected.dim() == 1:
        selected = selected.expand(outputs.shape[0], -1)
    return errors, selected.contiguous()
