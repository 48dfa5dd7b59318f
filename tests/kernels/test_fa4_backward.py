"""The fa4 backend's backward on the CPU: FA4's block-sparse backward tensors (the table transposed)
against a brute-force transpose of each head's block mask, the choice between FA4's backward and the
Triton one, and the whole route (forward tensors, backward tensors, kv_len slicing, zero rows of
padded keys) through a fake flash-attn-4 that computes what FA4 documents, in float64, against the
reference backend's autograd. FA4 itself runs only on the GPU: tests/kernels/test_backward.py
``-m gpu -k fa4``."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import NamedTuple

import pytest
import torch

from helpers import rel_rms
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.block_table import num_blocks
from sparse_vdit.kernels import fa4
from sparse_vdit.kernels.api import reorder_heads
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical

torch.set_num_threads(1)

MIXED = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)]
LAYOUTS = {  # layout, block, heads
    "text-suffix-padded": (VideoLayout(2, 5, 9, 20, "suffix", text_valid=7), 16, [*MIXED, temporal(0.1)]),
    "text-prefix": (VideoLayout(3, 4, 7, 13, "prefix"), 32, MIXED),
    "ragged-odd-frames": (VideoLayout(3, 5, 7), 16, [diagonal(0.5), multi_diagonal(0.2), skip(), dense()]),
    "svg": (VideoLayout(4, 4, 6), 16, [spatial(1.0), temporal(0.2), spatial(0.0)]),
}


class FakeBlockSparse(NamedTuple):
    """flash_attn.cute.block_sparsity.BlockSparseTensorsTorch's fields (4.0.0b36)."""

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None
    dq_write_order: torch.Tensor | None = None
    dq_write_order_full: torch.Tensor | None = None
    spt: bool | None = None


def _block_map(sparse, rows: int, columns: int, heads: int) -> torch.Tensor:
    """Bool [H, rows, columns] of FA4 block lists, after the checks FA4 makes of them (all blocks full)."""
    assert sparse.mask_block_cnt.shape == (1, heads, rows) and not sparse.mask_block_cnt.any()
    counts, index = sparse.full_block_cnt, sparse.full_block_idx
    assert counts.dtype == index.dtype == torch.int32
    assert counts.shape == (1, heads, rows) and index.shape[:3] == (1, heads, rows) and index.shape[3] <= columns
    out = torch.zeros(heads, rows, columns + 1, dtype=torch.bool)
    used = torch.arange(index.shape[3]) < counts[0, ..., None]
    out.scatter_(-1, torch.where(used, index[0].long(), columns), True)
    return out[..., :columns]


def _tokens(blocks: torch.Tensor, block: int, n: int, kv: int) -> torch.Tensor:
    return blocks.repeat_interleave(block, 1)[:, :n].repeat_interleave(block, 2)[:, :, :kv]


class FakeInterface:
    """``flash_attn.cute.interface``'s two calls as FA4 documents them, in float64 torch (no tiles)."""

    backward_calls = 0

    @staticmethod
    def _flash_attn_fwd(q, k, v, softmax_scale, block_sparse_tensors, out, return_lse=False):
        (batch, n, heads, _), kv = q.shape, k.shape[1]
        block = block_sparse_tensors.block_size[0]
        mask = _tokens(_block_map(block_sparse_tensors, num_blocks(n, block), num_blocks(kv, block), heads), block, n, kv)
        s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * softmax_scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        out.copy_(torch.einsum("bhnm,bmhd->bnhd", p, v.double()))
        return out, lse.float() if q.dtype != torch.float64 else lse, None, None, None

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, softmax_scale, block_sparse_tensors, dq, dk, dv):
        cls.backward_calls += 1
        (batch, n, heads, _), kv = q.shape, k.shape[1]
        assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape and lse.shape == (batch, heads, n)
        block_q, block_kv = block_sparse_tensors.block_size
        by_key = _block_map(block_sparse_tensors, num_blocks(kv, block_kv), num_blocks(n, block_q), heads)
        mask = _tokens(by_key.transpose(1, 2), block_q, n, kv)  # the backward's lists, transposed back
        s = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * softmax_scale
        p = torch.where(mask, torch.exp(s - lse.double()[..., None]), 0.0)  # rows in no list: never read
        do = dout.double()
        dv.copy_(torch.einsum("bhnm,bnhd->bmhd", p, do))
        delta = (do * out.double()).sum(-1).transpose(1, 2)  # [B, H, N]
        ds = p * (torch.einsum("bnhd,bmhd->bhnm", do, v.double()) - delta[..., None])
        dq.copy_(torch.einsum("bhnm,bmhd->bnhd", ds, k.double()) * softmax_scale)
        dk.copy_(torch.einsum("bhnm,bnhd->bmhd", ds, q.double()) * softmax_scale)
        return dq, dk, dv


@pytest.fixture
def fake_fa4(monkeypatch):
    """fa4 on the CPU with the fake flash-attn-4 of a Hopper GPU, its backward chosen where it serves
    (``BACKWARD = "auto"``); output buffers poisoned."""
    monkeypatch.setattr(fa4, "BACKWARD", "auto")
    monkeypatch.setattr(fa4, "_FA4", (FakeInterface, FakeBlockSparse))
    monkeypatch.setattr(fa4, "_arch_of", lambda device: (9, 0))
    monkeypatch.setattr(fa4, "_POISON", True)
    monkeypatch.setattr(fa4, "_SAID_BACKWARD", set())
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    FakeInterface.backward_calls = 0
    return FakeInterface


@pytest.mark.parametrize("case", LAYOUTS)
def test_backward_tensors_are_the_transposed_block_mask(case, fake_fa4):
    layout, block, heads = LAYOUTS[case]
    table = compile_layer(heads, layout, block)
    sparse = fa4.backward_tensors(table)
    assert sparse.block_size == (block, block)
    kb, qb = table.num_kv_blocks, table.num_q_blocks
    by_key = _block_map(sparse, kb, qb, table.num_heads)  # also checks shapes, dtypes, no partial blocks
    counts, index = sparse.full_block_cnt[0], sparse.full_block_idx[0]
    for h in range(table.num_heads):
        expected = table.block_mask(h).T  # [Kb, Qb], brute force, in the head's own order
        assert torch.equal(by_key[h], expected), (case, h)
        assert torch.equal(counts[h], expected.sum(1, dtype=torch.int32))
        for j in range(kb):  # ascending, exactly the visiting query blocks
            assert index[h, j, : counts[h, j]].tolist() == expected[j].nonzero().flatten().tolist()
    skipped = [h for h, p in enumerate(heads) if p.name == "skip"]
    assert all(int(counts[h].sum()) == 0 for h in skipped)
    dense_heads = [h for h, p in enumerate(heads) if p.name == "dense"]
    assert all(bool((counts[h] == qb).all()) for h in dense_heads)
    assert fa4.backward_tensors(table) is sparse  # kept with the table
    forward = fa4.table_tensors(table)  # the forward's direction, for contrast: per query block
    assert forward.full_block_cnt.shape == (1, table.num_heads, qb)
    assert torch.equal(_block_map(forward, qb, kb, table.num_heads), by_key.transpose(1, 2))


@pytest.mark.parametrize(
    "arch, block, dim, dtype, ok",
    [
        ((9, 0), 128, 128, torch.bfloat16, True),  # 64 x 128 tiles, two query subtiles per block
        ((9, 0), 128, 64, torch.float16, True),  # 128 x 128 tiles
        ((9, 0), 64, 128, torch.bfloat16, False),  # tile_n is 128: key blocks of 64 do not fit
        ((9, 0), 256, 128, torch.bfloat16, False),  # key blocks must equal tile_n on Hopper
        ((9, 0), 64, 256, torch.bfloat16, True),  # hd 256: 64 x 64 tiles
        ((10, 0), 256, 128, torch.bfloat16, True),  # Blackwell: subtiles both ways
        ((10, 3), 128, 64, torch.float16, True),
        ((10, 0), 64, 128, torch.bfloat16, False),
        ((10, 0), 256, 256, torch.bfloat16, False),
        ((8, 9), 128, 128, torch.bfloat16, False),
        ((12, 0), 128, 128, torch.bfloat16, False),
        ((9, 0), 128, 128, torch.float32, False),
    ],
)
def test_backward_supports_follows_fa4s_tiles(arch, block, dim, dtype, ok):
    got, why = fa4.backward_supports(block, dim, dtype, arch)
    assert got is ok and why


def test_backward_path_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(fa4, "BACKWARD", "auto")
    assert fa4.backward_path(128, 128, torch.bfloat16, cpu)[0] == "triton"  # no CUDA: the Triton backward
    monkeypatch.setattr(fa4, "_arch_of", lambda device: (9, 0))
    assert fa4.backward_path(128, 128, torch.bfloat16, cuda)[0] == "fa4"
    path, why = fa4.backward_path(64, 128, torch.bfloat16, cuda)
    assert path == "triton" and "block_size 128" in why
    monkeypatch.setattr(fa4, "BACKWARD", fa4.BACKWARD_DEFAULT)  # FA4's where it serves (it passed its GPU test)
    assert fa4.BACKWARD_DEFAULT == "auto" and fa4.backward_path(128, 128, torch.bfloat16, cuda)[0] == "fa4"
    monkeypatch.setattr(fa4, "BACKWARD", "triton")  # the A/B's forced Triton backward
    assert fa4.backward_path(128, 128, torch.bfloat16, cuda)[0] == "triton"
    monkeypatch.setattr(fa4, "BACKWARD", "fa4")  # forced FA4: refuses what it cannot run
    assert fa4.backward_path(128, 128, torch.bfloat16, cuda)[0] == "fa4"
    with pytest.raises(ValueError, match="block_size 128"):
        fa4.backward_path(64, 128, torch.bfloat16, cuda)
    monkeypatch.setattr(fa4, "BACKWARD", "fast")
    with pytest.raises(ValueError, match="BACKWARD"):
        fa4.backward_path(128, 128, torch.bfloat16, cuda)


def test_run_backward_dispatches_and_says_which_once(monkeypatch, caplog, fake_fa4):
    from sparse_vdit.kernels.triton import backward as triton_backward

    calls = []
    monkeypatch.setattr(fa4, "fa4_backward", lambda *args: calls.append("fa4") or "fa4 grads")
    monkeypatch.setattr(triton_backward, "backward", lambda *args, token_major: calls.append(("triton", token_major))
                        or "triton grads")  # fmt: skip
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    tables = {block: compile_layer([diagonal(0.5)] * 2, VideoLayout(2, 8, 16), block) for block in (64, 128)}
    with caplog.at_level(logging.WARNING, logger="sparse_vdit"):
        for _ in range(2):
            assert fa4.run_backward(q, q, q, q, q, None, tables[128], 0.1) == "fa4 grads"
            assert fa4.run_backward(q, q, q, q, q, None, tables[64], 0.1) == "triton grads"
    assert calls == ["fa4", ("triton", False)] * 2  # tensors already in each head's order: no permutation
    said = [r.getMessage() for r in caplog.records if "backend 'fa4' runs" in r.getMessage()]
    assert len(said) == 2, said  # once per kind of input
    assert "FA4 block-sparse backward" in said[0] and "block=128" in said[0]
    assert "Triton backward" in said[1] and "block=64" in said[1] and "block_size 128" in said[1]


@pytest.mark.parametrize("batch", [1, 2])
def test_fa4_route_matches_reference_gradients(batch, fake_fa4, monkeypatch):
    """The fa4 forward and backward as the op runs them (token-major heads permuted, padded text keys cut
    off), FA4 faked: exactly the reference backend's gradients; padded keys and skipped heads get zeros.
    Float64, so exact: the fake takes it (FA4 itself takes fp16 / bf16)."""
    monkeypatch.setattr(fa4, "BACKWARD", "fa4")
    monkeypatch.setattr(fa4, "backward_supports", lambda *args: (True, "the fake FA4 takes float64"))
    layout = VideoLayout(3, 12, 20, 40, "suffix", text_valid=30)  # 760 tokens: 6 blocks of 128, ragged; kv 750
    heads = [*MIXED, temporal(0.1)]
    table = compile_layer(heads, layout, 128)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, layout.num_tokens, len(heads), 16, generator=g, dtype=torch.float64)
                         for _ in range(4))  # fmt: skip
    k[:, layout.kv_len :] = 1e4  # attending to padded keys would show
    scale = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected_out = sparse_attention(*leaves, table, softmax_scale=scale, backend="reference")
    expected = torch.autograd.grad(expected_out, leaves, grad_out)

    moved = table.token_major_heads
    qp, kp, vp, gp = (reorder_heads(t, layout, moved) for t in (q, k, v, grad_out))
    out, lse = fa4.run_with_lse(qp, kp, vp, table, scale)
    grads = fa4.run_backward(gp, qp, kp, vp, out, lse, table, scale)
    assert fake_fa4.backward_calls == 1  # FA4's backward ran, not the Triton one
    grads = [reorder_heads(t, layout, moved, to_token_major=False) for t in grads]
    assert rel_rms(reorder_heads(out, layout, moved, to_token_major=False), expected_out.detach()) < 1e-12
    for name, a, b in zip(("dq", "dk", "dv"), grads, expected):
        assert not a.isnan().any(), name  # every element written
        assert rel_rms(a, b) < 1e-12, name
    for g_ in grads[1:]:
        assert torch.equal(g_[:, layout.kv_len :], torch.zeros_like(g_[:, layout.kv_len :]))
    assert all(torch.equal(g_[:, :, 1], torch.zeros_like(g_[:, :, 1])) for g_ in grads)  # the skipped head
