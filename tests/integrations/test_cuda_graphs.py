"""Step tracking under CUDA graphs (#17): ``torch.compile(mode="reduce-overhead")`` replays follow the
denoising steps and the plan's step ranges; a hand-made ``torch.cuda.graph`` capture is refused.

Run on a GPU: ``pytest -m gpu -q tests/integrations/test_cuda_graphs.py``. The first test runs on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan
from sparse_vdit.integrations.diffusers import state_of
from sparse_vdit.patterns import diagonal
from tiny_diffusers import BLOCK, BUILDERS

pytest.importorskip("diffusers")
torch.set_num_threads(1)

TIMESTEPS = (900.0, 800.0, 700.0, 600.0, 500.0, 400.0)  # one generation: steps 0..5
WARMUP = 3  # plan: steps 0-2 dense, steps 3-5 a band (the CUDA graphs are recorded on a dense step)


def test_the_attention_op_runs_outside_cuda_graphs():
    """The compiled attention op (and its backward) carry ``cudagraph_unsafe``: Inductor partitions
    CUDA graphs around them, so they run every call at the current step."""
    import sparse_vdit.integrations.diffusers.processor  # noqa: F401  (registers the ops)

    for op in (torch.ops.sparse_vdit.diffusers_attention, torch.ops.sparse_vdit.diffusers_attention_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


def _wan_on_cuda():
    model, inputs = BUILDERS["wan"](batch=1)
    model = model.cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    return model, inputs


def _generation(model, inputs, state):
    """One forward per timestep of :data:`TIMESTEPS`: (outputs cloned out of the graphs' memory, steps seen)."""
    outputs, steps = [], []
    state.steps.reset()
    with torch.no_grad():
        for t in TIMESTEPS:
            out = model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})[0]
            outputs.append(out.clone())  # a CUDA graph's output is overwritten by its next replay
            steps.append(state.steps.step)
    return outputs, steps


@pytest.mark.gpu
def test_reduce_overhead_replays_follow_the_steps_and_the_plan():
    """A patched tiny Wan under ``torch.compile(mode="reduce-overhead")``: CUDA graphs are used (no
    cudagraph skip, the graph partitioned around the attention op), every call counts its step
    (0..5 for decreasing timesteps), and each replay equals the eager patched model at that step,
    the dense steps and the sparse ones after the plan's warm-up (graphs recorded on a dense step)."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    model, inputs = _wan_on_cuda()
    plan = Plan.uniform(model, diagonal(0.5), warmup_steps=WARMUP, block_size=BLOCK)
    sparse_vdit.apply(model, plan, backend="reference")
    eager = copy.deepcopy(model)  # its own state: counts its own steps
    eager_outputs, eager_steps = _generation(eager, inputs, state_of(eager))
    with torch.no_grad():
        dense_last = model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], TIMESTEPS[-1])})[0].clone()
    assert eager_steps == list(range(len(TIMESTEPS)))
    assert rel_rms(eager_outputs[-1], dense_last) > 1e-3  # the sparse steps really differ (first call: step 0, dense)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    try:
        with torch._inductor.config.patch(graph_partition=True):  # the default since torch 2.9; explicit for older
            outputs, steps = _generation(compiled, inputs, state_of(model))
            again, steps_again = _generation(compiled, inputs, state_of(model))  # all replays now
    finally:
        torch._dynamo.reset()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_partitions"] > 0, dict(counters["inductor"])
    assert steps == steps_again == list(range(len(TIMESTEPS)))
    for step, (out, out_again, ref) in enumerate(zip(outputs, again, eager_outputs)):
        assert rel_rms(out, ref) < 1e-4, (step, rel_rms(out, ref))
        assert rel_rms(out_again, ref) < 1e-4, (step, rel_rms(out_again, ref))
    sparse_vdit.remove(model)


@pytest.mark.gpu
def test_a_hand_made_cuda_graph_capture_is_refused_clearly():
    """``torch.cuda.graph`` around a patched forward: a clear error naming the supported way, raised
    before the step hook reads the timestep on the host (which would break the capture)."""
    model, inputs = _wan_on_cuda()
    sparse_vdit.apply(model, Plan.dense(model, block_size=BLOCK))
    with torch.no_grad():
        model(**inputs)  # warm-up outside the capture, as torch.cuda.graph asks
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=r'cannot be captured in a CUDA graph by hand .*mode="reduce-overhead"'):
            with torch.cuda.graph(graph):
                model(**inputs)
    assert state_of(model).steps.forwards == 1  # the refused call was not counted
    sparse_vdit.remove(model)
