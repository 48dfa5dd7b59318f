"""Pipelines with two experts (Wan2.2 A14B: transformer, transformer_2): both patched, one plan
each, one step count, the offline search over both; per-expert plan files."""

import pytest
import torch

import sparse_vdit
from sparse_vdit import Plan, PlanError
from sparse_vdit.integrations.diffusers import state_of
from sparse_vdit.plan import ExpertPlans, load_plans
from sparse_vdit.patterns import diagonal
from tiny_diffusers import BLOCK, wan

pytest.importorskip("diffusers")
STEPS = 4  # boundary_ratio 0.8: timesteps 999, 900 on transformer; 750, 500 on transformer_2


def wan22_pipeline():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    high, _ = wan(seed=0)
    low, _ = wan(seed=1)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]).eval()
    scheduler = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=high,
                       transformer_2=low, boundary_ratio=0.8)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = {"prompt_embeds": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(5)),
          "negative_prompt_embeds": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(6)),
          "height": 64, "width": 64, "num_frames": 9, "guidance_scale": 3.0, "guidance_scale_2": 2.0}  # fmt: skip


def generate(pipe):
    with torch.no_grad():
        return pipe(**PROMPT, num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames  # fmt: skip


def test_both_experts_are_patched_with_their_own_plans_and_count_the_pipeline_steps():
    pipe = wan22_pipeline()
    dense_out = generate(pipe)
    plans = ExpertPlans({"transformer": Plan.dense(pipe.transformer, block_size=BLOCK),
                         "transformer_2": Plan.uniform(pipe.transformer_2, diagonal(0.5), block_size=BLOCK)})  # fmt: skip
    state = sparse_vdit.apply(pipe, plans, backend="reference")
    assert set(state.experts) == {"transformer", "transformer_2"}
    seen = {name: set() for name in state.experts}
    for name, s in state.experts.items():
        s.observers.append(lambda call, patterns, out, name=name: seen[name].add((call.step, patterns is None)))
    sparse_out = generate(pipe)
    assert seen == {"transformer": {(0, True), (1, True)}, "transformer_2": {(2, False), (3, False)}}
    assert state.experts["transformer_2"].plan is plans["transformer_2"]
    assert not torch.equal(sparse_out, dense_out)
    sparse_vdit.remove(pipe)
    assert state_of(pipe) is None and state_of(pipe.transformer_2) is None
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer_2._forward_pre_hooks
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(generate(pipe), dense_out)


def test_a_dense_plan_on_both_experts_gives_the_unpatched_pipeline_output():
    pipe = wan22_pipeline()
    expected = generate(pipe)
    with sparse_vdit.sparse(pipe, Plan.dense(pipe.transformer, block_size=BLOCK)) as state:  # one plan fits both
        assert state.experts["transformer_2"].plan is state.plan
        assert torch.equal(generate(pipe), expected)


def test_expert_plans_refuse_other_components_and_leave_the_pipeline_untouched():
    pipe = wan22_pipeline()
    with pytest.raises(PlanError, match="the plans are for transformer, but the model's denoising transformers are "
                                        "transformer, transformer_2"):  # fmt: skip
        sparse_vdit.apply(pipe, ExpertPlans({"transformer": Plan.dense(pipe.transformer)}))
    assert state_of(pipe) is None and not pipe.transformer._forward_pre_hooks


def test_expert_plan_files_round_trip_and_single_plan_files_still_load(tmp_path):
    a = Plan.dense(("wan", 2, 4), block_size=BLOCK)
    b = Plan.uniform(("wan", 2, 4), diagonal(0.5), block_size=BLOCK)
    path = ExpertPlans({"transformer_2": b, "transformer": a}).save(tmp_path / "experts.json")
    loaded = load_plans(path)
    assert isinstance(loaded, ExpertPlans) and list(loaded) == ["transformer", "transformer_2"]
    assert loaded["transformer"] == a and loaded["transformer_2"] == b
    single = a.save(tmp_path / "single.json")
    assert load_plans(single) == a and Plan.load(single) == a
    with pytest.raises(PlanError, match="holds one plan per expert .*sparse_vdit.load_plans"):
        Plan.load(path)
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text().replace('"transformer_2"', '"transformer_3"'))
    with pytest.raises(PlanError, match="unknown key 'transformer_3'"):
        load_plans(bad)


def test_search_covers_both_experts_each_on_the_steps_it_runs():
    pipe = wan22_pipeline()
    plans = sparse_vdit.search(pipe, [PROMPT], steps=STEPS, warmup_steps=0, buckets=2, block_size=BLOCK,
                               backend="reference", cost="blocks", progress=False, epsilon=10.0, lam=0.01,
                               dense_competes=False)  # fmt: skip
    assert isinstance(plans, ExpertPlans) and list(plans) == ["transformer", "transformer_2"]
    assert plans["transformer"].made_by["bucket_starts"] == [0, 1]
    assert plans["transformer_2"].made_by["bucket_starts"] == [2, 3]
    for plan in plans.values():
        assert plan.made_by["stats"]["layer_calls"] == 2 * 2 * 2  # 2 steps x 2 layers x (cond + uncond)
        assert any(p.name != "dense" for r in plan.schedule for heads in r.layers for p in heads)  # searched
