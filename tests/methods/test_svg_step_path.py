"""The SVG layer's step path, cut down (issue 16): the errors and choice in one Triton launch,
resident per-position ranges, and what one device-decided layer call launches. (The profiling kernel
against the float64 profile: test_svg_profile_kernel.py.)"""

import collections
import os

import pytest
import torch

from sparse_vdit import VideoLayout
from sparse_vdit.kernels import select_attention
from sparse_vdit.methods import svg_profile
from sparse_vdit.methods.svg import SVG, sampled_errors, sampled_outputs
from test_svg_modes import WAN, call, heads_qkv

BLOCK = 16


def _triton_ready():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_choice(errors, batch):
    selected = errors.argmin(0).to(torch.int32)
    return selected.expand(batch, -1) if selected.dim() == 1 else selected


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "batch-mean"])
def test_choose_kernel_equals_sampled_errors_and_argmin(per_sample):
    _triton_ready()
    from sparse_vdit.kernels.triton.sampled import choose

    g = torch.Generator().manual_seed(0)
    batch, heads, rows, dim = 2, 5, 24, 32  # rows not a multiple of the kernel's 16-row tiles
    outputs = torch.randn(batch, heads, 3, rows, dim, generator=g)
    outputs[:, :, 2] = outputs[:, :, 0] + 0.5 * (outputs[:, :, 2] - outputs[:, :, 0])  # mask 1 closer...
    outputs[:, 1, 2] = outputs[:, 1, 1]  # ...except head 1: an exact tie (goes to mask 0, as argmin)
    outputs[:, 3, 1] = outputs[:, 3, 0] + 1e-3 * outputs[:, 3, 1]  # and head 3: mask 0 far closer
    outputs = outputs.to(_device()).contiguous()
    masses = torch.ones(batch, heads, 3, rows, device=outputs.device)
    expected = sampled_errors(outputs, masses, "output", per_sample=per_sample)
    errors, selected = choose(outputs, per_sample)
    assert errors.shape == expected.shape and selected.shape == (batch, heads) and selected.dtype == torch.int32
    torch.testing.assert_close(errors, expected, rtol=1e-5, atol=0)
    assert torch.equal(selected, _torch_choice(expected, batch))
    assert selected[:, 1].tolist() == [0, 0] and selected[:, 3].tolist() == [0, 0] and selected[:, 0].tolist() == [1, 1]


def test_position_ranges_are_the_rows_ranges_of_every_position():
    layout = VideoLayout(4, 6, 7, 19, "suffix")
    svg = SVG(0.3, block_size=BLOCK)
    patterns = svg.profile_patterns(layout)
    starts, ends = svg_profile.position_ranges(layout, patterns, BLOCK, torch.device("cpu"))
    rows = torch.tensor([0, 5, 41, 42, layout.num_tokens - 1, 100, 5])
    row_starts, row_ends = svg_profile.row_ranges(rows, layout, patterns, BLOCK)
    assert starts.is_contiguous() and starts.dtype == torch.int32 and starts.shape[-1] == layout.num_tokens
    assert torch.equal(starts[:, :, rows], row_starts.transpose(1, 2)) and torch.equal(ends[:, :, rows],
                                                                                       row_ends.transpose(1, 2))  # fmt: skip
    assert svg_profile.position_ranges(layout, patterns, BLOCK, torch.device("cpu"))[0] is starts  # resident


@pytest.mark.parametrize("mode", ["reference", "ours"])
def test_fused_choice_decides_as_the_torch_operations(mode, monkeypatch):
    """The device decision through the choice kernel picks what the six torch operations picked."""
    _triton_ready()
    q, k, v = (torch.cat(x).to(_device()) for x in zip(heads_qkv(WAN, "STKT"), heads_qkv(WAN, "TSTK", seed=1)))
    choices = {}
    for fused in (False, True):
        monkeypatch.setattr(svg_profile, "FUSED_CHOICE", fused)
        svg = SVG(0.3, mode=mode, warmup_steps=0, warmup_layers=0, sampled_rows=32, block_size=BLOCK,
                  decide="device", profile_backend="triton")  # fmt: skip
        choices[fused] = svg(call(q, k, v, WAN)), svg.last_errors
    (old, old_errors), (new, new_errors) = choices[False], choices[True]
    assert torch.equal(new.selected, old.selected) and new.candidates == old.candidates
    torch.testing.assert_close(new_errors, old_errors, rtol=1e-5, atol=0)
    if mode == "reference":  # per sample: the two samples' heads were built to differ
        assert new.selected.tolist() != [new.selected[0].tolist()] * 2


def test_a_device_decided_layer_launches_four_kernels_and_no_host_work(monkeypatch):
    """One SVG layer call decided on the device: the profile, the merge of its key splits, the choice,
    the attention (four launches; the rows' copy is the only other device work); on the host only
    the rows are drawn and cast. Everything that depends on (layout, density) is built once.
    (CPU tensors through the interpreter: what is counted is what the host asks for, any device.)"""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts launches of CPU tensors through the Triton interpreter")
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_vdit.kernels.triton import kernel as attention_kernel
    from sparse_vdit.kernels.triton import sampled

    launches, run = [], [True]  # launches are recorded, and run unless counting (the interpreter's own ops)

    def recorded(module, name):
        original = getattr(module, name)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(name)
                    return original[grid](*args, **kwargs) if run[0] else None

                return launch

        monkeypatch.setattr(module, name, Launcher())

    for name in ("sampled_rows_fwd", "merge_splits", "choose_heads"):
        recorded(sampled, name)
    recorded(attention_kernel, "block_sparse_attention_fwd")
    monkeypatch.setattr(svg_profile, "FUSED_CHOICE", True)
    q, k, v = heads_qkv(WAN, "STKT", dim=64)
    svg = SVG(0.3, warmup_steps=0, warmup_layers=0, sampled_rows=16, block_size=BLOCK, decide="device",
              profile_backend="triton")  # fmt: skip

    def layer(step):
        choice = svg(call(q, k, v, WAN, step=step))
        return select_attention(q, k, v, choice.table(WAN, BLOCK, q.device), choice.selected, backend="triton")

    assert not layer(20).isnan().any()  # caches filled (tables, per-position ranges, schedules), as after step 1
    launches.clear()
    run[0] = False
    ops = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        layer(21)
    assert launches == ["sampled_rows_fwd", "merge_splits", "choose_heads", "block_sparse_attention_fwd"]
    allocations = {"empty", "empty_like", "select", "view", "select_attention"}  # buffers, views, the op itself
    assert {name: n for name, n in ops.items() if name not in allocations} == {"randint": 1, "_to_copy": 1}, ops
    assert ops["select_attention"] == 1
    ops.clear()
    launches.clear()
    with Count():  # the same (step, layer) again, as in the next generation: its rows are kept on the device
        layer(21)
    assert launches == ["sampled_rows_fwd", "merge_splits", "choose_heads", "block_sparse_attention_fwd"]
    assert set(ops) <= allocations, ops
    from sparse_vdit.kernels.triton.backend import run_selected  # inside the (opaque) op: the output only

    choice = svg(call(q, k, v, WAN, step=22))
    table = choice.table(WAN, BLOCK, q.device)
    ops.clear()
    with Count():
        run_selected(q, k, v, table, choice.selected, 0.125)
    assert dict(ops) == {"empty_like": 1}, ops


def test_merge_rows_per_program_change_nothing_but_the_grid(monkeypatch):
    """The merge of the key splits gives the same bits at any rows per program; on a GPU the rule
    halves them until there are two programs per SM (Wan-1.3B: 12 heads x 64 rows -> 2 a program)."""
    _triton_ready()
    from types import SimpleNamespace

    from sparse_vdit.kernels.triton import sampled

    svg = SVG(0.25, block_size=BLOCK)
    q, k, v = (t.to(_device()) for t in heads_qkv(WAN, "STK", dim=32))
    rows, patterns = svg.rows(WAN, 3, 2)[:24], svg.profile_patterns(WAN)
    results = []
    for merge_rows in (16, 4, 2):
        monkeypatch.setitem(sampled.TUNING, "merge_rows", merge_rows)
        results.append(sampled_outputs(q, k, v, rows, WAN, patterns, BLOCK, backend="triton"))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))

    monkeypatch.setitem(sampled.TUNING, "merge_rows", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert sampled._merge_rows(12, 64, cuda) == 2  # Wan-1.3B: 12 x 32 = 384 programs (12 x 16 = 192 at 4 rows)
    assert sampled._merge_rows(40, 64, cuda) == 8  # Wan-14B: 40 x 8 = 320 programs
    assert sampled._merge_rows(1, 8, cuda) == 2 and sampled._merge_rows(12, 64, torch.device("cpu")) == 16


def test_kernel_rows_are_the_rows_kept_per_call_and_follow_the_settings():
    svg = SVG(0.3, block_size=BLOCK)
    cpu = torch.device("cpu")
    first = svg._kernel_rows(WAN, 3, 2, cpu)
    assert first.dtype == torch.int32 and torch.equal(first, svg.rows(WAN, 3, 2).to(torch.int32))
    assert svg._kernel_rows(WAN, 3, 2, cpu) is first  # kept: nothing drawn or sent again
    assert not torch.equal(svg._kernel_rows(WAN, 4, 2, cpu), first)
    svg.seed = 7  # settings changed after construction: new rows, as rows() gives them
    assert torch.equal(svg._kernel_rows(WAN, 3, 2, cpu), svg.rows(WAN, 3, 2).to(torch.int32))
    assert not torch.equal(svg._kernel_rows(WAN, 3, 2, cpu), first)
