"""Oracle block masks: tables from masks, block mass, and whole generations with both oracles (CPU)."""

import pytest
import torch

from sparse_vdit import VideoLayout, sparse_attention
from sparse_vdit.block_table import table_from_mask
from sparse_vdit.methods.oracle import PerCallOracle, StaticOracle, block_mass, top_blocks

torch.set_num_threads(1)
LAYOUTS = [VideoLayout(3, 5, 7), VideoLayout(2, 4, 4, text=9, text_position="suffix")]  # ragged last blocks


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_table_from_mask_visits_exactly_the_mask(layout):
    block = 16
    qb, kb = -(-layout.num_tokens // block), -(-layout.kv_len // block)
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(5, qb, kb, generator=gen) < 0.4
    keep[0] = True  # a full head
    keep[1, 0] = False  # an empty row
    keep[2, :, ::2] = True  # many runs per row
    table = table_from_mask(layout, block, keep, "test")
    for h in range(5):
        assert torch.equal(table.block_mask(h), keep[h])
    assert table.density == pytest.approx(keep.double().mean().item())
    assert table.patterns[0].name == "test" and not table.token_major.any()
    with pytest.raises(ValueError, match="blocks"):
        table_from_mask(layout, block, keep[:, :-1], "test")


def test_attention_through_a_mask_table_matches_the_masked_softmax():
    layout, block = LAYOUTS[1], 16
    b, n, h, d = 2, layout.num_tokens, 3, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(h, -(-n // block), -(-layout.kv_len // block), generator=gen) < 0.5
    keep[..., 0] = True  # every row sees something
    out = sparse_attention(q, k, v, table_from_mask(layout, block, keep), backend="reference")
    mask = keep.repeat_interleave(block, 1)[:, :n].repeat_interleave(block, 2)[:, :, : layout.kv_len]  # [h, n, kv]
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k[:, : layout.kv_len]) * d**-0.5
    ref = torch.einsum("bhnm,bmhd->bnhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v[:, : layout.kv_len])
    assert (out - ref).norm() / ref.norm() < 1e-12


def test_block_mass_is_the_attention_summed_per_block_at_any_chunk():
    layout, block = LAYOUTS[0], 16
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, layout.num_tokens, 3, 8, generator=gen) for _ in range(2))
    p = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()).mul(8**-0.5).softmax(-1)
    n, nb = layout.num_tokens, -(-layout.num_tokens // block)
    p = torch.nn.functional.pad(p, (0, nb * block - n, 0, nb * block - n))
    ref = p.reshape(2, 3, nb, block, nb, block).sum((0, 3, 5))
    for budget in (1, 1 << 30):  # one block of rows at a time, or all rows at once
        mass = block_mass(q, k, layout, block, budget=budget)
        assert torch.allclose(mass.double(), ref, atol=1e-5)
    assert mass.sum().item() == pytest.approx(2 * 3 * n, rel=1e-5)  # every row of every head sums to one


def test_top_blocks_keeps_the_heaviest_share_of_every_row():
    mass = torch.tensor([[[0.1, 0.5, 0.2, 0.9], [4.0, 3.0, 2.0, 1.0]]])
    assert top_blocks(mass, 0.5).tolist() == [[[False, True, False, True], [True, True, False, False]]]
    assert top_blocks(mass, 0.01).sum(-1).tolist() == [[1, 1]]  # at least one block
    with pytest.raises(ValueError):
        top_blocks(mass, 0.0)


class _Call:
    def __init__(self, step, layer, q, k, layout):
        self.step, self.layer, self.q, self.k, self.layout = step, layer, q, k, layout


def test_oracle_sources_return_tables_of_their_density_after_the_warm_up():
    layout, block = LAYOUTS[0], 16
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, layout.num_tokens, 2, 8, generator=gen) for _ in range(2))
    mass = {0: block_mass(q, k, layout, block)}
    for oracle in (PerCallOracle(0.5, block, warmup_steps=1), StaticOracle(mass, 0.5, block, warmup_steps=1)):
        assert oracle(_Call(0, 0, q, k, layout)) is None  # warm-up: dense
        table = oracle(_Call(1, 0, q, k, layout))
        assert torch.equal(torch.stack([table.block_mask(h) for h in range(2)]), top_blocks(mass[0], 0.5))
    static = StaticOracle(mass, 0.5, block)
    assert static(_Call(3, 1, q, k, layout)) is None  # a layer without calibration runs dense
    assert static(_Call(3, 0, q, k, layout)) is static(_Call(4, 0, q, k, layout))  # built once per layer
