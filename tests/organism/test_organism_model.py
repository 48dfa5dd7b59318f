import importlib.util
import json

import pytest
import torch

pytest.importorskip("diffusers")

from sparse_vdit.organism import data as D  # noqa: E402
from sparse_vdit.organism import model as M  # noqa: E402

TINY = dict(num_layers=2, num_attention_heads=1, ffn_dim=128)
TINY_SPEC = M.OrganismSpec(height=32, width=32)


@pytest.fixture(scope="module")
def organism():
    return M.build_organism().eval()


@pytest.fixture(scope="module")
def tiny():
    return M.build_organism(M.organism_config(TINY_SPEC, **TINY)).eval()


def test_config_meets_the_size_requirements(organism):
    spec = M.OrganismSpec()
    cfg = organism.config
    frames, h, w = spec.token_grid
    assert frames >= 8 and h * w >= 256
    assert cfg.attention_head_dim == 64 and cfg.patch_size == (1, 2, 2)
    assert cfg.text_dim == spec.text_dim == spec.vocabulary().dim
    assert cfg.in_channels == cfg.out_channels == spec.latent_channels
    n = sum(p.numel() for p in organism.parameters())
    assert n <= 12_000_000 and 2 * n <= 25 * 2**20
    with pytest.raises(ValueError):
        M.organism_config(num_layerz=3)


def test_forward_on_cpu_is_finite_with_the_right_shape(organism):
    spec = M.OrganismSpec()
    x = torch.randn(1, *spec.latent_shape)
    text = spec.vocabulary().embed(D.sample_scene(0, 0).caption)
    with torch.no_grad():
        t = torch.tensor([500.0])
        out = organism(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_build_is_deterministic_by_seed():
    cfg = M.organism_config(TINY_SPEC, **TINY)
    a, b, c = M.build_organism(cfg, seed=1), M.build_organism(cfg, seed=1), M.build_organism(cfg, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_encode_decode_round_trip_is_exact():
    video = D.make_batch(1, 2).videos
    z = M.encode_video(video)
    assert z.shape == (2, *M.OrganismSpec().latent_shape)
    assert torch.equal(M.decode_video(z), video)
    z4 = M.encode_video(video, factor=4)
    assert z4.shape == (2, 48, 8, 16, 16) and torch.equal(M.decode_video(z4, factor=4), video)


def test_save_load_round_trip(tiny, tmp_path):
    M.save_organism(tiny, tmp_path, TINY_SPEC)
    assert {"config.json", M.WEIGHTS_FILE, M.SPEC_FILE} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert M.load_spec(tmp_path) == TINY_SPEC
    loaded = M.load_organism(tmp_path)
    for (name, a), (_, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.half().float(), b), name  # stored in fp16
    assert not loaded.training
    half = M.load_organism(tmp_path, dtype=torch.bfloat16)
    assert half.patch_embedding.weight.dtype == torch.bfloat16
    assert half.scale_shift_table.dtype == torch.float32  # Wan keeps its modulation in fp32
    with pytest.raises(FileNotFoundError):
        M.load_organism(tmp_path / "missing")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="from_pretrained needs accelerate")
def test_saved_folder_loads_with_from_pretrained(tiny, tmp_path):
    from diffusers import WanTransformer3DModel

    M.save_organism(tiny, tmp_path, TINY_SPEC)
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert torch.equal(model.proj_out.weight, tiny.proj_out.weight.half().float())


class CountingProcessor:
    """Wraps an attention processor and counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sample_runs_through_the_transformer_forward(tiny, scheduler):
    captions = [D.sample_scene(0, i).caption for i in range(2)]
    attn = tiny.blocks[0].attn1
    original = attn.processor
    counter = CountingProcessor(original)
    attn.set_processor(counter)
    try:
        seen = []
        v = M.sample(
            tiny, captions, seed=3, steps=2, spec=TINY_SPEC, scheduler=scheduler, progress=False,
            callback=lambda i, t: seen.append(i),
        )
    finally:
        attn.set_processor(original)
    assert v.shape == (2, 8, 3, 32, 32) and torch.isfinite(v).all()
    assert v.min() >= -1 and v.max() <= 1
    assert counter.calls == 2 and seen == [0, 1]  # one batched (cond + uncond) call per step
    again = M.sample(tiny, captions, seed=3, steps=2, spec=TINY_SPEC, scheduler=scheduler, progress=False)
    assert torch.equal(v, again)
    other = M.sample(tiny, captions, seed=4, steps=2, spec=TINY_SPEC, scheduler=scheduler, progress=False)
    assert not torch.equal(v, other)
    # video i of seed s starts from noise seed s + i, whatever else is in the batch
    one = M.sample(tiny, captions[1], seed=[5], steps=2, spec=TINY_SPEC, scheduler=scheduler, progress=False)
    assert one.shape == (1, 8, 3, 32, 32)
    torch.testing.assert_close(one[0], other[1], atol=1e-4, rtol=0)


class Oracle(torch.nn.Module):
    """Returns the exact rectified-flow velocity towards a known latent ``x0``."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.patch_embedding = torch.nn.Conv3d(1, 1, 1)  # where sample() reads device and dtype

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        t = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
        return ((hidden_states - self.x0) / t,)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sampler_follows_the_training_convention(scheduler):
    """With the velocity the training loss asks for, the sampler lands on the data."""
    video = D.make_batch(2, 1, height=32, width=32).videos
    caption = "red plain disc stays, gradient background still"
    oracle = Oracle(M.encode_video(video))
    out = M.sample(oracle, caption, steps=4, spec=TINY_SPEC, scheduler=scheduler, progress=False)
    # UniPC hands the model integer timesteps (sigma * 1000 rounded), so it is only nearly exact
    torch.testing.assert_close(out, video, atol=1e-4 if scheduler == "euler" else 1e-2, rtol=0)


def test_sample_without_guidance(tiny):
    caption = "red plain disc stays, gradient background still"
    v = M.sample(tiny, caption, steps=1, guidance_scale=1.0, spec=TINY_SPEC, progress=False)
    assert v.shape == (1, 8, 3, 32, 32) and torch.isfinite(v).all()


@pytest.mark.skipif(not (M.WEIGHTS_DIR / "config.json").exists(), reason="no shipped organism weights yet")
def test_shipped_weights_load_and_denoise_one_step():
    spec = M.load_spec()
    model = M.load_organism()
    v = M.sample(model, D.sample_scene(0, 0).caption, steps=1, spec=spec, progress=False)
    assert v.shape == (1, spec.frames, 3, spec.height, spec.width) and torch.isfinite(v).all()
