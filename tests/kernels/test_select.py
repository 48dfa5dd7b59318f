"""Per-head candidate choice read on the device (Triton) against the host path."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import rel_rms  # noqa: E402
from sparse_vdit import VideoLayout  # noqa: E402
from sparse_vdit.kernels.select import gathered_tables, select_attention  # noqa: E402
from sparse_vdit.kernels.triton import launcher  # noqa: E402
from sparse_vdit.patterns import HeadChoice, compile_layer, spatial, temporal, with_sink  # noqa: E402

torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16, torch.float32]
CASES = {
    "wan-sink-batch2": (VideoLayout(5, 3, 7), 16, (with_sink(spatial(0.6)), with_sink(temporal(0.12)))),
    "text-suffix-padded": (VideoLayout(3, 5, 9, 21, "suffix", text_valid=13), 16, (spatial(0.5), temporal(0.2))),
}


def _inputs(layout, batch, heads, dtype, dim=64):
    g = torch.Generator(device=DEVICE).manual_seed(3)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g, device=DEVICE).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_device_choice_equals_the_host_path(case, dtype, monkeypatch):
    layout, block, candidates = CASES[case]
    q, k, v = _inputs(layout, 2, 5, dtype)
    selected = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    choice = HeadChoice(candidates, selected)
    host = select_attention(q.float(), k.float(), v.float(), choice, layout, block, backend="reference")
    for b in range(2):  # the host path is sparse_attention with each sample's chosen patterns
        per_sample = select_attention(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(),
                                      HeadChoice(candidates, selected[b:b + 1]), layout, block, backend="reference")
        assert torch.equal(per_sample[0], host[b])
    compile_layer(candidates, layout, block, DEVICE)  # built (on the host) before the step, as in a model
    empty_like = torch.empty_like

    def poisoned(x, *args, **kwargs):
        out = empty_like(x, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def no_sync(*args, **kwargs):
        raise AssertionError("the device path read a device value on the host")

    monkeypatch.setattr(launcher.torch, "empty_like", poisoned)
    for name in ("cpu", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = select_attention(q, k, v, choice, layout, block, backend="triton")
    monkeypatch.undo()
    assert not out.isnan().any()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # ~2x torch's own error
    assert rel_rms(out, host) <= tolerance, rel_rms(out, host)


def test_choice_checks_its_shape():
    layout, block, candidates = CASES["wan-sink-batch2"]
    q, k, v = _inputs(layout, 1, 3, torch.float32)
    with pytest.raises(ValueError, match="batch, heads"):
        select_attention(q, k, v, HeadChoice(candidates, torch.zeros(1, 4, dtype=torch.int32)), layout, block)
    with pytest.raises(ValueError, match="int32"):
        HeadChoice(candidates, torch.zeros(1, 3, dtype=torch.int64))


def test_gathered_tables_are_each_samples_compiled_tables():
    layout, block, candidates = CASES["text-suffix-padded"]
    selected = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.int32)
    counts, index, token_major = gathered_tables(HeadChoice(candidates, selected), layout, block, "cpu")
    assert token_major.tolist() == [False, True]
    for b in range(2):
        table = compile_layer(tuple(candidates[i] for i in selected[b].tolist()), layout, block)
        assert torch.equal(counts[b], table.kv_num_blocks)
        for h in range(3):
            for row in range(table.num_q_blocks):
                c = int(table.kv_num_blocks[h, row])
                assert torch.equal(index[b, h, row, :c], table.kv_indices[h, row, :c])


@pytest.mark.parametrize("case", CASES)
def test_head_order_kernel_equals_reorder_heads(case):
    from sparse_vdit.kernels.api import reorder_heads
    from sparse_vdit.kernels.triton.placement import head_order

    layout, _, candidates = CASES[case]
    x = _inputs(layout, 2, 5, torch.float32, dim=48)[0]  # a head dim that is not a power of two
    selected = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    flags = torch.tensor([p.token_major for p in candidates], device=DEVICE)
    geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
    moved = head_order(x, selected, flags, geometry)
    for b in range(2):
        heads = [h for h in range(5) if candidates[int(selected[b, h])].token_major]
        assert torch.equal(moved[b : b + 1], reorder_heads(x[b : b + 1], layout, heads))
    assert torch.equal(head_order(moved, selected, flags, geometry, to_head_order=False), x)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_fa4_on_device_equals_the_host_path(case, monkeypatch):
    from sparse_vdit.kernels import fa4, select

    if not fa4.is_available(torch.device("cuda"))[0]:
        pytest.skip("FA4 not available")
    layout, _, candidates = CASES[case]
    block = 128 if torch.cuda.get_device_capability()[0] == 9 else 256
    layout = VideoLayout(layout.frames, layout.height * 4, layout.width * 4, layout.text, layout.text_position,
                         layout.text_valid)  # fmt: skip
    q, k, v = _inputs(layout, 2, 5, torch.bfloat16, dim=128)
    selected = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.int32, device="cuda")
    choice = HeadChoice(candidates, selected)
    host = select_attention(q, k, v, choice, layout, block, backend="fa4")
    monkeypatch.setattr(select, "FA4_ON_DEVICE", True)
    out = select_attention(q, k, v, choice, layout, block, backend="fa4")
    assert not out.isnan().any() and rel_rms(out, host) < 1e-2, rel_rms(out, host)
