"""The compiled table owns what is derived from it; the registry chooses one backend per table."""

import logging

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.block_table import BlockTable, table_by_key
from sparse_vdit.kernels import registry
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip


def _table():
    return compile_layer([diagonal(0.5), multi_diagonal(0.1), skip()], VideoLayout(3, 4, 6), 16)


def test_forms_are_built_once_and_dropped_together():
    table = _table()
    calls = []
    first = table.form("probe", lambda t: calls.append(1) or torch.arange(3))
    assert table.form("probe", lambda t: calls.append(1) or torch.arange(3)) is first and calls == [1]
    indices = table.kv_indices
    assert table.kv_indices is indices
    table.drop_forms()
    assert table.kv_indices is not indices and torch.equal(table.kv_indices, indices)
    table.form("probe", lambda t: calls.append(1) or torch.arange(3))
    assert calls == [1, 1]


def test_clear_caches_drops_compiled_tables_and_their_forms():
    table = _table()
    indices = table.kv_indices
    assert compile_layer(table.patterns, table.layout, 16) is table
    sparse_vdit.clear_caches()
    again = compile_layer(table.patterns, table.layout, 16)
    assert again is not table
    assert table.kv_indices is not indices  # the old table's forms went too
    assert torch.equal(again.range_starts, table.range_starts)


def test_the_op_finds_its_table_by_key_not_by_address():
    table = _table()
    assert table_by_key(table.key) is table
    other = BlockTable(table.layout, table.block_size, table.patterns, table.range_starts.clone(),
                       table.range_ends.clone(), table.token_major.clone())  # fmt: skip
    assert other.key != table.key and table_by_key(other.key) is other
    key = other.key
    del other
    with pytest.raises(RuntimeError, match="no longer exists"):
        table_by_key(key)


def test_to_keeps_one_copy_per_device():
    table = _table()
    assert table.to("cpu") is table
    moved = table.to("meta")
    assert table.to(torch.device("meta")) is moved and moved.device.type == "meta"


def test_every_backend_module_is_found_and_declares_what_it_runs():
    assert registry.names() == ("fa4", "triton", "flex", "reference")  # the order auto tries them in
    assert sparse_vdit.kernels.BACKENDS == ("auto", *registry.names())
    for name in registry.names():
        backend = registry.get(name)
        assert backend.name == name and backend.dtypes and callable(backend.module.run)
        assert isinstance(backend.module.is_available(torch.device("cpu"))[0], bool)
    assert registry.get("reference").input_problem(torch.float32, 40) is None
    assert "head dims" in registry.get("flex").input_problem(torch.float16, 40)
    assert "float32" in registry.get("fa4").input_problem(torch.float32, 128)
    with pytest.raises(ValueError, match="unknown backend"):
        registry.get("cuda")


def test_auto_is_chosen_once_per_table_and_says_why(caplog):
    table = _table()
    q = torch.randn(1, table.layout.num_tokens, 3, 16)
    registry._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="sparse_vdit"):
        out = sparse_attention(q, q, q, table)
        sparse_attention(q, q, q, table)
    said = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    assert len(said) == 1 and "'reference'" in said[0] and "no fast backend on cpu" in said[0]
    assert table.form(("backend", "auto", q.dtype, 16), lambda t: "not asked again") == "reference"
    assert rel_rms(out, sparse_attention(q, q, q, table, backend="reference")) == 0.0


@pytest.mark.skipif(not registry.available("triton", torch.device("cpu"))[0], reason="needs triton and TRITON_INTERPRET=1")
def test_triton_keeps_its_work_order_with_the_table():
    layout = VideoLayout(2, 4, 8)
    table = compile_layer([dense(), diagonal(0.5)], layout, 16)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 64) for _ in range(3))
    out = sparse_attention(q, k, v, table, backend="triton")
    orders = [name for name in table._forms if isinstance(name, tuple) and name[0] == "triton.schedule"]
    assert len(orders) == 1
    assert rel_rms(out, sparse_attention(q, k, v, table, backend="reference")) < 1e-5
