"""diffusers' TorchCompileTesterMixin checks (``tests/models/testing_utils/compile.py``), run with a
dense plan applied, on diffusers' own tiny test configs (#17).

diffusers runs them on an accelerator with Inductor; here they run on the CPU with dynamo's
``eager`` backend: the graph capture (``fullgraph=True``: no graph break) and the recompilation
guards are dynamo's and the same; Inductor's code generation is not exercised (the compiled
training and fused-rotary tests run ``aot_eager``; the GPU benchmarks run Inductor).
"""

from __future__ import annotations

import pytest
import torch

from diffusers_model_configs import CASES
from sparse_vdit.integrations.diffusers import state_of
from test_diffusers_model_suite import FAMILIES, assert_sparse, forward, unpatched_and_patched

pytest.importorskip("diffusers")
torch.set_num_threads(1)

# unpatched too: HunyuanVideo 1.5's forward branches on ``torch.all(image_embeds == 0)`` (dynamo:
# "Data-dependent branching"), so whole-model fullgraph capture fails; diffusers does not run its
# compile tests on it
WHOLE_MODEL_SKIPS = {"hunyuan_video15": "diffusers' HunyuanVideo15Transformer3DModel.forward branches on data "
                                        "(torch.all(image_embeds == 0)): no fullgraph capture, unpatched too"}  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """TorchCompileTesterMixin's setup / teardown: ``torch.compiler.reset()``."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_compile_recompilation_and_graph_break(name):
    """Mirrors TorchCompileTesterMixin.test_torch_compile_recompilation_and_graph_break: the patched
    model under ``torch.compile(fullgraph=True)`` runs twice with ``error_on_recompile``; here also
    its output is the unpatched output and the step hook counted both calls."""
    if name in WHOLE_MODEL_SKIPS:
        pytest.skip(WHOLE_MODEL_SKIPS[name])
    reference, model, case = unpatched_and_patched(name)
    state = state_of(model)
    before = state.steps.forwards
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = forward(compiled, case.inputs())
        second = forward(compiled, case.inputs())
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert state.steps.forwards == before + 2
    assert_sparse(model)


REPEATED = [n for n in FAMILIES if CASES[n].cls()._repeated_blocks]


@pytest.mark.parametrize("name", REPEATED)
def test_torch_compile_repeated_blocks(name):
    """Mirrors TorchCompileTesterMixin.test_torch_compile_repeated_blocks: ``compile_repeated_blocks(
    fullgraph=True)`` on the patched model, two calls within diffusers' recompile limit (1; 2 for
    Wan VACE's two block types), the limit made an error (``fail_on_recompile_limit_hit``; dynamo
    would fall back to eager silently); here also both outputs are the unpatched output."""
    reference, model, case = unpatched_and_patched(name)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    limit = 2 if name == "wan_vace" else 1
    try:
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            first = forward(model, case.inputs())
            second = forward(model, case.inputs())
    finally:
        for block in model.modules():
            if getattr(block, "_compiled_call_impl", None) is not None:
                block._compiled_call_impl = None
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert_sparse(model)
