"""sparse_vdit.apply under diffusers' Ulysses context parallelism: 2 CPU processes on gloo.

Each rank builds the same tiny Wan transformer (same seed), computes the single-process sparse
output itself, then runs the model with ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``
and the same plan: the gathered parallel output must equal the single-process one, each rank must
have run only its own global heads over the full sequence, and both orders (enable then apply,
apply then enable) must work.
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def mixed():
    """Per layer, one pattern per head: each rank gets a different mix of its two heads."""
    from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip

    return [
        [dense(), diagonal(0.5), multi_diagonal(0.2), skip()],
        [skip(), diagonal(0.0), dense(), multi_diagonal(0.1)],
    ]


def join_gloo(rank: int, world: int, init: str) -> None:
    """Join the CPU process group of a spawned test worker (one torch thread)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    # diffusers picks the device as rank % torch.accelerator.device_count(), 0 on a CPU-only torch
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def spawn(tmp_path, worker, world: int, *args) -> dict:
    """``worker(rank, world, init, result, *args)`` in ``world`` processes; the JSON rank 0 wrote to ``result``."""
    result = tmp_path / "result.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(worker, args=(world, init, str(result), *args), nprocs=world, join=True)
    return json.loads(result.read_text())


def _worker(rank: int, world: int, init: str, result: str) -> None:
    from diffusers import ContextParallelConfig
    from helpers import rel_rms
    from tiny_diffusers import BLOCK, wan

    import sparse_vdit
    from sparse_vdit import Plan

    join_gloo(rank, world, init)
    try:
        report = {}
        for order in ("enable_then_apply", "apply_then_enable"):
            model, inputs = wan()
            plan = Plan.from_layers(model, mixed(), block_size=BLOCK)
            with torch.no_grad():
                dense = model(**inputs)[0]
                with sparse_vdit.sparse(model, plan, backend="reference"):
                    single = model(**inputs)[0]
            config = ContextParallelConfig(ulysses_degree=world)
            if order == "enable_then_apply":
                model.enable_parallelism(config=config)
                state = sparse_vdit.apply(model, plan, backend="reference")
            else:
                state = sparse_vdit.apply(model, plan, backend="reference")
                model.enable_parallelism(config=config)
            seen = []

            def observe(call, patterns, out, seen=seen):
                seen.append([call.layer, list(call.heads), list(call.q.shape), [p.name for p in patterns]])

            state.observers.append(observe)
            with torch.no_grad():
                parallel = model(**inputs)[0]
            sparse_vdit.remove(model)
            assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
            assert model.blocks[0].attn1.processor._parallel_config is not None
            report[order] = {"err": rel_rms(parallel, single), "changed": rel_rms(single, dense), "seen": seen,
                             "layout": state.last_layout.num_tokens}  # fmt: skip

        # heads the Ulysses degree does not divide: a clear error at apply time
        from diffusers import WanTransformer3DModel

        odd = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        ).eval()  # fmt: skip
        odd.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        try:
            sparse_vdit.apply(odd, Plan.dense(odd, block_size=BLOCK))
            report["odd_heads"] = "no error"
        except ValueError as err:
            report["odd_heads"] = str(err)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ulysses_sparse_equals_single_process(tmp_path):
    report = spawn(tmp_path, _worker, WORLD)
    for order in ("enable_then_apply", "apply_then_enable"):
        r = report[order]
        assert r["err"] < 1e-5, (order, r["err"])
        assert r["changed"] > 1e-3  # the plan does change the output
        assert r["layout"] == 48  # the layout was built from the full sequence, not the shard
        # rank 0: global heads 0, 1 of each layer, full sequence, 2 of 4 heads, one call per layer
        assert r["seen"] == [
            [0, [0, 1], [2, 48, 2, 16], ["dense", "diagonal"]],
            [1, [0, 1], [2, 48, 2, 16], ["skip", "diagonal"]],
        ], r["seen"]
    assert "not divisible by the context-parallel degree 2" in report["odd_heads"]
