"""diffusers' own model checks, run with a dense plan applied, on diffusers' own tiny test configs (#17).

Each test mirrors one check of diffusers' model-test mixins (``tests/models/testing_utils``:
``common.py`` ModelTesterMixin, ``training.py`` TrainingTesterMixin, ``attention.py``
AttentionTesterMixin) and asserts what that check asserts, on a model patched by
``sparse_vdit.apply(model, Plan.dense(model))``; most also assert that the output (or gradient) is
the unpatched model's, bitwise, since a dense plan must change nothing. The configs and inputs are
the families' own (``diffusers_model_configs.py``; head sizes our kernels refuse are raised to 16).
TorchCompileTesterMixin's checks are in ``test_diffusers_model_suite_compile.py``. Not mirrored:
what needs the Hub, several accelerators, quantisation or offloading, and mixed-precision training
(diffusers skips it on the CPU). Low precision runs in float16: in bfloat16, the fused rotary (the
default; the Triton interpreter on the CPU) is not bitwise the model's own rotary (HunyuanVideo: 2e-3
relative at the output, measured on the CPU; ``state.fuse_rotary = False`` is bitwise).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import sparse_vdit
from diffusers_model_configs import CASES
from sparse_vdit import Plan
from sparse_vdit.integrations.diffusers import family_of, state_of

pytest.importorskip("diffusers")
torch.set_num_threads(1)

FAMILIES = list(CASES)


def patched(model):
    """``model`` with a dense plan applied (block 16: tables fit the tiny token grids)."""
    sparse_vdit.apply(model, Plan.dense(model, block_size=16))
    assert state_of(model) is not None
    return model


def forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, return_dict=False, **kwargs)[0]


def sparse_processors(model) -> list:
    return [m.processor for m in family_of(model).attention_modules(model)]


def assert_sparse(model) -> None:
    names = {type(p).__name__ for p in sparse_processors(model)}
    assert names == {"SparseAttnProcessor"}, names


def unpatched_and_patched(name, train=False):
    """The family's unpatched output and a patched model of the same weights."""
    case = CASES[name]
    model = case.build().train(train)
    reference = forward(model, case.inputs())
    return reference, patched(model), case


# --- ModelTesterMixin (common.py) ---------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_output(name):
    """Mirrors ModelTesterMixin.test_output: an output of (batch, *output_shape); and it is the
    unpatched output, bitwise; the sparse processors really ran."""
    reference, model, case = unpatched_and_patched(name)
    out = forward(model, case.inputs())
    batch = case.inputs()["hidden_states"].shape[0]
    assert out is not None and tuple(out.shape) == (batch, *case.output_shape)
    assert torch.equal(out, reference)
    assert_sparse(model)
    assert state_of(model).last_layout is not None  # the patched layers computed the attention


@pytest.mark.parametrize("name", FAMILIES)
def test_determinism(name):
    """Mirrors ModelTesterMixin.test_determinism: two forwards agree within 1e-5 (NaNs masked)."""
    _, model, case = unpatched_and_patched(name)
    first, second = forward(model, case.inputs()).flatten(), forward(model, case.inputs()).flatten()
    keep = ~(first.isnan() | second.isnan())
    torch.testing.assert_close(first[keep], second[keep], atol=1e-5, rtol=0)
    assert keep.all()


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_equivalence(name):
    """Mirrors ModelTesterMixin.test_outputs_equivalence: ``return_dict=True`` and ``False`` give
    the same tensors."""
    _, model, case = unpatched_and_patched(name)
    with torch.no_grad():
        as_dict = model(**case.inputs())
        as_tuple = model(**case.inputs(), return_dict=False)
    values = list(as_dict.values())
    assert len(values) == len(as_tuple)
    for a, b in zip(as_tuple, values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_from_save_pretrained(name, tmp_path):
    """Mirrors ModelTesterMixin.test_from_save_pretrained: a patched model's ``save_pretrained``
    loads back with the same parameter names and shapes (the patch adds no weights) and the loaded
    model gives the same output (within 5e-5; here bitwise, patched or not)."""
    reference, model, case = unpatched_and_patched(name)
    model.save_pretrained(tmp_path)
    loaded = case.cls().from_pretrained(tmp_path).eval()
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() == case.build().state_dict().keys()
    assert all(saved[k].shape == restored[k].shape for k in saved)
    assert state_of(loaded) is None  # nothing of the patch is saved
    loaded_reference = forward(loaded, case.inputs())
    torch.testing.assert_close(loaded_reference, reference, atol=5e-5, rtol=5e-5)
    assert torch.equal(forward(patched(loaded), case.inputs()), loaded_reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_from_save_pretrained_dtype(name, tmp_path):
    """Mirrors ModelTesterMixin.test_from_save_pretrained_dtype (fp16): a patched model cast with
    ``.to(torch.float16)`` saves and loads back as fp16 (``low_cpu_mem_usage`` on, and off where the
    model keeps no modules in float32, as diffusers does); the
    loaded model, patched, gives the unpatched loaded model's fp16 output on the CPU."""
    _, model, case = unpatched_and_patched(name)
    model.to(torch.float16)
    model.save_pretrained(tmp_path)
    cls = case.cls()
    for low_memory in (True, False) if cls._keep_in_fp32_modules is None else (True,):
        loaded = cls.from_pretrained(tmp_path, low_cpu_mem_usage=low_memory, torch_dtype=torch.float16).eval()
        assert loaded.dtype == torch.float16
    inputs = {k: v.to(torch.float16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in case.inputs().items()}  # fmt: skip
    reference = forward(loaded, inputs)
    out = forward(patched(loaded), inputs)
    assert out.dtype == reference.dtype and torch.equal(out, reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_getattr_is_correct(name, recwarn):
    """Mirrors ModelTesterMixin.test_getattr_is_correct on a patched model: plain attributes and
    methods without warnings, config attributes with a FutureWarning, a missing attribute raises
    AttributeError with diffusers' message."""
    _, model, _ = unpatched_and_patched(name)
    model.dummy_attribute = 5
    model.register_to_config(test_attribute=5)
    assert hasattr(model, "dummy_attribute") and model.dummy_attribute == 5
    assert model.save_pretrained == getattr(model, "save_pretrained")
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    with pytest.warns(FutureWarning):
        assert model.test_attribute == 5
    with pytest.raises(AttributeError) as error:
        model.does_not_exist
    assert str(error.value) == f"'{type(model).__name__}' object has no attribute 'does_not_exist'"


@pytest.mark.parametrize("name", FAMILIES)
def test_deepcopy_and_eval_train_modes(name):
    """``copy.deepcopy`` (diffusers' TrainingTesterMixin copies models too) and ``.train()`` /
    ``.eval()`` of a patched model: the copy is independently patched and gives the same output;
    train mode (no grad) gives the unpatched train-mode output."""
    reference, model, case = unpatched_and_patched(name)
    twin = copy.deepcopy(model)
    assert state_of(twin) is not None and state_of(twin) is not state_of(model)
    assert_sparse(twin)
    assert torch.equal(forward(twin, case.inputs()), reference)
    sparse_vdit.remove(model)
    assert torch.equal(forward(twin, case.inputs()), reference) and state_of(twin) is not None
    model.train()
    train_reference = forward(model, case.inputs())
    twin.train()
    assert twin.training and torch.equal(forward(twin, case.inputs()), train_reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_with_attention_kwargs(name):
    """Every family's forward takes ``attention_kwargs`` (diffusers passes it to the LoRA scale):
    an empty dict and ``{"scale": 1.0}`` give the unpatched output through the patched layers."""
    reference, model, case = unpatched_and_patched(name)
    assert "attention_kwargs" in inspect.signature(type(model).forward).parameters
    assert torch.equal(forward(model, case.inputs(), attention_kwargs={}), reference)
    assert torch.equal(forward(model, case.inputs(), attention_kwargs={"scale": 1.0}), reference)


# --- TrainingTesterMixin (training.py) ----------------------------------------------------------


def loss_and_grads(model, inputs, labels=None):
    """diffusers' training step: train mode, forward, a loss against random labels, backward."""
    model.train()
    model.zero_grad()
    out = model(**inputs, return_dict=False)[0]
    labels = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)) if labels is None else labels
    loss = (out - labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILIES)
def test_training(name):
    """Mirrors TrainingTesterMixin.test_training and test_training_with_ema: a patched model in
    train mode runs forward, MSE loss, backward and an ``EMAModel`` step; here also the loss and
    every parameter gradient are the unpatched model's (loss bitwise, gradients to float32 rounding), and attention parameters get gradients."""
    from diffusers.training_utils import EMAModel

    case = CASES[name]
    model = case.build()
    reference_loss, reference_grads = loss_and_grads(model, case.inputs())
    patched(model)
    ema = EMAModel(model.parameters())
    loss, grads = loss_and_grads(model, case.inputs())
    ema.step(model.parameters())
    assert ema.optimization_step == 1
    assert torch.equal(loss, reference_loss) and grads.keys() == reference_grads.keys()
    for n in grads:  # bitwise on most; CogVideoX / Mochi q-k norm gradients differ by ~1e-7 relative (summation order)
        torch.testing.assert_close(grads[n], reference_grads[n], atol=1e-8, rtol=1e-5, msg=n)
    attention = family_of(model).attention_modules(model)[0]
    assert attention.to_q.weight.grad is not None and attention.to_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing(name):
    """Mirrors TrainingTesterMixin.test_gradient_checkpointing and test_gradient_checkpointing_is_applied
    on a patched model: off at first, enable / disable switch it, and the modules with a
    ``gradient_checkpointing`` attribute are exactly diffusers' expected set (the model class)."""
    _, model, case = unpatched_and_patched(name)
    assert model._supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    assert {type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)} == {case.model_class}
    assert {type(m).__name__ for m in model.modules() if hasattr(m, "gradient_checkpointing")} == {case.model_class}
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_checkpointing_equivalence(name):
    """Mirrors TrainingTesterMixin.test_gradient_checkpointing_equivalence: patched models without
    and with gradient checkpointing (same weights) give losses within 1e-5 and parameter gradients
    within 5e-5."""
    case = CASES[name]
    model = patched(case.build())
    assert not model.is_gradient_checkpointing and model.training
    loss, grads = loss_and_grads(model, case.inputs())
    twin = case.build(seed=1)
    twin.load_state_dict(model.state_dict())
    patched(twin).enable_gradient_checkpointing()
    assert twin.is_gradient_checkpointing and twin.training
    checkpointed_loss, checkpointed_grads = loss_and_grads(twin, case.inputs())
    assert (loss - checkpointed_loss).abs() < 1e-5
    assert grads.keys() == checkpointed_grads.keys()
    for n in grads:
        torch.testing.assert_close(checkpointed_grads[n], grads[n], atol=5e-5, rtol=0, msg=n)


# --- AttentionTesterMixin (attention.py) --------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_attention_processors(name):
    """Mirrors AttentionTesterMixin.test_get_set_processor, test_attention_processor_dict and
    test_attention_processor_count_mismatch_raises_error on a patched model: ``attn_processors``
    is a non-empty dict (ours on the self-attention layers), ``get_processor`` returns what
    ``set_processor`` set, a dict of processors sets them all, a dict of the wrong size raises
    ValueError naming the number of processors; ``remove`` then leaves the processors set since."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import AttnProcessor

    if not hasattr(CASES[name].cls(), "set_attn_processor"):
        pytest.skip(f"{CASES[name].model_class} has no set_attn_processor / attn_processors (diffusers skips it too)")
    _, model, _ = unpatched_and_patched(name)
    processors = model.attn_processors
    assert isinstance(processors, dict) and processors
    assert sum(type(p).__name__ == "SparseAttnProcessor" for p in processors.values()) == len(sparse_processors(model))
    wrong_size = {next(iter(processors)): AttnProcessor()} if len(processors) > 1 else {}  # diffusers: the first one
    with pytest.raises(ValueError) as error:
        model.set_attn_processor(wrong_size)
    assert "number of processors" in str(error.value).lower()
    model.set_attn_processor({key: AttnProcessor() for key in processors})
    assert all(type(p) is AttnProcessor for p in model.attn_processors.values())
    for module in model.modules():
        if isinstance(module, AttentionModuleMixin):
            assert module.get_processor() is not None
            new = AttnProcessor()
            module.set_processor(new)
            assert module.get_processor() is new
    sparse_vdit.remove(model)
    assert state_of(model) is None and all(type(p) is AttnProcessor for p in model.attn_processors.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_fuse_unfuse_qkv_projections(name):
    """Mirrors AttentionTesterMixin.test_fuse_unfuse_qkv_projections on a patched model: where
    fusing makes ``to_qkv`` / ``to_kv``, ``fused_projections`` is set and the output stays within
    1e-3; unfusing removes them from ``AttentionModuleMixin`` modules and gives the output back
    (1e-3); sparse attention stays on. Fusing counts the modules of both diffusers attention classes
    (CogVideoX's ``Attention`` is no ``AttentionModuleMixin``; it keeps ``to_qkv`` and
    ``fused_projections`` after unfusing, unpatched too, so diffusers' check skips it there)."""
    from diffusers.models.attention import AttentionModuleMixin

    if not hasattr(CASES[name].cls(), "fuse_qkv_projections"):
        pytest.skip(f"{CASES[name].model_class} has no fuse_qkv_projections (diffusers skips it too)")
    reference, model, case = unpatched_and_patched(name)
    model.fuse_qkv_projections()
    attention = [m for m in model.modules() if hasattr(m, "fused_projections")]
    fused = [m for m in attention if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    if not fused:
        pytest.skip(f"{case.model_class}.fuse_qkv_projections fuses no attention module (unpatched too: nothing to check)")
    assert all(m.fused_projections for m in fused)
    torch.testing.assert_close(forward(model, case.inputs()), reference, atol=1e-3, rtol=0)
    assert_sparse(model)
    model.unfuse_qkv_projections()
    for module in (m for m in attention if isinstance(m, AttentionModuleMixin)):
        assert not hasattr(module, "to_qkv") and not hasattr(module, "to_kv") and not module.fused_projections
    torch.testing.assert_close(forward(model, case.inputs()), reference, atol=1e-3, rtol=0)
    assert_sparse(model)
