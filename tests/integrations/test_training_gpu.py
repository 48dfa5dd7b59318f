"""Training a patched tiny Wan on the GPU: the Triton backend's backward through the processor's fused
rotary and head order, gradient checkpointing, and Inductor (float32, against the masked-attention oracle)."""

from __future__ import annotations

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan
from tiny_diffusers import BLOCK, BUILDERS, oracle, undo_compile

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from test_training import MIXED  # noqa: E402  (the layers' pattern mix: token-major, skipped and dense heads)


def _model(device):
    model, inputs = BUILDERS["wan"](attention_head_dim=64)  # a head dim the Triton backend takes
    model = model.to(device).train()
    inputs = {name: value.to(device) if torch.is_tensor(value) else value for name, value in inputs.items()}
    return model, inputs


def _grads(model, inputs) -> dict:
    model.zero_grad(set_to_none=True)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    torch.nn.functional.mse_loss(model(**inputs)[0], target.to(inputs["hidden_states"].device)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(rel_rms(a[n], b[n]) for n in a if b[n].norm() > 0)


def test_gpu_triton_training_matches_the_oracle_eager_and_compiled():
    """Every parameter's gradient with the Triton backend equals the masked-attention oracle's, eager and
    with the blocks compiled by Inductor (fullgraph), gradient checkpointing on."""
    device = torch.device("cuda", torch.cuda.current_device())
    model, inputs = _model(device)
    with oracle("wan", MIXED):  # without checkpointing: the oracle numbers layers by call
        expected = _grads(model, inputs)
    model.enable_gradient_checkpointing()
    state = sparse_vdit.apply(model, Plan.from_layers(model, MIXED, block_size=BLOCK), backend="triton")
    assert state.fuses_rotary(device)  # the processor's fused rotary and head order, in training too
    try:
        eager = _grads(model, inputs)
        model.compile_repeated_blocks(fullgraph=True)
        compiled = _grads(model, inputs)
    finally:
        undo_compile(model)
    assert _worst(eager, expected) < 1e-4
    assert _worst(compiled, expected) < 1e-4
