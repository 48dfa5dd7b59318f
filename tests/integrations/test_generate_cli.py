"""`sparse-vdit generate` end to end on a tiny WanPipeline saved to disk (no tokenizer, CPU)."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("accelerate")  # diffusers needs it to load Wan with from_pretrained

from sparse_vdit import Plan  # noqa: E402
from sparse_vdit.cli.main import main  # noqa: E402
from sparse_vdit.integrations.diffusers import apply, remove  # noqa: E402
from sparse_vdit.patterns import diagonal, multi_diagonal  # noqa: E402


def tiny_wan_pipeline():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)


def test_generate_writes_video_and_sidecar(tmp_path):
    pipe = tiny_wan_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    g = torch.Generator().manual_seed(0)
    torch.save({"prompt_embeds": torch.randn(1, 8, 32, generator=g),
                "negative_prompt_embeds": torch.randn(1, 8, 32, generator=g)}, tmp_path / "embeds.pt")  # fmt: skip
    plan = Plan.from_layers(pipe.transformer, [[diagonal(0.5), multi_diagonal(0.2)]] * 2, warmup_steps=1, block_size=16)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "out" / "video.mp4"
    code = main([
        "generate", "--model", str(tmp_path / "pipe"), "--plan", str(tmp_path / "plan.json"),
        "--prompt-embeds", str(tmp_path / "embeds.pt"), "--out", str(out), "--height", "64", "--width", "64",
        "--frames", "9", "--steps", "3", "--guidance-scale", "4", "--backend", "reference", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    assert out.stat().st_size > 0
    import imageio.v3 as iio

    assert iio.imread(out).shape == (9, 64, 64, 3)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["steps"] == 3 and len(info["step_seconds"]) == 3 and len(info["attention_seconds"]) == 3
    assert 0 < info["attention_share"] < 1
    assert info["layout"].startswith("3x4x4")
    expected = plan.density(__import__("sparse_vdit").VideoLayout(3, 4, 4), steps=3)
    assert info["plan_density"] == pytest.approx(expected) and expected < 1


def test_dense_plan_video_equals_unpatched_pipeline():
    pipe = tiny_wan_pipeline()
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 8, 32, generator=g), "negative_prompt_embeds": torch.randn(1, 8, 32, generator=g)}
    kwargs = dict(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=4.0, output_type="pt", **embeds)
    expected = pipe(generator=torch.Generator().manual_seed(1), **kwargs).frames
    state = apply(pipe, Plan.dense(pipe))
    seen = []
    state.observers.append(lambda call, patterns, out: seen.append((state.steps.generation, call.step)))
    out = pipe(generator=torch.Generator().manual_seed(1), **kwargs).frames
    pipe(generator=torch.Generator().manual_seed(1), **kwargs)  # a second generation starts at step 0 again
    remove(pipe)
    assert torch.allclose(out, expected, atol=1e-5)
    # 2 layers x (cond + uncond) per step, 2 steps, 2 generations
    assert seen == [(g, s) for g in range(2) for s in range(2) for _ in range(4)]
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_plan_for_another_model_is_refused_clearly(tmp_path):
    tiny_wan_pipeline().save_pretrained(tmp_path / "pipe")
    Plan.dense("wan2.1-t2v-1.3b").save(tmp_path / "plan.json")
    torch.save({"prompt_embeds": torch.zeros(1, 8, 32)}, tmp_path / "unused.pt")
    with pytest.raises(SystemExit, match="the plan is for wan2.1-t2v-1.3b .* but the model is"):
        main(["generate", "--model", str(tmp_path / "pipe"), "--plan", str(tmp_path / "plan.json"),
              "--prompt-embeds", str(tmp_path / "unused.pt"), "--device", "cpu", "--out", str(tmp_path / "v.mp4")])  # fmt: skip
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["generate", "--model", str(tmp_path / "pipe"), "--plan", str(tmp_path / "bad.json"),
              "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")])  # fmt: skip


def test_missing_model_error_is_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="neither a local folder nor in the Hugging Face cache"):
        main(["generate", "--model", "nobody/no-such-model-xyz", "--plan", "dense", "--prompt", "a cat",
              "--device", "cpu", "--out", str(tmp_path / "v.mp4")])  # fmt: skip
