import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from sparse_vdit.organism import model as M  # noqa: E402
from sparse_vdit.organism import train as T  # noqa: E402

TINY_ARGS = [
    "--steps", "3", "--batch-size", "2", "--layers", "1", "--heads", "1", "--ffn-dim", "128",
    "--size", "32", "--sample-steps", "2", "--samples", "2", "--log-every", "1", "--device", "cpu",
    "--workers", "0", "--minutes", "0",
]


def test_three_cpu_steps_write_weights_and_reports(tmp_path):
    info = T.main([*TINY_ARGS, "--out", str(tmp_path)])
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", M.WEIGHTS_FILE, M.SPEC_FILE, "train_info.json", "loss.png", "samples.png"} <= files
    saved = json.loads((tmp_path / "train_info.json").read_text())
    assert saved == json.loads(json.dumps(info))
    run = saved["runs"][-1]
    assert run["steps"] == 3 and saved["total_steps"] == 3 and math.isfinite(saved["final_loss"])
    assert run["command"].startswith(T.PROG) and "--steps 3" in run["command"]
    assert saved["config"]["num_layers"] == 1 and run["data_seed"] == 0
    assert run["device"].startswith("cpu") and saved["wall_seconds"] > 0
    assert saved["spec"]["height"] == 32
    model = M.load_organism(tmp_path)
    assert model.config.num_layers == 1
    video = M.sample(model, saved["preview_captions"][0], steps=1, spec=M.load_spec(tmp_path), progress=False)
    assert video.shape == (1, 8, 3, 32, 32) and torch.isfinite(video).all()


def test_init_continues_from_saved_weights_and_keeps_their_size(tmp_path):
    first = T.main([*TINY_ARGS, "--out", str(tmp_path / "a")])
    i, j = TINY_ARGS.index("--layers"), TINY_ARGS.index("--size")
    args = [a for k, a in enumerate(TINY_ARGS) if k not in (i, i + 1, j, j + 1)]  # size comes from --init
    info = T.main([*args, "--steps", "5", "--data-seed", "1", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert info["config"] == first["config"] and info["spec"] == first["spec"]
    assert info["runs"][:1] == first["runs"] and info["runs"][-1]["start"] == "init"
    assert info["total_videos_seen"] == first["total_videos_seen"] + info["runs"][-1]["videos_seen"]
    third = T.main([*args, "--steps", "6", "--init", str(tmp_path / "b"), "--out", str(tmp_path / "c")])
    assert len(third["runs"]) == 3 and third["total_steps"] == 6
    assert M.load_organism(tmp_path / "c").config.num_layers == 1


def test_lr_schedule_warms_up_then_decays():
    assert T.lr_at(0, 0.0, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(10, 0.0, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(50, 0.5, 1.0, 10) == pytest.approx(0.55)
    assert T.lr_at(99, 1.0, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(99, 3.0, 1.0, 10) == pytest.approx(0.1)


def test_flow_loss_target_is_noise_minus_data():
    class Oracle(torch.nn.Module):
        """Knows x0, so it can return the exact velocity ``(x_t - x0) / t``."""

        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            t = (timestep / 1000).view(-1, 1, 1, 1, 1)
            return ((hidden_states - self.x0) / t,)

    x0 = torch.randn(3, 12, 2, 4, 4)
    loss = T.flow_loss(Oracle(x0), x0, torch.zeros(3, 4, 8), torch.Generator().manual_seed(0), autocast=False)
    assert loss.item() < 1e-8


def test_resume_continues_exactly_like_one_long_run(tmp_path):
    base = [*TINY_ARGS, "--schedule", "constant", "--no-checkpoint"]
    straight = [a for a in base if a != "--no-checkpoint"]
    T.main([*straight[:1], "4", *straight[2:], "--out", str(tmp_path / "long")])
    T.main([*straight[:1], "2", *straight[2:], "--out", str(tmp_path / "split")])
    info = T.main([*straight[:1], "4", *straight[2:], "--resume", str(tmp_path / "split"), "--out", str(tmp_path / "split")])
    assert info["total_steps"] == 4 and [r["start"] for r in info["runs"]] == ["scratch", "resume"]
    a = M.load_organism(tmp_path / "long").state_dict()
    b = M.load_organism(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fidelity_preset_meets_the_size_requirements():
    spec, config = T.spec_and_config(T.parse_args(["--preset", "fidelity"]))
    frames, height, width = spec.token_grid
    assert frames >= 12 and frames * height * width >= 8192 and spec.detail > 0
    assert config["num_attention_heads"] == 6


def test_fidelity_weights_ship_and_load():
    spec = M.load_spec(M.FIDELITY_WEIGHTS_DIR)
    model = M.load_organism(M.FIDELITY_WEIGHTS_DIR)
    assert spec.token_grid == (12, 24, 32) and model.config.num_attention_heads == 6
    size = sum(p.stat().st_size for p in M.FIDELITY_WEIGHTS_DIR.iterdir())
    assert size < 60 * 2**20


def test_qk_gains_learn_at_their_own_rate():
    """--qk-gain-lr: the self-attention q/k norm gains (one pair per layer) in a group of their own whose
    learning rate is the multiple of the others'; one Adam step moves them by about lr x multiple."""
    args = T.parse_args([*TINY_ARGS, "--layers", "2", "--lr", "1e-3", "--qk-gain-lr", "20", "--weight-decay", "0"])
    model = M.build_organism(T.spec_and_config(args)[1], seed=0)
    opt = T._optimizer(model, args, cuda=False)
    gains = [n for n, p in model.named_parameters() if n.endswith(T.QK_GAINS)]
    assert len(gains) == 4 and len(opt.param_groups[-1]["params"]) == 4
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, 20.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group["lr"] = args.lr * group["lr_scale"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert all(moved[n] == pytest.approx(2e-2, rel=1e-3) for n in gains)  # Adam's first step: lr x sign
    assert max(v for n, v in moved.items() if n not in gains) == pytest.approx(1e-3, rel=1e-3)


def test_qk_gain_scale_multiplies_only_the_qk_gains_of_a_fresh_model():
    """--qk-gain-scale S: the run starts from the same model with every q/k norm gain times S."""
    plain = T._start(T.parse_args([*TINY_ARGS, "--layers", "2"]), torch.device("cpu"))[0]
    scaled, ema = T._start(T.parse_args([*TINY_ARGS, "--layers", "2", "--qk-gain-scale", "3"]), torch.device("cpu"))[:2]
    plain, scaled = dict(plain.named_parameters()), dict(scaled.named_parameters())
    gains = [n for n in plain if n.endswith(T.QK_GAINS)]
    assert len(gains) == 4
    for name, param in scaled.items():
        expected = plain[name] * 3 if name in gains else plain[name]
        torch.testing.assert_close(param, expected, rtol=0, atol=0)
    torch.testing.assert_close(dict(ema.named_parameters())[gains[0]], scaled[gains[0]])  # the EMA starts there too
