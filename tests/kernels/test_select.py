"""Per-head candidate choice read on the device (Triton) against the host path."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty_like, rel_rms  # noqa: E402
from sparse_vdit import VideoLayout, sparse_attention  # noqa: E402
from sparse_vdit.kernels import registry, select_attention  # noqa: E402
from sparse_vdit.kernels.fa4 import gathered_tables  # noqa: E402
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
    table = HeadChoice(candidates, selected).table(layout, block, DEVICE)  # built before the step, as in a model
    host = select_attention(q.float(), k.float(), v.float(), table, selected, backend="reference")
    for b in range(2):  # the host path is sparse_attention with each sample's chosen patterns
        chosen = compile_layer(tuple(candidates[i] for i in selected[b].tolist()), layout, block, DEVICE)
        per_sample = sparse_attention(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(), chosen,
                                      backend="reference")  # fmt: skip
        assert torch.equal(per_sample[0], host[b])
    def no_sync(*args, **kwargs):
        raise AssertionError("the device path read a device value on the host")

    poison_empty_like(monkeypatch, launcher.torch)
    for name in ("cpu", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = select_attention(q, k, v, table, selected, backend="triton")
    monkeypatch.undo()
    assert not out.isnan().any()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # ~2x torch's own error
    assert rel_rms(out, host) <= tolerance, rel_rms(out, host)


def test_choice_checks_its_shape_and_values():
    layout, block, candidates = CASES["wan-sink-batch2"]
    q, k, v = _inputs(layout, 1, 3, torch.float32)
    table = compile_layer(candidates, layout, block, DEVICE)
    with pytest.raises(ValueError, match="batch, heads"):
        select_attention(q, k, v, table, torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        select_attention(q, k, v, table, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int32"):
        HeadChoice(candidates, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):  # the host path checks what it reads
        select_attention(q, k, v, table, torch.tensor([[0, 2, 1]], dtype=torch.int32), backend="reference")


def test_backends_declare_whether_they_read_the_choice_on_the_device(monkeypatch):
    from sparse_vdit.kernels import fa4

    assert registry.get("triton").selects_on_device
    assert not any(registry.get(name).selects_on_device for name in ("reference", "flex", "fa4"))
    monkeypatch.setattr(fa4, "SELECT_ON_DEVICE", True)  # FA4's is opt-in until measured
    assert registry.get("fa4").selects_on_device


def test_table_heads_picks_rows():
    layout, block, candidates = CASES["text-suffix-padded"]
    table = compile_layer(candidates, layout, block)
    picked = table.heads((1, 0, 1))
    expected = compile_layer((candidates[1], candidates[0], candidates[1]), layout, block)
    assert picked.patterns == expected.patterns and picked is table.heads((1, 0, 1))
    for name in ("range_starts", "range_ends", "token_major"):
        assert torch.equal(getattr(picked, name), getattr(expected, name))
    assert table.heads((0, 1)) is table
    with pytest.raises(ValueError, match="rows"):
        table.heads((2,))


def test_gathered_tables_are_each_samples_compiled_tables():
    layout, block, candidates = CASES["text-suffix-padded"]
    selected = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.int32)
    counts, index = gathered_tables(compile_layer(candidates, layout, block), selected)
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
    from sparse_vdit.kernels import fa4

    if not fa4.is_available(torch.device("cuda"))[0]:
        pytest.skip("FA4 not available")
    layout, _, candidates = CASES[case]
    block = 128 if torch.cuda.get_device_capability()[0] == 9 else 256
    layout = VideoLayout(layout.frames, layout.height * 4, layout.width * 4, layout.text, layout.text_position,
                         layout.text_valid)  # fmt: skip
    q, k, v = _inputs(layout, 2, 5, torch.bfloat16, dim=128)
    selected = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.int32, device="cuda")
    table = HeadChoice(candidates, selected).table(layout, block, "cuda")
    host = select_attention(q, k, v, table, selected, backend="fa4")
    monkeypatch.setattr(fa4, "SELECT_ON_DEVICE", True)
    out = select_attention(q, k, v, table, selected, backend="fa4")
    assert not out.isnan().any() and rel_rms(out, host) < 1e-2, rel_rms(out, host)


@pytest.mark.parametrize("backend", ["triton", "reference"], ids=["device-path", "host-path"])
def test_gradients_flow_through_the_choice(backend):
    """dq, dk, dv of select_attention against float64 autograd of per-(sample, head) masked attention
    with each sample's chosen rows; at most 2x plain torch attention's own float32 error."""
    from helpers import masked_attention, token_mask

    from sparse_vdit.patterns import skip

    layout, block, candidates = CASES["text-suffix-padded"]
    candidates = (*candidates, skip())
    table = compile_layer(candidates, layout, block)
    selected = torch.tensor([[0, 1, 2], [1, 1, 0]], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(2, layout.num_tokens, 3, 64, generator=g) for _ in range(4))
    k[:, layout.kv_len :] = 1e4  # padded text keys: attending to them, or differentiating them, would show
    assert registry.choose(backend, q, table).selects_on_device == (backend == "triton")

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    def oracle(q, k, v):
        out = []
        for b in range(2):
            chosen = compile_layer(tuple(candidates[i] for i in selected[b].tolist()), layout, block)
            out.append(torch.stack([masked_attention(q[b : b + 1, :, h], k[b : b + 1, :, h], v[b : b + 1, :, h],
                                                     token_mask(chosen, h), 64**-0.5) for h in range(3)], dim=2))  # fmt: skip
        return torch.cat(out)

    def dense(q, k, v):  # the yardstick: plain attention over the real keys
        q, k, v = q.transpose(1, 2), k[:, : layout.kv_len].transpose(1, 2), v[:, : layout.kv_len].transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    got = grads(lambda q, k, v: select_attention(q, k, v, table, selected, backend=backend), torch.float32)
    expected = grads(oracle, torch.float64)
    yardstick = [rel_rms(a, b) for a, b in zip(grads(dense, torch.float32), grads(dense, torch.float64))]
    for name, a, b, e in zip(("dq", "dk", "dv"), got, expected, yardstick):
        assert not a.isnan().any() and rel_rms(a, b) <= max(2 * e, 2e-6), (name, rel_rms(a, b), e)
        assert torch.equal(a[0, :, 2], torch.zeros_like(a[0, :, 2])), name  # sample 0's head 2 chose skip
        if name != "dq":  # padded text keys are never attended: zero gradient
            assert torch.equal(a[:, layout.kv_len :], torch.zeros_like(a[:, layout.kv_len :])), name
