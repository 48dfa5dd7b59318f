"""Skipped heads in the search: error="output" weighs each head by what it adds to the layer's output."""

import pytest
import torch

pytest.importorskip("diffusers")

import sparse_vdit  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer, organism_sampler, sparse_attention  # noqa: E402
from sparse_vdit.integrations.diffusers.search import output_grams  # noqa: E402
from sparse_vdit.methods.candidates import tuned_candidates  # noqa: E402
from sparse_vdit.methods.estimate import output_errors, probe  # noqa: E402
from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.patterns import dense  # noqa: E402

torch.set_num_threads(1)
BLOCK = 16
SPEC = M.OrganismSpec(frames=4, height=32, width=32)  # 4 x 8 x 8 = 256 tokens
HEADS, DIM = 4, 16


def test_output_errors_through_the_projection_equal_the_projected_outputs():
    gen = torch.Generator().manual_seed(0)
    out, ref = (torch.randn(2, 40, HEADS, DIM, generator=gen) for _ in range(2))
    weight = torch.randn(24, HEADS * DIM, generator=gen)  # [model dim, heads x head dim]
    w = weight.reshape(24, HEADS, DIM).transpose(0, 1)  # [H, out, D]
    sq, norms, count = output_errors(out, ref, w.transpose(1, 2) @ w)
    for h in range(HEADS):
        projected = lambda x: x[:, :, h] @ w[h].T  # noqa: E731 - what head h adds to the layer's output
        assert sq[h].item() == pytest.approx((projected(out) - projected(ref)).double().square().sum().item(), rel=1e-5)
        assert norms[h].item() == pytest.approx(projected(ref).double().square().sum().item(), rel=1e-5)
    plain = output_errors(out, ref)
    identity = output_errors(out, ref, torch.eye(DIM).expand(HEADS, DIM, DIM))
    assert torch.allclose(plain[0], identity[0]) and torch.allclose(plain[1], identity[1]) and count == plain[2]


def test_probe_with_a_gram_on_every_row_equals_full_output_errors():
    layout = VideoLayout(3, 5, 9)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, layout.num_tokens, HEADS, DIM, generator=gen) for _ in range(3))
    w = torch.randn(HEADS, 20, DIM, generator=gen)
    gram = w.transpose(1, 2) @ w
    cands = tuned_candidates()
    result = probe(q, k, v, layout, BLOCK, torch.arange(layout.num_tokens), cands, kernel="torch", gram=gram)
    ref = sparse_attention(q, k, v, compile_layer([dense()] * HEADS, layout, BLOCK), backend="reference")
    for i, heads in enumerate(result.patterns):
        out = sparse_attention(q, k, v, compile_layer(heads, layout, BLOCK), backend="reference")
        sq, ref_sq, _ = output_errors(out, ref, gram)
        assert torch.allclose(result.sq[i], sq, rtol=1e-4, atol=1e-6), cands[i].key
    assert torch.allclose(result.ref, ref_sq, rtol=1e-5)


@pytest.fixture(scope="module")
def organism_with_a_silent_head():
    """A tiny random organism whose head 0 adds nothing to any layer's output (its W_o columns are zero)."""
    config = M.organism_config(SPEC, num_layers=2, num_attention_heads=HEADS, attention_head_dim=DIM, ffn_dim=64)
    model = M.build_organism(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_out[0].weight[:, :DIM] = 0
    return model


def skipped(plan):
    return {(layer, h) for r in plan.schedule for layer, heads in enumerate(r.layers) for h, p in enumerate(heads)
            if p.name == "skip"}  # fmt: skip


@pytest.mark.parametrize("estimate", ["sampled", "full"])
def test_output_error_skips_the_free_head_and_only_it(organism_with_a_silent_head, estimate):
    model = organism_with_a_silent_head
    grams = output_grams(model)
    assert len(grams) == 2 and grams[0].shape == (HEADS, DIM, DIM) and grams[0][0].abs().max() == 0
    caption = [D.sample_scene(0, 0).caption]
    common = dict(steps=3, sampler=organism_sampler(model, SPEC), candidates=["skip"], block_size=BLOCK,
                  warmup_steps=0, estimate=estimate, progress=False)  # fmt: skip
    plan = sparse_vdit.search(model, caption, error="output", **common)
    assert skipped(plan) == {(0, 0), (1, 0)}  # head 0 of both layers, in every step range
    assert not skipped(sparse_vdit.search(model, caption, **common))  # relative error: a skip costs 1.0, never taken
    dense_video = M.sample(model, caption, steps=3, spec=SPEC, progress=False)
    with sparse_vdit.sparse(model, plan, backend="reference"):
        video = M.sample(model, caption, steps=3, spec=SPEC, progress=False)
    assert torch.allclose(video, dense_video, atol=1e-4)  # the skip was free
