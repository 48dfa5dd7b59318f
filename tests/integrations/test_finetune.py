"""`sparse-vdit finetune` (sparse-aware LoRA distillation) on a tiny WanPipeline with its own tiny
T5 and tokenizer, saved to disk (CPU, reference backend)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")  # diffusers needs it to load Wan with from_pretrained

from helpers import rel_rms  # noqa: E402
from sparse_vdit import Plan  # noqa: E402
from sparse_vdit.cli.main import main  # noqa: E402
from sparse_vdit.integrations.diffusers.training import Distiller, add_lora, recipe_for  # noqa: E402
from sparse_vdit.patterns import diagonal, multi_diagonal  # noqa: E402
from test_generate_cli import tiny_wan_pipeline  # noqa: E402

torch.set_num_threads(1)
WORDS = ["<pad>", "</s>", "<unk>"] + "a red panda surfing cat on the moon blue ball rolling".split()
SIZE = ["--height", "64", "--width", "64", "--frames", "9"]  # latents 16 x 3 x 8 x 8: 3 x 4 x 4 tokens
FAST = ["--device", "cpu", "--backend", "reference", "--block-size", "16", "--rank", "4", "--denoise-steps", "4",
        "--no-progress"]  # fmt: skip
SPARSE = [[diagonal(0.5), multi_diagonal(0.2)]] * 2  # 2 layers x 2 heads


def tiny_wan_pipeline_with_text():
    """The generate test's tiny WanPipeline with a tiny UMT5 encoder and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pipe = tiny_wan_pipeline()
    torch.manual_seed(1)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8))  # fmt: skip
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(pipeline folder, data folder of two captioned gifs)."""
    import imageio.v3 as iio
    import numpy as np

    root = tmp_path_factory.mktemp("finetune")
    tiny_wan_pipeline_with_text().save_pretrained(root / "pipe")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, caption in (("cat", "a cat on the moon"), ("panda", "a red panda surfing")):
        iio.imwrite(data / f"{name}.gif", rng.integers(0, 256, (10, 40, 56, 3), dtype=np.uint8))
        (data / f"{name}.txt").write_text(caption)
    return root / "pipe", data


def _batch(pipe):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, 3, 8, 8, generator=g)
    text = {"encoder_hidden_states": torch.randn(2, 8, 32, generator=g)}
    return latents, text, torch.randn(latents.shape, generator=g)


def test_finetune_trains_saves_a_loadable_adapter_and_resumes(saved, tmp_path):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    pipe_dir, data = saved
    out = tmp_path / "out"
    args = ["finetune", "--model", str(pipe_dir), "--data", str(data), "--density", "0.4", "--out", str(out),
            "--lr", "1e-2", "--batch-size", "2", *SIZE, *FAST]  # fmt: skip
    assert main([*args, "--steps", "3"]) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["command"].startswith(f"sparse-vdit finetune --model {pipe_dir} --density 0.4")
    assert info["pipeline"] == "WanPipeline" and info["samples"] == 2 and not info["noise_only"]
    assert info["steps"] == 3 and len(info["losses"]) == 3 and info["encoded_now"] == 2
    assert info["latent_shape"] == [16, 3, 8, 8] and 0 < info["plan_density"] < 1
    assert Plan.load(out / "plan.json").made_by["method"] == "uniform"
    saved_lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved_lora and all(k.startswith("transformer.") and ".lora_" in k for k in saved_lora)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved_lora.items())  # trained

    pipe = DiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True)
    pipe.load_lora_weights(out)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    assert loaded.keys() == {k.removeprefix("transformer.") for k in saved_lora}
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in saved_lora.items())

    # generate with the adapter and the plan it was trained with
    video = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(pipe_dir), "--plan", str(out / "plan.json"), "--lora", str(out),
                 "--prompt", "a red cat", "--out", str(video), "--steps", "2", *SIZE, *FAST[:6]]) == 0  # fmt: skip
    assert json.loads(video.with_suffix(".json").read_text())["plan_density"] == pytest.approx(info["plan_density"])

    # a rerun reads the encoded data from the cache and continues from the checkpoint
    assert main([*args, "--steps", "4", "--resume"]) == 0
    again = json.loads((out / "train_info.json").read_text())
    assert again["encoded_now"] == 0 and again["steps"] == 4 and again["losses"][:3] == info["losses"]


def test_finetune_without_data_distills_on_noise(saved, tmp_path, capsys):
    out = tmp_path / "noise"
    plan = Plan.from_layers(tiny_wan_pipeline().transformer, SPARSE, block_size=16)
    plan.save(tmp_path / "plan.json")
    assert main(["finetune", "--model", str(saved[0]), "--plan", str(tmp_path / "plan.json"), "--prompt", "a blue ball",
                 "--out", str(out), "--steps", "2", *SIZE, *FAST]) == 0  # fmt: skip
    info = json.loads((out / "train_info.json").read_text())
    assert info["noise_only"] and info["samples"] == 1 and len(info["losses"]) == 2
    assert "trained 2 steps on noise (random latents; no --data)" in capsys.readouterr().out
    assert info["plan_density"] == pytest.approx(plan.density(__import__("sparse_vdit").VideoLayout(3, 4, 4)))


def _distill(distiller, params, latents, text, noise, steps: int) -> list[float]:
    """``steps`` Adam steps (lr 1e-2) of ``distiller``'s loss at denoising step 2 on one fixed batch; the losses."""
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = distiller.loss(latents, text, 2, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    distiller.close()
    return losses


def test_distillation_lowers_the_loss_on_a_fixed_batch():
    pipe = tiny_wan_pipeline()
    params = add_lora(pipe.transformer, rank=4)
    pipe.transformer.enable_gradient_checkpointing()
    distiller = Distiller(pipe, recipe_for(pipe), Plan.from_layers(pipe.transformer, SPARSE, block_size=16), steps=4,
                          backend="reference")  # fmt: skip
    latents, text, noise = _batch(pipe)
    losses = _distill(distiller, params, latents, text, noise, steps=4)
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0], losses


def test_dense_plan_distillation_has_the_unpatched_gradients():
    """With a dense plan the student is the unpatched model with its adapter, the teacher the
    unpatched model without it: the same loss and LoRA gradients as computing that by hand."""
    pipe = tiny_wan_pipeline()
    transformer = pipe.transformer
    params = add_lora(transformer, rank=4)
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # lora_B != 0 (PEFT starts it at zero): the loss is not zero
        for n, p in zip(names, params):
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    latents, text, noise = _batch(pipe)
    distiller = Distiller(pipe, recipe_for(pipe), Plan.dense(transformer, block_size=16), steps=4, backend="reference")
    loss = distiller.loss(latents, text, 1, noise)
    loss.backward()
    got = {n: p.grad.clone() for n, p in zip(names, params)}
    distiller.close()

    transformer.zero_grad(set_to_none=True)
    sigma, timestep = float(distiller.sigmas[1]), distiller.timesteps[1].expand(2)
    inputs = dict(hidden_states=(1 - sigma) * latents + sigma * noise, timestep=timestep, return_dict=False,
                  encoder_hidden_states=text["encoder_hidden_states"])  # fmt: skip
    transformer.disable_adapters()
    with torch.no_grad():
        target = transformer(**inputs)[0]
    transformer.enable_adapters()
    expected_loss = torch.nn.functional.mse_loss(transformer(**inputs)[0], target)
    expected_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-6) and float(loss.detach()) > 0
    for n, p in zip(names, params):
        assert rel_rms(got[n], p.grad) < 1e-5, n


def test_wan22_ti2v_gets_one_timestep_per_token():
    pipe = tiny_wan_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    add_lora(pipe.transformer, rank=4)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].shape), with_kwargs=True)
    distiller = Distiller(pipe, recipe_for(pipe), Plan.dense(pipe.transformer, block_size=16), steps=4, backend="reference")
    latents, text, noise = _batch(pipe)
    assert float(distiller.loss(latents, text, 0, noise).detach()) == 0.0  # adapter at zero, dense: the teacher
    distiller.close()
    assert seen == [(2, 3 * 4 * 4)] * 2


def test_bad_inputs_give_one_line_errors(saved, tmp_path):
    pipe_dir, data = saved
    base = ["finetune", "--model", str(pipe_dir), "--out", str(tmp_path / "o"), *SIZE, *FAST]

    def fails(args, match):
        with pytest.raises(SystemExit, match=match) as err:
            main(args)
        assert "\n" not in str(err.value) and str(err.value).startswith("sparse-vdit finetune: ")

    fails([*base, "--data", str(data)], "give --plan FILE or --density D")
    fails([*base, "--density", "0.3", "--data", str(tmp_path / "nowhere")], "data folder .* does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    fails([*base, "--density", "0.3", "--data", str(tmp_path / "empty")], "no videos")
    (tmp_path / "uncaptioned").mkdir()
    (tmp_path / "uncaptioned" / "clip.gif").write_bytes((data / "cat.gif").read_bytes())
    fails([*base, "--density", "0.3", "--data", str(tmp_path / "uncaptioned")], "clip.gif has no caption")
    fails([*base, "--density", "0.3"], "give --data FOLDER, or --prompts FILE")
    fails([*base[:-len(FAST)], "--frames", "13", *FAST, "--density", "0.3", "--data", str(data)],
          "cat.gif has 10 frame.s.; --frames 13 needs at least 13")  # fmt: skip
    Plan.dense("wan2.1-t2v-1.3b").save(tmp_path / "other.json")
    fails([*base, "--plan", str(tmp_path / "other.json"), "--data", str(data)], "the plan is for wan2.1-t2v-1.3b")
    (tmp_path / "cog").mkdir()
    (tmp_path / "cog" / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    fails(["finetune", "--model", str(tmp_path / "cog"), "--density", "0.3", "--data", str(data), *FAST],
          "finetune supports the flow-matching pipelines WanPipeline, HunyuanVideoPipeline; got CogVideoXPipeline")
    fails(["finetune", "--model", str(tmp_path / "no-pipe"), "--density", "0.3", "--data", str(data), *FAST],
          "cannot load a diffusers pipeline|neither a local folder")  # fmt: skip


def test_unsupported_pipelines_are_refused():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_wan_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="not flow-matching"):
        recipe_for(pipe)

    pipe = tiny_wan_pipeline()
    pipe.register_modules(transformer_2=pipe.transformer)
    with pytest.raises(ValueError, match="two-expert Wan2.2 pipelines"):
        recipe_for(pipe)

    class CogVideoXPipeline:  # recognised by class name, as diffusers' would be
        scheduler = None

    with pytest.raises(ValueError, match="finetune supports the flow-matching pipelines WanPipeline, "
                                         "HunyuanVideoPipeline; got CogVideoXPipeline"):  # fmt: skip
        recipe_for(CogVideoXPipeline())


def tiny_hunyuan_pipeline():
    """A HunyuanVideoPipeline of tiny parts: the tiny transformer of ``tiny_diffusers``, a tiny
    VAE, Llama and CLIP text encoders on the word-level tokenizer."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from tiny_diffusers import hunyuan

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    transformer, _ = hunyuan()
    torch.manual_seed(2)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4)  # fmt: skip
    llama = LlamaModel(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=8))  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1))  # fmt: skip
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
                                tokenizer_2=tokenizer)  # fmt: skip


def test_hunyuan_video_recipe_encodes_and_distills():
    pipe = tiny_hunyuan_pipeline()
    recipe = recipe_for(pipe)
    text = recipe.encode_text(pipe, ["a red panda surfing", "a cat"])
    assert text[0].keys() == {"encoder_hidden_states", "pooled_projections", "encoder_attention_mask"}
    valid = [int(t["encoder_attention_mask"].sum()) for t in text]  # the template's words count too
    assert valid[0] - valid[1] == 2 and text[0]["pooled_projections"].shape == (8,)
    video = torch.rand(3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = recipe.encode_video(pipe, video)
    assert latents.shape == recipe.latent_shape(pipe, 64, 64, 5) == (4, 2, 8, 8)
    batch = torch.stack([latents, latents.flip(-1)])
    batch_text = {k: torch.stack([t[k] for t in text]) for k in text[0]}
    noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(1))
    params = add_lora(pipe.transformer, rank=4)
    timesteps, sigmas = recipe.schedule(pipe, 4)
    assert timesteps[0] == 1000 and sigmas[0] == 1 and torch.all(sigmas.diff() < 0)
    # the adapter starts at zero: with a dense plan the student is the teacher exactly
    dense = Distiller(pipe, recipe, Plan.dense(pipe.transformer, block_size=16), steps=4, backend="reference")
    assert float(dense.loss(batch, batch_text, 1, noise).detach()) == 0.0
    dense.close()
    plan = Plan.uniform(pipe.transformer, diagonal(0.0), block_size=16)
    distiller = Distiller(pipe, recipe, plan, steps=4, backend="reference")
    losses = _distill(distiller, params, batch, batch_text, noise, steps=3)
    assert losses[0] > 0 and losses[-1] < losses[0], losses


@pytest.mark.gpu
def test_finetune_on_the_gpu_in_bf16_with_the_triton_backward(saved, tmp_path):
    out = tmp_path / "gpu"
    assert main(["finetune", "--model", str(saved[0]), "--data", str(saved[1]), "--density", "0.4", "--out", str(out),
                 "--steps", "3", "--lr", "1e-2", *SIZE, "--device", "cuda", "--dtype", "bf16", "--backend", "triton",
                 "--block-size", "16", "--rank", "4", "--denoise-steps", "4", "--no-progress"]) == 0  # fmt: skip
    info = json.loads((out / "train_info.json").read_text())
    assert info["dtype"] == "bfloat16" and len(info["losses"]) == 3
    assert all(0 < loss < float("inf") for loss in info["losses"])
