"""Online top-p block selection and the hybrid: the rule against a plain torch version, tables, reuse (CPU)."""

import math

import pytest
import torch

from sparse_vdit import Plan, VideoLayout, compile_layer, sparse_attention
from sparse_vdit.block_table import expand_ranges, run_length
from sparse_vdit.methods import Hybrid, TopP
from sparse_vdit.methods.online import budget_blocks, mean_run_length, merge_heads, online_table, select_blocks
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip
from sparse_vdit.plan import ModelSpec, StepRange

torch.set_num_threads(1)
BLOCK = 16
LAYOUTS = [
    VideoLayout(3, 5, 7),  # 105 tokens: ragged last block
    VideoLayout(2, 5, 5, text=21, text_position="prefix"),  # text blocks straddle the video
    VideoLayout(3, 4, 6, text=20, text_position="suffix", text_valid=9),  # padded text: kv_len < N
]
SETTINGS = [(0.9, 0.0, 1.0), (0.5, 0.2, 0.4), (0.99, 0.3, 0.3)]  # (p, min share, max share)


def reference_keep(q, k, layout, block, p, min_density, max_density):
    """The rule written out plainly: loops over heads, samples, blocks and rows (float64)."""
    batch, n, heads, dim = q.shape
    kv = layout.kv_len
    qb, kb = math.ceil(n / block), math.ceil(kv / block)
    low = min(kb, max(1, math.ceil(min_density * kb - 1e-9)))
    high = min(kb, max(low, math.floor(max_density * kb + 1e-9)))
    text_valid = layout.text if layout.text_valid is None else layout.text_valid

    def overlaps(j, start, end):
        return j * block < end and (j + 1) * block > start

    keep = torch.zeros(heads, qb, kb, dtype=torch.bool)
    for h in range(heads):
        mass = torch.zeros(qb, kb, dtype=torch.float64)
        for b in range(batch):
            qm = torch.stack([q[b, i * block : min(n, (i + 1) * block), h].double().mean(0) for i in range(qb)])
            km = torch.stack([k[b, j * block : min(kv, (j + 1) * block), h].double().mean(0) for j in range(kb)])
            size = torch.tensor([min(kv, (j + 1) * block) - j * block for j in range(kb)], dtype=torch.float64)
            mass += torch.softmax(qm @ km.T * dim**-0.5 + size.log(), -1) / batch
        for i in range(qb):
            text_row = layout.text and overlaps(i, layout.text_start, layout.text_start + layout.text)
            forced = [j == i or text_row or (layout.text and overlaps(j, layout.text_start, layout.text_start + text_valid))
                      for j in range(kb)]  # fmt: skip
            order = sorted(range(kb), key=lambda j: (not forced[j], -float(mass[i, j]), j))
            total, count = 0.0, 0
            for j in order:
                if total >= p:
                    break
                total += float(mass[i, j])
                count += 1
            count = max(min(max(count, low), high), sum(forced))
            keep[h, i, order[:count]] = True
    return keep


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"p={s[0]}-budget={s[1]}-{s[2]}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_selection_equals_the_plain_rule(layout, setting):
    gen = torch.Generator().manual_seed(hash((layout.num_tokens, setting)) % 1000)
    q, k = (torch.randn(2, layout.num_tokens, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    q[:, : layout.num_tokens // 2] *= 3  # some rows peaked, some flat
    table = online_table(q, k, layout, BLOCK, *setting)
    expected = reference_keep(q, k, layout, BLOCK, *setting)
    got = torch.stack([table.block_mask(h) for h in range(3)])
    assert torch.equal(got, expected)
    count, index = expand_ranges(table.range_starts, table.range_ends)  # the filled index form is the ranges'
    assert torch.equal(count, table.kv_num_blocks)
    assert torch.equal(table.kv_indices[..., : index.shape[-1]], index)
    low, high = budget_blocks(layout, BLOCK, *setting[1:])
    video_rows = got[:, : -(-layout.video_tokens // BLOCK) - 1].sum(-1)  # rows without text queries
    assert (video_rows >= low).all()


def test_fixed_budget_is_a_top_k_and_attention_runs_on_the_table():
    layout = LAYOUTS[0]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    table = online_table(q, k, layout, BLOCK, 1.0, 0.5, 0.5)
    assert table.kv_num_blocks.unique().tolist() == [budget_blocks(layout, BLOCK, 0.5, 0.5)[0]]
    out = sparse_attention(q, k, v, table, backend="reference")
    assert torch.isfinite(out).all()
    full = online_table(q, k, layout, BLOCK, 1.0, 1.0, 1.0)  # every block: dense attention
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (sparse_attention(q, k, v, full, backend="reference") - ref).norm() / ref.norm() < 1e-12


def test_triton_runs_the_fixed_width_table_like_the_reference():
    pytest.importorskip("triton")
    layout = LAYOUTS[2]
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, layout.num_tokens, 2, 64, generator=gen) for _ in range(3))
    table = online_table(q, k, layout, BLOCK, 0.6, 0.1, 0.3)
    assert (table.range_starts == table.range_ends).any()  # unused slots are empty ranges
    ref = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    out = sparse_attention(q, k, v, table, backend="triton")
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


class _Call:
    def __init__(self, step, layer, q, k, layout, heads=None):
        self.step, self.layer, self.q, self.k, self.layout, self.heads = step, layer, q, k, layout, heads


def _plan(layout, warmup=1):
    spec = ModelSpec("wan", 2, 5)
    layer0 = (diagonal(1.0), dense(), multi_diagonal(0.2), skip(), dense())
    layer1 = (dense(),) * 5  # a layer the plan keeps dense goes online whole
    return Plan(spec, (StepRange(0, (layer0, layer1)),), warmup, 0, BLOCK, layout)


def test_hybrid_keeps_the_static_heads_exactly_and_selects_the_others():
    layout = LAYOUTS[1]
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, layout.num_tokens, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    plan = _plan(layout)
    hybrid = Hybrid(plan, TopP(0.8, min_density=0.1, max_density=0.5, block_size=BLOCK))
    assert hybrid(_Call(0, 0, q, k, layout)) is None  # the plan's warm-up
    table = hybrid(_Call(1, 0, q, k, layout))
    static = compile_layer(plan.patterns_for(1, 0), layout, BLOCK)
    for h in (0, 2, 3):  # stable heads: the plan's rows, token order included
        width = static.range_starts.shape[-1]
        assert torch.equal(table.range_starts[h, :, :width], static.range_starts[h])
        assert torch.equal(table.range_ends[h, :, :width], static.range_ends[h])
        assert (table.range_starts[h, :, width:] == table.range_ends[h, :, width:]).all()
        assert table.patterns[h] == static.patterns[h] and table.token_major[h] == static.token_major[h]
    chosen = online_table(q[:, :, [1, 4]], k[:, :, [1, 4]], layout, BLOCK, 0.8, 0.1, 0.5)
    for i, h in enumerate((1, 4)):
        assert torch.equal(table.block_mask(h), chosen.block_mask(i)) and not table.token_major[h]
        assert table.patterns[h].name == "top-p"
    count, index = expand_ranges(table.range_starts, table.range_ends)  # merged index lists: the ranges'
    assert torch.equal(table.kv_indices[..., : index.shape[-1]], index)
    assert (table.kv_indices[..., index.shape[-1] :] == index[..., -1:]).all()
    assert run_length(table) == mean_run_length([(2, 1.0), (3, run_length(static.heads((0, 2, 3))))]) > 1.0
    whole = hybrid(_Call(1, 1, q, k, layout))  # every head online
    assert run_length(whole) == 1.0  # declared by the selection: its key group
    assert torch.equal(torch.stack([whole.block_mask(h) for h in range(5)]),
                       torch.stack([online_table(q, k, layout, BLOCK, 0.8, 0.1, 0.5).block_mask(h) for h in range(5)]))
    with pytest.raises(ValueError):
        merge_heads(static, chosen, (1,))


def test_tables_are_reused_every_k_steps_and_reset_per_generation():
    layout = LAYOUTS[0]
    q, k = (torch.randn(1, layout.num_tokens, 2, 8) for _ in range(2))
    source = TopP(0.9, every=3, warmup_steps=1, block_size=BLOCK)
    assert source(_Call(0, 0, q, k, layout)) is None
    first = source(_Call(1, 0, q, k, layout))
    assert source(_Call(2, 0, q, k, layout)) is first and source(_Call(3, 0, q, k, layout)) is first
    assert source(_Call(4, 0, q, k, layout)) is not first
    assert source(_Call(1, 0, q, k, layout)) is not first  # a new generation recomputes
    assert (source.calls, source.reused) == (3, 2)
    every_call = TopP(0.9, block_size=BLOCK)
    assert every_call(_Call(0, 0, q, k, layout)) is not every_call(_Call(0, 0, q, k, layout))


@pytest.mark.parametrize("bad", [dict(p=0.0), dict(p=1.5), dict(min_density=0.6, max_density=0.5), dict(every=0),
                                 dict(block_size=24), dict(max_density=0.0)])  # fmt: skip
def test_bad_settings_raise(bad):
    with pytest.raises(ValueError):
        TopP(**{"p": 0.9, **bad})


def test_top_p_and_hybrid_run_through_the_diffusers_integration_on_the_tiny_organism():
    pytest.importorskip("diffusers")
    from sparse_vdit.compare import Method, run_method, score
    from sparse_vdit.organism import data as D
    from sparse_vdit.organism import model as M

    spec = M.OrganismSpec(frames=4, height=32, width=32)
    model = M.build_organism(M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                               ffn_dim=64)).eval()  # fmt: skip
    videos, run = [(D.sample_scene(1, 0, spec.frames).caption, 0)], dict(steps=3, spec=spec, backend="reference", block_size=BLOCK, progress=False)
    base = run_method(model, Method("dense", "dense"), videos, **run)
    sources = []

    def made(source):
        sources.append(source)
        return source

    full = run_method(model, Method("all", "source", source=lambda: made(TopP(1.0, min_density=1.0))), videos, **run)
    assert full.density == 1.0 and score(full, base)["psnr"] > 60  # every block kept: the dense video
    sparse = run_method(model, Method("top-p", "source", source=lambda: made(TopP(0.5, max_density=0.5))), videos, **run)
    assert sparse.density < 0.75 and torch.isfinite(sparse.videos).all()
    plan = Plan.from_layers(model, [(diagonal(1.0), dense())] * 2, block_size=BLOCK)
    hybrid = run_method(model, Method("hybrid", "source", source=lambda: Hybrid(plan, made(TopP(0.5, max_density=0.5)))),
                        videos, **run)  # fmt: skip
    assert hybrid.density < 1.0 and torch.isfinite(hybrid.videos).all()
    assert len(sources) == 3 and all(s.calls > 0 for s in sources)


def test_kmeans_equals_a_plain_loop():
    from sparse_vdit.methods.cluster import block_means, cluster_order, kmeans

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 50, 4, generator=gen, dtype=torch.float64)
    start = block_means(x, 16)  # 4 centroids: the positional blocks' means
    labels, centroids = kmeans(x, start, iters=3, budget=1)  # one head per chunk
    for g in range(3):
        c = start[g].clone()
        for round_ in range(4):
            assign = torch.tensor([min(range(4), key=lambda j: float(((x[g, i] - c[j]) ** 2).sum())) for i in range(50)])
            if round_ < 3:
                c = torch.stack([x[g, assign == j].mean(0) if (assign == j).any() else c[j] for j in range(4)])
        assert torch.equal(labels[g], assign)
        assert torch.allclose(centroids[g].double(), c, atol=1e-5)
        order = cluster_order(labels[g : g + 1])[0]
        assert torch.equal(labels[g, order], labels[g].sort(stable=True).values)
        assert all(order[i] < order[i + 1] for i in range(49) if labels[g, order[i]] == labels[g, order[i + 1]])


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda lay: lay.describe())
def test_clustered_selection_is_masked_attention_in_the_permuted_orders(layout):
    from sparse_vdit.methods.cluster import flat_index

    gen = torch.Generator().manual_seed(9)
    b, h, d = 2, 3, 8
    q, k, v = (torch.randn(b, layout.num_tokens, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    source = TopP(0.7, min_density=0.2, max_density=0.5, block_size=BLOCK, cluster_iters=2)
    made = source(_Call(0, 0, q, k, layout))
    out = made.attend(q, k, v, "reference")
    table = made.table
    assert table.num_heads == b * h and made.q is None  # one row per (sample, head); gathered q let go
    n, kv = layout.num_tokens, layout.kv_len
    q_pos, k_pos = (flat_index_positions(index, n, h) for index in (made.q_index, made.k_index))
    for s in range(b):
        for head in range(h):
            g = s * h + head
            keep = table.block_mask(g)  # [Qb, Kb] in the permuted orders
            rank_q = torch.empty(n, dtype=torch.long)
            rank_q[q_pos[:, g]] = torch.arange(n)  # where each token sits in the query order
            rank_k = torch.empty(n, dtype=torch.long)
            rank_k[k_pos[:, g]] = torch.arange(n)
            mask = keep[rank_q[:, None] // BLOCK, (rank_k[None, :kv] // BLOCK).clamp(max=keep.shape[1] - 1)]
            mask &= rank_k[None, :kv] < kv  # keys placed past kv_len (none: text stays in place)
            scores = q[s, :, head] @ k[s, :kv, head].T * d**-0.5
            ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[s, :kv, head]
            assert torch.allclose(out[s, :, head], ref, atol=1e-10)
            if layout.text:  # text stays in place in both orders
                text = torch.arange(layout.text_start, layout.text_start + layout.text)
                assert torch.equal(q_pos[text, g], text) and torch.equal(k_pos[text, g], text)
    assert flat_index(torch.arange(layout.video_tokens).expand(b * h, -1), layout, b, h).shape == (n, b * h)


def flat_index_positions(index, n, heads):
    """Sequence position each row of a flat index reads (inverse of ``(b * N + pos) * H + h``)."""
    return (index // heads) % n


def test_clustered_top_p_runs_through_the_diffusers_integration():
    pytest.importorskip("diffusers")
    from sparse_vdit.compare import Method, run_method
    from sparse_vdit.organism import data as D
    from sparse_vdit.organism import model as M

    spec = M.OrganismSpec(frames=4, height=32, width=32)
    model = M.build_organism(M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                               ffn_dim=64)).eval()  # fmt: skip
    videos = [(D.sample_scene(1, 0, spec.frames).caption, 0)]
    source = TopP(0.5, max_density=0.5, cluster_iters=2, every=2)
    result = run_method(model, Method("clustered", "source", source=lambda: source), videos, steps=3, spec=spec,
                        backend="reference", block_size=BLOCK, progress=False)  # fmt: skip
    assert 0 < result.density < 0.75 and torch.isfinite(result.videos).all()
    assert source.calls > 0 and source.reused > 0 and source.clusters.centroids


def plain_top_k(mass, forced, count):
    """The fixed-budget rule written out: per row the forced blocks, then the others by mass, ties to the lower block."""
    heads, qb, kb = mass.shape
    keep = torch.zeros(mass.shape, dtype=torch.bool)
    for h in range(heads):
        for i in range(qb):
            order = sorted(range(kb), key=lambda j: (not bool(forced[i, j]), -float(mass[h, i, j]), j))
            keep[h, i, order[: max(count, int(forced[i].sum()))]] = True
    return keep


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_fixed_budget_top_k_breaks_ties_like_the_sorted_rule(layout):
    from sparse_vdit.methods.online import forced_blocks, top_k_keep

    forced = forced_blocks(layout, BLOCK, torch.device("cpu"))
    qb, kb = forced.shape
    gen = torch.Generator().manual_seed(3)
    mass = torch.randint(0, 3, (2, qb, kb), generator=gen).float() / 8  # many exact ties
    mass[1] = 1.0 / kb  # a flat head: every block tied
    for count in (1, 2, kb // 2, kb):
        assert torch.equal(top_k_keep(mass, forced, count), plain_top_k(mass, forced, count))
        assert torch.equal(select_blocks(mass, forced, 1.0, count, count), plain_top_k(mass, forced, count))


def test_key_groups_select_aligned_runs_by_group_mass():
    from sparse_vdit.methods.online import forced_blocks, group_budget, pooled_mass

    layout = VideoLayout(4, 6, 7)  # 168 tokens: 11 key blocks of 16, the last group short
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, layout.num_tokens, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    table = online_table(q, k, layout, BLOCK, 1.0, 0.5, 0.5, key_group=2)
    got = torch.stack([table.block_mask(h) for h in range(2)])
    mass = pooled_mass(q, k, layout, BLOCK)
    pairs = torch.nn.functional.pad(mass, (0, 1)).unflatten(-1, (6, 2)).sum(-1)  # group mass, by hand
    forced = forced_blocks(layout, BLOCK, torch.device("cpu"))
    forced_pairs = torch.nn.functional.pad(forced, (0, 1)).unflatten(-1, (6, 2)).any(-1)
    low, high = group_budget(layout, BLOCK, 0.5, 0.5, 2)
    assert (low, high) == (3, 3)
    expected = plain_top_k(pairs, forced_pairs, high).repeat_interleave(2, -1)[..., :11]
    assert torch.equal(got, expected)
    assert (got[..., 0:10:2] == got[..., 1:10:2]).all() and got[:, range(11), range(11)].all()
    assert run_length(table) == 2.0  # declared: the rule keeps runs of at least a group
    with pytest.raises(ValueError):
        online_table(q, k, layout, BLOCK, key_group=0)


def test_mean_run_length_of_joined_heads():
    assert mean_run_length([(2, 1.0), (2, 3.0)]) == 1.5  # blocks over ranges: 4 / (2 + 2 / 3)
    assert mean_run_length([(3, 2.0), (0, 5.0), (1, 0.0)]) == 2.0 and mean_run_length([]) == 0.0


def test_top_p_source_passes_its_key_group_and_checks_its_options():
    layout = LAYOUTS[0]
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, layout.num_tokens, 2, 8, generator=gen) for _ in range(2))
    source = TopP(1.0, min_density=0.5, max_density=0.5, block_size=BLOCK, key_group=2, compile="never")
    got = source(_Call(0, 0, q, k, layout))
    expected = online_table(q, k, layout, BLOCK, 1.0, 0.5, 0.5, key_group=2)
    assert torch.equal(got.range_starts, expected.range_starts) and torch.equal(got.range_ends, expected.range_ends)
    for bad in (dict(key_group=0), dict(key_group=True), dict(compile="sometimes")):
        with pytest.raises(ValueError):
            TopP(0.9, **bad)
    # the Triton selection (compile="triton") was removed (#22): the error names the valid choices
    with pytest.raises(ValueError, match=r"compile must be None or one of \('cuda', 'always', 'never'\), got 'triton'"):
        TopP(0.9, compile="triton")
    with pytest.raises(ValueError, match="'cuda', 'always', 'never'"):
        online_table(q, k, layout, BLOCK, compile="triton")
