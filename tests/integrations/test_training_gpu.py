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
    out = model(**inputs)[0]
    torch.nn.functional.mse_loss(out, target.to(out.device, out.dtype)).backward()
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


@pytest.mark.parametrize("backend, kind", [("triton", "dense"), ("triton", "sparse"), ("fa4", "sparse"), ("fa4", "dense")])
def test_gpu_compiled_bf16_training_runs_from_the_lse(backend, kind, monkeypatch):
    """A tiny Wan in bf16 (head dim 64, 128-token blocks: FA4's backward tiles), blocks compiled by Inductor: every
    call's backward runs from its output and LSE (the op's route: the plan's tables through head order on the
    backend, dense layers by cuDNN), no call is replayed, and the gradients equal eager training's."""
    from sparse_vdit.kernels import registry
    from sparse_vdit.patterns import dense, diagonal, multi_diagonal, vertical
    from tiny_diffusers import wan

    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = registry.available(backend, device)
    if not ok:
        pytest.skip(why)
    model, inputs = wan(batch=1, num_attention_heads=2, attention_head_dim=64)
    inputs["hidden_states"] = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # 3 x 256 tokens
    model = model.to(device, torch.bfloat16).train()
    inputs = {n: x.to(device, torch.bfloat16 if x.is_floating_point() else x.dtype) if torch.is_tensor(x) else x
              for n, x in inputs.items()}  # fmt: skip
    layers = ([[dense(), dense()]] * 2 if kind == "dense" else
              [[multi_diagonal(0.2), diagonal(0.5)], [vertical(((0.0, 1.0),), 0.3), multi_diagonal(0.3)]])  # fmt: skip
    state = sparse_vdit.apply(model, Plan.from_layers(model, layers, block_size=128, warmup_steps=0), backend=backend)
    replays = []
    attend = state.attend
    try:
        eager = _grads(model, inputs)
        monkeypatch.setattr(state, "attend", lambda *a, **kw: replays.append(1) or attend(*a, **kw))
        model.compile_repeated_blocks(fullgraph=True)
        compiled = _grads(model, inputs)
    finally:
        undo_compile(model)
    assert not replays
    assert _worst(compiled, eager) < 2e-2
