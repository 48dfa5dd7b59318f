"""Training a patched tiny Wan (CPU): PEFT LoRA, gradient checkpointing, torch.compile.

Gradients are compared with the unpatched model (dense plan) and with the masked-attention oracle
of ``tiny_diffusers`` (sparse plan), both float32 on the reference backend.
"""

from __future__ import annotations

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical
from tiny_diffusers import BLOCK, BUILDERS, oracle, undo_compile

pytest.importorskip("diffusers")

torch.set_num_threads(1)
MIXED = [
    [dense(), diagonal(0.5), multi_diagonal(0.2), vertical(((0.0, 1.0),), 0.3)],
    [skip(), temporal(0.1), spatial(1.0), diagonal(0.0)],
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _model(lora: bool = False, checkpointing: bool = False):
    model, inputs = BUILDERS["wan"]()
    model.train()
    if lora:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, inputs


def _loss_and_grads(model, inputs):
    """Loss of one denoising-style step and the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    loss = torch.nn.functional.mse_loss(model(**inputs)[0], target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return float(loss), grads


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(rel_rms(a[n], b[n]) for n in a if b[n].norm() > 0)
    assert worst < tol, worst


def test_dense_plan_gives_the_unpatched_gradients():
    model, inputs = _model()
    _, expected = _loss_and_grads(model, inputs)
    with sparse_vdit.sparse(model, Plan.dense(model, block_size=BLOCK)):
        _, got = _loss_and_grads(model, inputs)
    _close(got, expected, 1e-5)


def test_sparse_plan_lora_gradients_match_masked_attention_oracle():
    pytest.importorskip("peft")
    model, inputs = _model(lora=True)
    with oracle("wan", MIXED):
        _, expected = _loss_and_grads(model, inputs)
    assert all(".lora_" in n for n in expected)  # only the adapters train
    with sparse_vdit.sparse(model, Plan.from_layers(model, MIXED, block_size=BLOCK), backend="reference"):
        _, got = _loss_and_grads(model, inputs)
    _close(got, expected, 1e-5)


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    """The recomputed blocks (in the backward) run the same patterns as the first forward."""
    pytest.importorskip("peft")
    plain, inputs = _model(lora=True)
    checkpointed, _ = _model(lora=True, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    plan = Plan.from_layers(plain, MIXED, block_size=BLOCK)
    with sparse_vdit.sparse(plain, plan, backend="reference"):
        _, expected = _loss_and_grads(plain, inputs)
    with sparse_vdit.sparse(checkpointed, plan, backend="reference"):
        _, got = _loss_and_grads(checkpointed, inputs)
    _close(got, expected, 1e-6)


def test_lora_on_a_sparse_plan_lowers_the_loss():
    pytest.importorskip("peft")
    model, inputs = _model(lora=True, checkpointing=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    with sparse_vdit.sparse(model, Plan.from_layers(model, MIXED, block_size=BLOCK), backend="reference"):
        losses = []
        for _ in range(4):
            loss, _ = _loss_and_grads(model, inputs)
            optimizer.step()
            losses.append(loss)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_training_matches_eager(checkpointing):
    """Blocks compiled (fullgraph, aot_eager): the opaque attention op differentiates like eager."""
    import torch._dynamo

    pytest.importorskip("peft")
    torch._dynamo.reset()
    model, inputs = _model(lora=True, checkpointing=checkpointing)
    inputs = dict(inputs, hidden_states=inputs["hidden_states"][:1], timestep=inputs["timestep"][:1],
                  encoder_hidden_states=inputs["encoder_hidden_states"][:1])  # fmt: skip
    state = sparse_vdit.apply(model, Plan.from_layers(model, MIXED, block_size=BLOCK), backend="reference")
    try:
        _, eager = _loss_and_grads(model, inputs)
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        calls, asked = [], []
        state.observers.append(lambda call, patterns, out: calls.append(call.layer))
        source = state.pattern_source
        state.pattern_source = lambda call: asked.append(call.layer) or source(call)
        _, compiled = _loss_and_grads(model, inputs)
        # observers see the forward calls only (checkpointing reruns blocks 1, 0 in the backward) ...
        assert calls == ([0, 1, 1, 0] if checkpointing else [0, 1])
        # ... and the op's backward replayed each layer once, right after its rerun
        assert asked == ([0, 1, 1, 1, 0, 0] if checkpointing else [0, 1, 1, 0])
    finally:
        undo_compile(model)
    _close(compiled, eager, 1e-5)
