"""Slow, obviously-correct oracles shared by the tests."""

from __future__ import annotations

import torch

from sparse_vdit.layout import VideoLayout
from sparse_vdit.patterns import Pattern
from sparse_vdit.patterns.base import TIE_SLACK


def oracle_block_map(pattern: Pattern, layout: VideoLayout, block: int) -> torch.Tensor:
    """Bool [Qb, Kb] of visited blocks, straight from DESIGN.md's definitions, one pair at a time."""
    n, kv_len = layout.num_tokens, layout.kv_len
    qb, kb = -(-n // block), -(-kv_len // block)
    s, v0, nv = layout.frame_tokens, layout.video_start, layout.video_tokens

    def tokens(b):
        return range(b * block, min((b + 1) * block, n))

    def centre(b):
        t = tokens(b)
        return (t[0] + t[-1]) / 2

    valid_text = layout.text if layout.text_valid is None else layout.text_valid
    text_q = set(range(layout.text_start, layout.text_start + layout.text))
    text_k = set(range(layout.text_start, layout.text_start + valid_text))
    out = torch.zeros(qb, kb, dtype=torch.bool)
    if pattern.name == "skip":
        return out
    for i in range(qb):
        for j in range(kb):
            if pattern.name == "dense":
                hit = True
            elif pattern.name in ("diagonal", "spatial", "vertical"):
                hit = abs(centre(i) - centre(j)) <= pattern.width * s + TIE_SLACK
            elif pattern.name in ("multi_diagonal", "temporal"):
                hit = abs(centre(i) - centre(j)) <= pattern.width * nv + TIE_SLACK
            else:
                raise AssertionError(pattern.name)
            for lo, hi in pattern.columns:
                cols = range(v0 + round(lo * s), v0 + min(round(hi * s), nv))
                hit |= any(t in cols for t in tokens(j))
            sink = range(v0, v0 + min(round(pattern.sink * s), nv))  # positions of the head's own order
            hit |= any(t in sink for t in tokens(j))
            hit |= any(t in text_q for t in tokens(i)) or any(t in text_k for t in tokens(j))
            out[i, j] = hit
    return out


def token_mask(table, head: int) -> torch.Tensor:
    """Bool [N, kv_len] token mask of one head in the original (frame-major) order."""
    layout, block = table.layout, table.block_size
    blocks = table.block_mask(head)
    mask = blocks.repeat_interleave(block, 0)[: layout.num_tokens].repeat_interleave(block, 1)
    mask = mask[:, : layout.kv_len]
    if table.patterns[head].token_major:
        pos = layout.frame_major_order()  # position of each original token in token-major order
        # padded text is a suffix the permutation never moves, so pos[:kv_len] < kv_len
        mask = mask[pos][:, pos[: layout.kv_len]]
    return mask


def masked_attention(q, k, v, mask, scale):
    """Float64 attention of one head [B, N, D] with a token mask [N, kv_len]; empty rows give 0."""
    kv = mask.shape[1]
    s = (q.double() @ k[:, :kv].double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v[:, :kv].double()


def random_qkv(shape, dtype: torch.dtype, device, seed: int) -> list[torch.Tensor]:
    """q, k, v of ``shape`` ([B, N, H, D]): standard normal from a ``seed``-ed generator on ``device``, then cast."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(*shape, generator=g, device=device).to(dtype) for _ in range(3)]


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def grads(fn, dtype: torch.dtype, q, k, v, grad_out) -> list[torch.Tensor]:
    """(out, dq, dk, dv) of ``fn(q, k, v)`` at ``dtype``, the inputs and ``grad_out`` cast from the same draws."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def assert_gradients(got, expected, bounds, heads, kv_len: int) -> None:
    """``got`` (out, dq, dk, dv) against ``expected`` within ``bounds`` by relative RMS error, no NaN; skipped heads
    and padded text keys (rows from ``kv_len``, never attended) with exactly zero gradients."""
    for name, a, b, bound in zip(("out", "dq", "dk", "dv"), got, expected, bounds):
        assert not a.isnan().any(), name
        assert rel_rms(a, b) <= bound, f"{name}: {rel_rms(a, b):.2e} > {bound:.2e}"
    for h, p in enumerate(heads):
        if p.name == "skip":
            for name, g in zip(("dq", "dk", "dv"), got[1:]):
                assert torch.equal(g[:, :, h], torch.zeros_like(g[:, :, h])), f"{name} of skipped head {h}"
    for name, g in zip(("dk", "dv"), got[2:]):
        assert torch.equal(g[:, kv_len:], torch.zeros_like(g[:, kv_len:])), f"{name} of padded text"


def poison_empty_like(monkeypatch, module=torch) -> None:
    """Make ``module.torch.empty_like`` and ``.empty`` (or torch's) return NaN-filled float buffers, so a
    kernel's unwritten output elements (and reads of unwritten scratch) show; ``monkeypatch.undo()`` restores them."""
    for name in ("empty_like", "empty"):
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(module, name, poisoned)


def saved_tiny_organism(folder):
    """A random 2-layer organism (2 heads x 16, 4 frames of 32 x 32 px: 4 x 8 x 8 tokens) saved in
    ``folder`` as a weights folder the commands load; returns the folder."""
    from sparse_vdit.organism import model as M

    spec = M.OrganismSpec(frames=4, height=32, width=32)
    config = M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
    return M.save_organism(M.build_organism(config), folder, spec)
