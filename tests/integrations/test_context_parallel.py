"""Every family under diffusers' context parallelism: CPU processes on gloo, output equal to one process.

One spawn of 2 processes and one of 4, each running every family (a spawn costs seconds of
imports; the tiny forwards cost milliseconds). Each rank builds the same tiny transformer (same
seed), computes the single-process outputs itself (a dense plan, a mixed sparse plan whose heads
differ within each rank's share, SVG with no warm-up), then runs the same variants on fresh copies
of the model under each context-parallel configuration, enabled with
``sparse_vdit.enable_context_parallel`` (at 2 processes also once in the other order: apply, then
enable, Wan through diffusers' own ``enable_parallelism``): the gathered outputs must equal the
single-process ones, rank 0 must have run its own global heads over the whole sequence, and
``remove`` must hand back the stock processors. HunyuanVideo, HunyuanVideo 1.5 and Mochi run with
two prompt lengths in the batch (padded text), CogVideoX 1.5 with its rotary tables passed in; at 2
processes also the inputs split another way (Wan2.2 TI2V's and LTX-Video's per-token timesteps,
SkyReels-V2 diffusion forcing, Wan VACE's control tokens). Settings sparse-vdit does not run are
refused before anything changes (SkyReels-V2's causal blocks also when set after enabling).
"""

import json

import pytest
import torch

pytest.importorskip("diffusers")

import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = {2: ("ulysses", "ring"), 4: ("ulysses", "ring_x_ulysses")}
FAMILIES = ("wan", "hunyuan_video", "cogvideox", "cogvideox1.0", "hunyuan_video15", "skyreels_v2", "ltx_video", "mochi")
# inputs split differently (per-token timesteps, control tokens): 2 processes only, the head split is the same
VARIANTS = ("wan2.2-ti2v", "wan-vace", "skyreels_v2-df", "ltx_video-tokens")


def builders() -> dict:
    """tiny_diffusers' builders, and the per-token timestep inputs: SkyReels-V2 diffusion forcing
    (a timestep per latent frame), LTX-Video's per-token timesteps (conditioning)."""
    from tiny_diffusers import BUILDERS, FRAMES, ltx, skyreels

    def skyreels_df():
        model, inputs = skyreels()
        steps = torch.arange(FRAMES, dtype=torch.float32) * -100.0
        inputs.update(timestep=torch.stack([900.0 + steps, 800.0 + steps]), enable_diffusion_forcing=True)
        return model, inputs

    def ltx_tokens():
        model, inputs = ltx()
        inputs["timestep"] = torch.linspace(100.0, 900.0, FRAMES * 16).repeat(2, 1)
        return model, inputs

    return {**BUILDERS, "skyreels_v2-df": skyreels_df, "ltx_video-tokens": ltx_tokens}


def mixed(layers: int = 2):
    """Per layer, one pattern per head: each rank gets a different mix of its two heads."""
    from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip

    two = [
        [dense(), diagonal(0.5), multi_diagonal(0.2), skip()],
        [skip(), diagonal(0.0), dense(), multi_diagonal(0.1)],
    ]
    return [two[i % 2] for i in range(layers)]


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


def _config(name: str, world: int):
    from diffusers import ContextParallelConfig

    if name == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if name == "ring":
        return ContextParallelConfig(ring_degree=world)
    return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)


def _run(model, inputs, variant: dict, seen: list | None = None) -> torch.Tensor:
    """One forward under ``variant``; ``seen`` gets (global heads, q's sequence and heads, pattern names) per call."""
    import sparse_vdit

    with torch.no_grad(), sparse_vdit.sparse(model, backend="reference", **variant) as state:
        if seen is not None:
            state.observers.append(lambda call, patterns, out: seen.append(
                [None if call.heads is None else list(call.heads), list(call.q.shape[1:3]),
                 _pattern_names(patterns)]))  # fmt: skip
        return model(**inputs)[0]


def _pattern_names(patterns) -> list[str]:
    """Names of the patterns a call ran: a list per head, or every (sample, head)'s choice of a HeadChoice."""
    from sparse_vdit.patterns import HeadChoice

    if isinstance(patterns, HeadChoice):  # SVG when the samples of a batch choose differently
        return [patterns.candidates[i].name for i in patterns.selected.flatten().tolist()]
    return [p.name for p in patterns or ()]


def _worker(rank: int, world: int, init: str, result: str, families: tuple) -> None:
    from helpers import rel_rms
    from tiny_diffusers import BLOCK

    import sparse_vdit
    from sparse_vdit import Plan
    from sparse_vdit.integrations.diffusers import family_of, model_spec

    join_gloo(rank, world, init)
    build = builders()
    try:
        report = {}
        for family in families:
            model, inputs = build[family]()
            variants = {
                "dense": dict(plan=Plan.dense(model, block_size=BLOCK)),
                "sparse": dict(plan=Plan.from_layers(model, mixed(model_spec(model).num_layers), block_size=BLOCK)),
                "svg": dict(method="svg", density=0.3, warmup_steps=0, warmup_layers=0, block_size=BLOCK),
            }
            seen: list = []
            single = {name: _run(model, inputs, kw, seen if name == "svg" else None) for name, kw in variants.items()}
            report[f"{family}/svg_patterns"] = sorted({n for _, _, names in seen for n in names})
            report[f"{family}/single_calls"] = [shape for _, shape, _ in seen]
            if world == 2:  # the other order: apply, then enable (Wan: diffusers' own enable_parallelism)
                model, inputs = build[family]()
                with torch.no_grad(), sparse_vdit.sparse(model, backend="reference", **variants["sparse"]):
                    if family == "wan":
                        model.enable_parallelism(config=_config("ulysses", world))
                    else:
                        sparse_vdit.enable_context_parallel(model, _config("ulysses", world))
                    report[f"{family}/apply_then_enable"] = rel_rms(model(**inputs)[0], single["sparse"])
                # remove() handed back the stock processors, configured for context parallelism
                processors = [m.processor for m in family_of(model).attention_modules(model)]
                report[f"{family}/restored"] = all(type(p).__name__ in family_of(model).processor_classes
                                                   and p._parallel_config is not None for p in processors)  # fmt: skip
            for config in CONFIGS[world]:
                model, inputs = build[family]()  # a fresh copy: enable_parallelism cannot be undone
                sparse_vdit.enable_context_parallel(model, _config(config, world))
                for name, kw in variants.items():
                    seen = []
                    out = _run(model, inputs, kw, seen)
                    report[f"{family}/{config}/{name}/calls"] = [[heads, shape] for heads, shape, _ in seen]
                    report[f"{family}/{config}/{name}"] = {
                        "err": rel_rms(out, single[name]), "changed": rel_rms(single[name], single["dense"]),
                        "shape": list(out.shape) == list(single[name].shape),
                    }  # fmt: skip
        if world == 2:
            report.update(_padded_text_masks(world, build, variants_of=lambda model: dict(
                plan=Plan.from_layers(model, mixed(), block_size=BLOCK))))  # fmt: skip
        if world == 2:  # a text family under a cp plan that shards its text (not ours): a clear error
            from diffusers import ContextParallelConfig

            model, inputs = build["cogvideox"]()
            plan = sparse_vdit.integrations.diffusers.context_parallel_plan(model)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=plan)
            try:
                _run(model, inputs, dict(plan=Plan.dense(model, block_size=BLOCK)))
                report["foreign_plan"] = "no error"
            except NotImplementedError as err:
                report["foreign_plan"] = str(err)
            model, inputs = build["hunyuan_video"]()  # our plan, but diffusers' processors: refused
            sparse_vdit.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
            try:
                with torch.no_grad():
                    model(**inputs)
                report["stock_processors"] = "no error"
            except RuntimeError as err:
                report["stock_processors"] = str(err)
            model, inputs = build["skyreels_v2"]()  # causal blocks set after enabling (as its pipeline does)
            sparse_vdit.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
            model._set_ar_attention(3)
            try:
                _run(model, inputs, dict(plan=Plan.dense(model, block_size=BLOCK)))
                report["causal_blocks"] = "no error"
            except NotImplementedError as err:
                report["causal_blocks"] = str(err)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(report, f)
        dist.barrier()  # every rank done before any tears down (a gloo peer can abort otherwise)
    finally:
        dist.destroy_process_group()


def _padded_text_masks(world: int, builders, variants_of) -> dict:
    """HunyuanVideo with two prompt lengths (padded text) under Ulysses: the key mask that reaches the
    processor whole (our plan splits after diffusers builds it) and one built from each rank's shard
    (a plan that splits the embedded tokens, before the mask): both give the single-process output.
    Mochi's text mask ``[B, text]`` becomes a whole key mask (nothing to gather)."""
    from diffusers.models._modeling_parallel import ContextParallelInput as Split
    from helpers import rel_rms

    import sparse_vdit
    from sparse_vdit.integrations.diffusers import context_parallel_plan, parallel

    masks, real = [], parallel.HeadShards.gather_mask

    def recording(self, key_mask, local, text, position):
        whole = real(self, key_mask, local, text, position)
        masks.append([key_mask.shape[-1], whole.shape[-1], whole.reshape(whole.shape[0], -1).sum(-1).tolist()])
        return whole

    parallel.HeadShards.gather_mask = recording
    try:
        report, singles = {}, {}
        for name, family in (("ours", "hunyuan_video"), ("shard_mask", "hunyuan_video"), ("text_mask", "mochi")):
            if family not in singles:
                model, inputs = builders[family]()
                singles[family] = _run(model, inputs, variants_of(model))
            model, inputs = builders[family]()
            config = _config("ulysses", world)
            if name != "shard_mask":  # Mochi: the processor gets the text's [B, text] mask
                sparse_vdit.enable_context_parallel(model, config)
            else:  # the embedded video split before the mask is built: the mask holds this rank's keys
                plan = {k: v for k, v in context_parallel_plan(model).items() if k != "transformer_blocks.0"}
                plan["x_embedder"] = {0: Split(split_dim=1, expected_dims=3, split_output=True)}
                setattr(config, parallel.WHOLE_TEXT, True)
                model.enable_parallelism(config=config, cp_plan=plan)
            masks.clear()
            out = _run(model, inputs, variants_of(model))
            report[f"mask/{name}"] = {"err": rel_rms(out, singles[family]), "masks": masks[:1], "calls": len(masks)}
        return report
    finally:
        parallel.HeadShards.gather_mask = real


def _check_masks(report: dict) -> None:
    video, text = 48, 7  # tiny HunyuanVideo and Mochi: 3 x 4 x 4 video tokens, 7 text tokens, prompts of 3 and 7
    for name, arrived in (("ours", video + text), ("shard_mask", video // 2 + text), ("text_mask", video + text)):
        r = report[f"mask/{name}"]
        assert r["calls"] == 2 and r["masks"] == [[arrived, video + text, [video + 3, video + 7]]], (name, r)
        assert r["err"] < 1e-5, (name, r)


def _check(report: dict, world: int, families: tuple) -> None:
    for family in families:
        assert report[f"{family}/svg_patterns"] == ["spatial", "temporal"], report[f"{family}/svg_patterns"]
        if world == 2:
            assert report[f"{family}/apply_then_enable"] < 1e-5, report[f"{family}/apply_then_enable"]
            assert report[f"{family}/restored"]
        full = report[f"{family}/single_calls"]  # [sequence, heads] of each layer call in one process
        assert len(full) >= 2 and all(heads == 4 for _, heads in full)  # HunyuanVideo: a call per prompt length
        for config in CONFIGS[world]:
            for name in ("dense", "sparse", "svg"):
                # rank 0 ran its global heads 0 .. 4/world - 1 over the whole sequence in every layer
                local = list(range(4 // world))
                assert report[f"{family}/{config}/{name}/calls"] == [[local, [seq, len(local)]] for seq, _ in full]
                r = report[f"{family}/{config}/{name}"]
                assert r["shape"] and r["err"] < 1e-5, (family, config, name, r)
                if name != "dense":
                    assert r["changed"] > 1e-3, (family, name, r)  # the variant does change the output


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one(tmp_path):
    report = spawn(tmp_path, _worker, 2, FAMILIES + VARIANTS)
    _check(report, 2, FAMILIES + VARIANTS)
    _check_masks(report)
    assert "sparse_vdit.enable_context_parallel" in report["foreign_plan"]
    assert "call sparse_vdit.apply first" in report["stock_processors"]
    assert "causal block attention" in report["causal_blocks"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_four_processes_equal_one(tmp_path):
    _check(spawn(tmp_path, _worker, 4, FAMILIES), 4, FAMILIES)


def test_context_parallel_plans_split_video_and_keep_text_whole():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
    from tiny_diffusers import BUILDERS

    from sparse_vdit.integrations.diffusers import context_parallel_plan, family_of

    wan, _ = BUILDERS["wan"]()
    assert context_parallel_plan(wan) == type(wan)._cp_plan  # diffusers' own
    vace = context_parallel_plan(BUILDERS["wan-vace"]()[0])
    assert {k: v for k, v in vace.items() if k != "vace_blocks.0"} == type(wan)._cp_plan
    assert sorted(vace["vace_blocks.0"]) == ["control_hidden_states", "hidden_states"]
    for name in ("hunyuan_video", "cogvideox", "hunyuan_video15", "skyreels_v2", "ltx_video", "mochi"):
        model, _ = BUILDERS[name]()
        plan = context_parallel_plan(model)
        blocks = family_of(model).self_attention[0][0]
        first = plan[f"{blocks}.0"]
        assert list(first) == ["hidden_states"] and first["hidden_states"].split_dim == 1, name  # text is not split
        splits = [s for entry in plan.values() if isinstance(entry, dict) for s in entry.items()]
        assert not any(str(key).startswith("encoder") for key, _ in splits), (name, plan)
        gathers = [k for k, v in plan.items() if isinstance(v, ContextParallelOutput)]
        last = f"{blocks}.{len(getattr(model, blocks)) - 1}"
        assert gathers == ([last] if name == "skyreels_v2" else ["proj_out"]), (name, gathers)
        rotary = plan["rope"] if name != "cogvideox" else plan[""]["image_rotary_emb"]
        rotary = list(rotary.values()) if isinstance(rotary, dict) else rotary
        assert all(isinstance(r, ContextParallelInput) for r in rotary) and len(rotary) == 2, name
        assert all(r.split_output for r in rotary) == (name != "cogvideox"), name  # tables made inside the model


@pytest.mark.parametrize(
    "name, change, config, error, message",
    [
        ("hunyuan_video", dict(num_attention_heads=3), dict(ulysses_degree=2), ValueError,
         "not divisible by the context-parallel degree 2"),
        ("hunyuan_video", {}, dict(ring_degree=2, ulysses_degree=4), ValueError, "ring 2 x Ulysses 4"),
        ("mochi", {}, dict(ulysses_degree=2, ulysses_anything=True), NotImplementedError, "ulysses_anything"),
        ("hunyuan_video", dict(image_condition_type="token_replace"), dict(ulysses_degree=2), NotImplementedError,
         "token_replace"),
        ("skyreels_v2", dict(num_frame_per_block=3), dict(ulysses_degree=2), NotImplementedError, "causal block"),
    ],
    ids=["odd-heads", "degree-above-heads", "uneven-shards", "hunyuan-token-replace", "skyreels-causal-blocks"],
)  # fmt: skip
def test_unsupported_settings_are_refused_before_anything_changes(name, change, config, error, message):
    from diffusers import ContextParallelConfig
    from tiny_diffusers import BUILDERS

    import sparse_vdit

    model, _ = BUILDERS[name]()
    if change:
        model = type(model).from_config(model.config, **change)
    with pytest.raises(error, match=message):
        sparse_vdit.enable_context_parallel(model, ContextParallelConfig(**config))
    assert model._parallel_config is None
