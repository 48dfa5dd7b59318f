"""What users do to patched models: deep copies, processor and backend changes, torch.export,
shapes refused at apply, hints that name real APIs (issue #17)."""

import copy
import importlib

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan
from sparse_vdit.integrations.diffusers import family_of, state_of
from sparse_vdit.patterns import diagonal
from tiny_diffusers import BLOCK, BUILDERS

pytest.importorskip("diffusers")


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def band(model):
    return Plan.uniform(model, diagonal(0.5), block_size=BLOCK)


def processors(model):
    return [m.processor for m in family_of(model).attention_modules(model)]


def test_deepcopy_gives_an_independent_working_copy():
    model, inputs = BUILDERS["wan"]()
    dense_out = run(model, inputs)
    sparse_vdit.apply(model, band(model), backend="reference")
    sparse_out = run(model, inputs)
    twin = copy.deepcopy(model)
    assert state_of(twin) is not state_of(model) and state_of(twin).handle != state_of(model).handle
    assert torch.equal(run(twin, inputs), sparse_out)  # the copy tracks its own steps and grid
    sparse_vdit.remove(model)
    assert torch.equal(run(model, inputs), dense_out)
    assert torch.equal(run(twin, inputs), sparse_out)  # removing the original leaves the copy patched
    sparse_vdit.remove(twin)
    assert torch.equal(run(twin, inputs), dense_out)


def test_set_attn_processor_with_a_stock_processor_keeps_sparse_attention():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs = BUILDERS["wan"]()
    dense_out = run(model, inputs)
    sparse_vdit.apply(model, band(model), backend="reference")
    sparse_out = run(model, inputs)
    model.set_attn_processor(WanAttnProcessor())
    assert torch.equal(run(model, inputs), sparse_out)
    assert all(type(p).__name__ == "SparseAttnProcessor" for p in processors(model))
    sparse_vdit.remove(model)
    assert all(type(p) is WanAttnProcessor for p in processors(model))
    assert torch.equal(run(model, inputs), dense_out)


def test_cogvideox_fuse_qkv_projections_after_apply_keeps_sparse_attention():
    model, inputs = BUILDERS["cogvideox"]()
    sparse_vdit.apply(model, band(model), backend="reference")
    sparse_out = run(model, inputs)
    model.fuse_qkv_projections()
    assert rel_rms(run(model, inputs), sparse_out) < 1e-5
    assert all(type(p).__name__ == "SparseAttnProcessor" for p in processors(model))
    sparse_vdit.remove(model)
    assert all(type(p).__name__ == "FusedCogVideoXAttnProcessor2_0" for p in processors(model))
    fused_dense = run(model, inputs)
    model.unfuse_qkv_projections()
    assert rel_rms(fused_dense, sparse_out) > 1e-3


def test_a_foreign_processor_set_after_apply_warns_and_stays_after_remove():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class OtherLibraryProcessor(WanAttnProcessor):
        pass

    model, inputs = BUILDERS["wan"]()
    dense_out = run(model, inputs)
    sparse_vdit.apply(model, band(model), backend="reference")
    foreign = OtherLibraryProcessor()
    model.blocks[1].attn1.set_processor(foreign)
    with pytest.warns(RuntimeWarning, match=r"1 self-attention layer\(s\) \(1\) now run OtherLibraryProcessor"):
        run(model, inputs)
    sparse_vdit.remove(model)
    assert model.blocks[1].attn1.processor is foreign
    assert type(model.blocks[0].attn1.processor) is WanAttnProcessor
    assert torch.equal(run(model, inputs), dense_out)


def test_set_attention_backend_warns_and_reaches_the_restored_processors():
    model, inputs = BUILDERS["wan"]()
    originals = processors(model)
    sparse_vdit.apply(model, band(model), backend="reference")
    sparse_out = run(model, inputs)
    with pytest.warns(RuntimeWarning, match="does not change the self-attention layers sparse-vdit runs"):
        model.set_attention_backend("native")
    assert torch.equal(run(model, inputs), sparse_out)
    sparse_vdit.remove(model)
    assert all(p is o and str(getattr(p._attention_backend, "value", p._attention_backend)) == "native"
               for p, o in zip(processors(model), originals))  # fmt: skip


def test_step_tracking_under_torch_export():
    model, inputs = BUILDERS["wan"]()
    args = {k: v for k, v in inputs.items() if k != "return_dict"}
    sparse_vdit.apply(model, band(model), backend="reference")
    expected = run(model, inputs)
    exported = torch.export.export(model, (), args).module()
    state = state_of(model)
    state.steps.reset()
    with torch.no_grad():
        out = exported(**args)[0]
        assert state.steps.step == 0 and state.steps.grid == (3, 4, 4)
        exported(**{**args, "timestep": torch.full_like(args["timestep"], 800.0)})
    assert state.steps.step == 1  # counted at run time, from the timestep tensor
    assert rel_rms(out, expected) < 1e-6


def test_head_dim_the_kernels_cannot_take_is_refused_at_apply():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1)  # fmt: skip
    before = processors(model)
    with pytest.raises(ValueError, match="head_dim 12 not supported"):
        sparse_vdit.apply(model, Plan.dense(model))
    assert processors(model) == before and state_of(model) is None and not model._forward_pre_hooks


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "cogvideox"])
def test_the_hint_for_a_foreign_processor_names_a_real_api(name):
    model, _ = BUILDERS[name]()
    family = family_of(model)
    model.set_attn_processor(lambda *a, **k: None)
    with pytest.raises(RuntimeError, match=r"model\.set_attn_processor\((\w+)\(\)\) with \1 from ([\w.]+)") as err:
        sparse_vdit.apply(model, Plan.dense(model))
    assert "set_default_attn_processor" not in str(err.value)
    stock, module = _hint(str(err.value))
    assert stock in family.processor_classes and hasattr(model, "set_attn_processor")
    assert isinstance(getattr(importlib.import_module(module), stock)(), object)


def _hint(message):
    import re

    return re.search(r"set_attn_processor\((\w+)\(\)\) with \1 from ([\w.]+)", message).groups()


def test_the_hint_for_a_model_without_set_attn_processor_names_the_processor_attribute():
    from tiny_diffusers import mochi

    model, _ = mochi()
    assert not hasattr(model, "set_attn_processor")
    for module in family_of(model).attention_modules(model):
        module.processor = lambda *a, **k: None
    with pytest.raises(RuntimeError, match=r"module\.processor = MochiAttnProcessor2_0\(\) on each self-attention "
                                           r"module with MochiAttnProcessor2_0 from diffusers\.models\.attention_processor"):  # fmt: skip
        sparse_vdit.apply(model, Plan.dense(model))
    assert hasattr(importlib.import_module("diffusers.models.attention_processor"), "MochiAttnProcessor2_0")


def test_context_parallelism_on_a_family_without_it_is_refused_clearly(monkeypatch):
    from diffusers import ContextParallelConfig
    from tiny_diffusers import ltx

    from sparse_vdit.integrations.diffusers import parallel

    # every family runs it today (tests/integrations/test_context_parallel.py): one taken off the list
    monkeypatch.setattr(parallel, "CP_FAMILIES", tuple(f for f in parallel.CP_FAMILIES if f != "ltx_video"))
    model, _ = ltx()
    with pytest.raises(NotImplementedError, match="context parallelism on LTXVideoTransformer3DModel is not supported"):
        sparse_vdit.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=2))
    assert model._parallel_config is None
