"""End-to-end benchmark: one denoising forward of real-size video transformers, dense vs sparse.

    python bench/e2e.py [--models wan-1.3b,cogvideox1.5] [--modes eager,compiled] [--repeats 2]
                        [--densities 0.5,0.3,0.2,0.1] [--out bench/results/e2e.json] [--budget-s 540]
    python bench/e2e.py --dry-run          # tiny models on the CPU (results to a temp file)

Models (diffusers configs as published, random weights, bf16; built on the meta device and
materialised on the GPU, so no download): ``wan-1.3b`` (Wan2.1-T2V-1.3B, 832x480, 81 frames),
``wan-14b`` (Wan2.1-T2V-14B, 1280x720), ``hunyuan`` (HunyuanVideo, 1280x720, 129 frames, 256
text tokens of which 64 real), ``cogvideox1.5`` (CogVideoX1.5-5B, 1360x768, 81 frames).

Variants, each in each mode (``eager``; ``compiled`` = every transformer block compiled with
``torch.compile(fullgraph=True)``, the same setting on every variant):

- ``unpatched``: the diffusers model as users run it, SDPA with cuDNN given priority;
- ``dense``: our integration with a dense plan ("best dense": cuDNN or FlashAttention-4 dense,
  padded text keys dropped);
- ``sparse-NN``: our integration with a plan of NN% attention density (computed share of
  blocks at the model's layout, text included): 5% skipped heads, some dense heads at high
  densities, the rest diagonal / multi-diagonal / vertical with widths found by bisection.
- ``svg-NN`` (``--svg-densities``, default 0.3,0.25,0.2): Sparse VideoGen, heads classified
  spatial/temporal online in every layer call (64 sampled rows; the first layer dense, as SVG
  does; no warm-up steps: every forward here is a sparse step); ``svg-NN-flex``: the same through
  FlexAttention (``--svg-backends``, default ``auto,flex``). Their ``profile`` column is the
  classification's own time (CUDA events) as a share of the attention time, which includes it;
  ``density`` is the realised one (dense first layer included).

Reported: forward latency (median of ``--repeats`` after one warm-up, CUDA events), attention
time and its share (CUDA events around the attention calls), speedup against ``unpatched`` and
``dense`` of the same mode. Results merge into ``--out`` by (model, mode, variant), so separate
calls build one file; a table is printed last. ``--budget-s`` skips what would not fit the
time left (one 10-minute GPU call); suggested splits for an H100:

    python bench/e2e.py --models wan-1.3b,cogvideox1.5
    python bench/e2e.py --models wan-14b --modes eager     (then --modes compiled)
    python bench/e2e.py --models hunyuan --modes eager --repeats 1   (then --modes compiled)

SVG rows alone (the speedups need ``unpatched`` and ``dense`` from the same call, which run anyway):

    python bench/e2e.py --models wan-14b --modes eager --densities ""
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import sparse_vdit
from sparse_vdit import Plan, VideoLayout, compile_layer
from sparse_vdit.integrations.diffusers import model_spec
from sparse_vdit.kernels import fa4
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical
from sparse_vdit.timing import clock, seconds_between

START = time.perf_counter()


def say(*args) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s]", *args, flush=True)


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    name: str
    cls: str  # diffusers class name
    config: dict
    latent: tuple  # hidden_states shape
    text: int  # text tokens given to the model
    text_valid: int | None = None  # real (unpadded) prompt tokens, HunyuanVideo
    extra: dict = field(default_factory=dict)


WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, attention_head_dim=128)  # fmt: skip
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
               qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
               rope_theta=256.0, rope_axes_dim=(16, 56, 56))  # fmt: skip
COG15 = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
             flip_sin_to_cos=True, freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True,
             norm_eps=1e-5, num_attention_heads=48, num_layers=42, out_channels=16, patch_bias=False, patch_size=2,
             patch_size_t=2, sample_frames=81, sample_height=300, sample_width=300, spatial_interpolation_scale=1.875,
             temporal_compression_ratio=4, temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512,
             timestep_activation_fn="silu", use_learned_positional_embeddings=False,
             use_rotary_positional_embeddings=True)  # fmt: skip

MODELS = {
    "wan-1.3b": Bench("wan-1.3b", "WanTransformer3DModel", {**WAN, "num_attention_heads": 12, "ffn_dim": 8960,
                      "num_layers": 30}, (1, 16, 21, 60, 104), 512),  # fmt: skip
    "wan-14b": Bench("wan-14b", "WanTransformer3DModel", {**WAN, "num_attention_heads": 40, "ffn_dim": 13824,
                     "num_layers": 40}, (1, 16, 21, 90, 160), 512),  # fmt: skip
    "hunyuan": Bench("hunyuan", "HunyuanVideoTransformer3DModel", HUNYUAN, (1, 16, 33, 90, 160), 256, 64),
    "cogvideox1.5": Bench("cogvideox1.5", "CogVideoXTransformer3DModel", COG15, (1, 22, 16, 96, 170), 226),
}

# --dry-run: the same families, tiny (a few layers, 4 heads, small video), on the CPU
TINY = {
    "wan-1.3b": Bench("wan-1.3b", "WanTransformer3DModel", {**WAN, "attention_head_dim": 32, "text_dim": 32,
                      "num_attention_heads": 4, "ffn_dim": 64, "num_layers": 2}, (1, 16, 4, 16, 20), 8),  # fmt: skip
    "wan-14b": Bench("wan-14b", "WanTransformer3DModel", {**WAN, "attention_head_dim": 32, "text_dim": 32,
                     "num_attention_heads": 4, "ffn_dim": 64, "num_layers": 3}, (1, 16, 4, 16, 16), 8),  # fmt: skip
    "hunyuan": Bench("hunyuan", "HunyuanVideoTransformer3DModel", {**HUNYUAN, "num_attention_heads": 4,
                     "attention_head_dim": 32, "num_layers": 1, "num_single_layers": 2, "num_refiner_layers": 1,
                     "text_embed_dim": 32, "pooled_projection_dim": 16, "rope_axes_dim": (8, 12, 12)},
                     (1, 16, 4, 16, 16), 24, 9),  # fmt: skip
    "cogvideox1.5": Bench("cogvideox1.5", "CogVideoXTransformer3DModel", {**COG15, "num_attention_heads": 4,
                          "attention_head_dim": 32, "num_layers": 2, "text_embed_dim": 32, "time_embed_dim": 16,
                          "max_text_seq_length": 10}, (1, 8, 16, 16, 20), 10),  # fmt: skip
}


@contextlib.contextmanager
def parameters_on_meta():
    """Module parameters go to the meta device as they are registered; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@torch.no_grad()
def build(bench: Bench, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformer with random weights: parameters built on meta, materialised on ``device``."""
    import diffusers

    cls = getattr(diffusers, bench.cls)
    with parameters_on_meta():
        model = cls(**bench.config)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{module_name}.{name}".split(".")
            kind = torch.float32 if keep & set(full) else dtype
            value = torch.empty(param.shape, device=device, dtype=kind)
            if param.dim() >= 2:
                value.normal_(0.0, param[0].numel() ** -0.5, generator=g)
            elif name == "bias":
                value.zero_()
            elif "scale_shift" in name:
                value.normal_(0.0, 0.02, generator=g)
            else:
                value.fill_(1.0)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device, torch.float32 if buf.dtype == torch.float64 else buf.dtype)
    return model.eval()


def make_inputs(bench: Bench, model, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    text_dim = bench.config.get("text_dim") or bench.config["text_embed_dim"]
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    inputs = dict(hidden_states=randn(*bench.latent), encoder_hidden_states=randn(1, bench.text, text_dim),
                  timestep=torch.tensor([999], device=device), return_dict=False)  # fmt: skip
    if bench.cls.startswith("Hunyuan"):
        mask = torch.zeros(1, bench.text, dtype=torch.long, device=device)
        mask[:, : bench.text_valid] = 1
        inputs.update(encoder_attention_mask=mask, pooled_projections=randn(1, bench.config["pooled_projection_dim"]),
                      guidance=torch.tensor([6000.0], device=device), timestep=inputs["timestep"].to(dtype))  # fmt: skip
    if bench.cls.startswith("CogVideoX"):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        c = bench.config
        frames, h, w = bench.latent[1] // c["patch_size_t"], bench.latent[3] // c["patch_size"], bench.latent[4] // c["patch_size"]
        base = (c["sample_height"] // c["patch_size"], c["sample_width"] // c["patch_size"])
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=c["attention_head_dim"], crops_coords=None, grid_size=(h, w), temporal_size=frames,
            grid_type="slice", max_size=base, device=device,
        )  # fmt: skip
    return inputs


def layout_of(bench: Bench, model, inputs) -> VideoLayout:
    """The self-attention layout of this input (video grid after patchify + text), for plan densities."""
    from sparse_vdit.integrations.diffusers import family_of

    family = family_of(model)
    f, h, w = family.latent_grid(model, inputs["hidden_states"])
    if family.text_position == "none":
        return VideoLayout(f, h, w)
    valid = bench.text_valid if bench.text_valid is not None and bench.text_valid < bench.text else None
    return VideoLayout(f, h, w, bench.text, family.text_position, valid)


# --- plans -------------------------------------------------------------------------------------


def mixed_plan(spec, layout: VideoLayout, density: float, block_size: int, skip_share: float = 0.05, seed: int = 0) -> Plan:
    """A plan of about ``density`` (computed blocks at ``layout``) mixing the five patterns.

    ``skip_share`` of all heads skip, ``max(0, density - 0.2) / 2`` are dense, the rest are split
    evenly between diagonal, multi-diagonal and vertical (first frame + band); one band scale for
    all of them is found by bisection.
    """
    total = spec.num_layers * spec.num_heads
    kinds = ["skip"] * round(skip_share * total) + ["dense"] * round(max(0.0, density - 0.2) / 2 * total)
    kinds += [("diagonal", "multi_diagonal", "vertical")[i % 3] for i in range(total - len(kinds))]
    random.Random(seed).shuffle(kinds)
    frames = layout.frames

    def plan_at(scale: float) -> Plan:
        made = {"skip": skip(), "dense": dense(), "diagonal": diagonal(scale * frames),
                "multi_diagonal": multi_diagonal(scale), "vertical": vertical(((0.0, 1.0),), 0.8 * scale * frames)}  # fmt: skip
        heads = [made[k] for k in kinds]
        layers = [heads[i * spec.num_heads : (i + 1) * spec.num_heads] for i in range(spec.num_layers)]
        return Plan.from_layers(spec, layers, block_size=block_size, layout=layout,
                                made_by={"method": "bench-mix", "target_density": density, "scale": scale})  # fmt: skip

    lo, hi = 0.0, 1.0
    for _ in range(24):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan_at(mid).density(layout) < density else (lo, mid)
    return plan_at((lo + hi) / 2)


def release_tables() -> None:
    """Drop cached block tables between plans, so GPU memory does not grow with the plans tried."""
    from sparse_vdit.patterns import table

    for cached in (getattr(table, "_compile", None), getattr(table, "_device_rows", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def transformer_blocks(model) -> list:
    """The repeated transformer blocks (what diffusers' ``compile_repeated_blocks`` compiles)."""
    names = ("blocks", "transformer_blocks", "single_transformer_blocks")
    return [block for name in names for block in getattr(model, name, ())]


def compile_blocks(model, backend: str) -> None:
    """Regional compilation: every block compiled in place, whole-graph (CogVideoX lacks
    ``_repeated_blocks``, so ``compile_repeated_blocks`` cannot be used for all three)."""
    for block in transformer_blocks(model):
        block.compile(fullgraph=True, backend=backend)


# --- timing ------------------------------------------------------------------------------------


class SdpaTimer:
    """Times the self-attention ``F.scaled_dot_product_attention`` calls of the unpatched model (eager)."""

    def __init__(self) -> None:
        self.pairs: list = []

    @contextlib.contextmanager
    def active(self):
        original = torch.nn.functional.scaled_dot_product_attention

        def timed(*args, **kwargs):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            if query.shape[-2] != key.shape[-2]:  # cross-attention: not counted, as on our side
                return original(*args, **kwargs)
            start = clock(query)
            out = original(*args, **kwargs)
            self.pairs.append((start, clock(query)))
            return out

        torch.nn.functional.scaled_dot_product_attention = timed
        try:
            yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = original

    def seconds(self) -> float:
        return sum(seconds_between(a, b) for a, b in self.pairs)


def cudnn_first():
    """SDPA with cuDNN given priority (what a user selects; torch picks FlashAttention-2 otherwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


@torch.no_grad()
def measure(model, inputs, repeats: int, attention_seconds=None, profile_seconds=None) -> dict:
    """Warm-up forward, then ``repeats`` timed forwards: median seconds and attention share.

    ``profile_seconds`` (SVG): seconds of online classification in the last forward, reported
    with its share of the attention time.
    """
    device = inputs["hidden_states"].device
    context = cudnn_first() if device.type == "cuda" else contextlib.nullcontext()
    times, attention, profile = [], [], []
    with context:
        for i in range(repeats + 1):
            start = clock(inputs["hidden_states"])
            model(**inputs)
            seconds = seconds_between(start, clock(inputs["hidden_states"]))
            att = attention_seconds() if attention_seconds else None
            prof = profile_seconds() if profile_seconds else None
            if i:  # the first forward is the warm-up (kernels, tables, compilation)
                times.append(seconds)
                attention.append(att)
                profile.append(prof)
    median = statistics.median(times)
    att = None if attention[0] is None else statistics.median(attention)
    result = {"seconds": median, "all_seconds": times, "attention_seconds": att,
              "attention_share": None if att is None else att / median}  # fmt: skip
    if profile[0] is not None:
        prof = statistics.median(profile)
        result.update(profile_seconds=prof, profile_share=prof / att if att else None)
    return result


# --- main --------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        info["triton"] = __import__("triton").__version__
    except ImportError:
        info["triton"] = None
    info["flash_attn"] = fa4.version()
    return info


def run_model(bench: Bench, args, device, dtype, rows: list, deadline: float) -> None:
    say(f"{bench.name}: building {bench.cls} ({'tiny' if args.dry_run else 'published config'}) on {device}")
    model = build(bench, device, dtype)
    inputs = make_inputs(bench, model, device, dtype)
    spec = model_spec(model)
    layout = layout_of(bench, model, inputs)
    plans = {"dense": Plan.dense(spec, block_size=args.block_size)}
    for d in args.densities:
        plans[f"sparse-{round(d * 100):02d}"] = mixed_plan(spec, layout, d, args.block_size)
    say(f"{bench.name}: {spec.describe()}, layout {layout.describe()}; plans "
        + ", ".join(f"{k} {p.density(layout):.1%}" for k, p in plans.items()))  # fmt: skip
    probe = torch.empty(1, 1, 1, model.config.attention_head_dim, device=device, dtype=dtype)
    backend = sparse_vdit.kernels.resolve_backend(args.backend, probe)
    for mode in args.modes:
        if mode == "compiled":
            torch._dynamo.reset()
            compile_blocks(model, args.compile_backend)
        try:
            run_mode(Mode(bench.name, mode, backend, args, rows, deadline), model, inputs, plans, layout)
        finally:
            if mode == "compiled":
                for block in transformer_blocks(model):
                    block._compiled_call_impl = None
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Mode:
    """One model in one mode: where its rows go, the speedup baselines, the time budget."""

    model: str
    mode: str
    backend: str
    args: argparse.Namespace
    rows: list
    deadline: float
    base: dict = field(default_factory=dict)
    last: float = 0.0  # seconds of the last forward, to estimate the next measurement

    def fits(self) -> bool:
        estimate = (self.args.repeats + 1) * self.last
        if time.perf_counter() + estimate > self.deadline:
            say(f"{self.model} {self.mode}: skipped, {estimate:.0f} s would pass the budget")
            return False
        return True

    def record(self, variant: str, result: dict, density: float) -> None:
        row = {"model": self.model, "mode": self.mode, "variant": variant, "density": density,
               "backend": self.backend, "dry_run": self.args.dry_run, **result}  # fmt: skip
        self.base.setdefault(variant, result["seconds"])
        for ref in ("unpatched", "dense"):
            if ref in self.base:
                row[f"speedup_vs_{ref}"] = self.base[ref] / result["seconds"]
        self.rows.append(row)
        self.last = result["seconds"]
        share = "" if row["attention_share"] is None else f", attention {row['attention_share']:.0%}"
        say(f"{self.model} {self.mode} {variant}: {result['seconds'] * 1e3:.1f} ms{share}")


def run_mode(run: Mode, model, inputs, plans: dict, layout: VideoLayout) -> None:
    """The unpatched model, then our integration with every plan (one state, plans swapped)."""
    repeats = run.args.repeats
    if run.fits():
        if run.mode == "eager":
            timer = SdpaTimer()

            def sdpa_seconds() -> float:
                seconds = timer.seconds()
                timer.pairs.clear()
                return seconds

            with timer.active():
                result = measure(model, inputs, repeats, sdpa_seconds)
        else:  # the timer cannot see inside compiled graphs
            result = measure(model, inputs, repeats)
        run.record("unpatched", result, 1.0)
    state = sparse_vdit.apply(model, plans["dense"], backend=run.args.backend)

    def attention_seconds() -> float:
        seconds = sum(state.attention_seconds().values())
        state.reset_timings()
        return seconds

    try:
        for variant, plan in plans.items():
            if not run.fits():
                break
            state.set_plan(plan)
            state.timing = True
            run.record(variant, measure(model, inputs, repeats, attention_seconds), plan.density(layout))
            release_tables()
    finally:
        sparse_vdit.remove(model)
    run_svg(run, model, inputs, layout)


def svg_backend(run: Mode, name: str) -> str:
    """The sparse backend of an SVG row: ``flex`` as named; ``auto`` as for the plans. On a dry
    run flex (compiled inductor C++ on the CPU, slow to build) is stood in for by the reference."""
    if name == "auto":
        return run.args.backend
    return "reference" if run.args.dry_run and name == "flex" else name


def run_svg(run: Mode, model, inputs, layout: VideoLayout) -> None:
    """SVG rows: each density through each of ``--svg-backends``; profiling time as its own column.

    One ``apply`` for all rows (a new SVG source and backend swapped in per row), so compiled
    blocks see one set of processors and do not recompile per row.
    """
    from sparse_vdit.kernels import select as select_module
    from sparse_vdit.methods.svg import SVG

    fa4_on_device = select_module.FA4_ON_DEVICE
    if not run.args.svg_densities:
        return
    state = sparse_vdit.apply(model, method="svg", block_size=run.args.block_size)
    state.timing = True

    def attention_seconds() -> float:
        seconds = sum(state.attention_seconds().values())
        state.reset_timings()
        return seconds

    def profile_seconds() -> float:
        seconds = sum(state.svg.profile_seconds().values())
        state.svg.reset_timings()
        return seconds

    try:
        for density in run.args.svg_densities:
            for name in run.args.svg_backends:
                if not run.fits():
                    return
                on_device = name.endswith("-device")  # decided on the device (Triton, FA4): nothing recorded
                select_module.FA4_ON_DEVICE = on_device
                svg = SVG(density, warmup_steps=0, record=not on_device, decide="device" if on_device else "auto",
                          block_size=run.args.block_size)  # fmt: skip
                svg.spec, svg.timing = state.svg.spec, True
                state.pattern_source = state.svg = svg
                state.backend = svg_backend(run, name.removesuffix("-device"))
                result = measure(model, inputs, run.args.repeats, attention_seconds, profile_seconds)
                s, t = svg.candidates(layout)
                result.update(target_density=density, svg_backend=state.backend, profile_backend=svg.last_profile_backend,
                              svg_mode=svg.mode, svg_decided_on=svg.last_decided_on,
                              svg_widths={"spatial": s.width, "temporal": t.width, "sink": s.sink})  # fmt: skip
                if on_device:  # both candidates have the density of the layer (within a block a row)
                    achieved = sum(compile_layer([p], layout, run.args.block_size).density for p in (s, t)) / 2
                else:
                    plan = svg.to_plan()
                    names = [p.name for layer in plan.schedule[-1].layers for p in layer if p.name != "dense"]
                    result["temporal_share"] = names.count("temporal") / max(1, len(names))
                    achieved = plan.density(layout)
                variant = f"svg-{round(density * 100):02d}" + ("" if name == "auto" else f"-{name}")
                run.record(variant, result, achieved)
                release_tables()
                release_backend_caches()
    finally:
        select_module.FA4_ON_DEVICE = fa4_on_device
        sparse_vdit.remove(model)


def release_backend_caches() -> None:
    """Drop FA4's and FlexAttention's per-table caches (an SVG row makes new tables every call)."""
    import importlib

    for name in ("fa4", "flex"):
        try:
            getattr(importlib.import_module(f"sparse_vdit.kernels.{name}"), "_CACHE", {}).clear()
        except ImportError:
            pass


def table(rows: list) -> str:
    head = (f"{'model':<13} {'mode':<9} {'variant':<13} {'density':>8} {'ms':>10} {'attn':>6} {'x unpatched':>12} "
            f"{'x dense':>8} {'profile':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        share = "" if r.get("attention_share") is None else f"{r['attention_share']:.0%}"
        vs_u = f"{r['speedup_vs_unpatched']:.2f}" if "speedup_vs_unpatched" in r else ""
        vs_d = f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else ""
        prof = "" if r.get("profile_share") is None else f"{r['profile_share']:.1%}"
        lines.append(f"{r['model']:<13} {r['mode']:<9} {r['variant']:<13} {r['density']:>8.1%} "
                     f"{r['seconds'] * 1e3:>10.1f} {share:>6} {vs_u:>12} {vs_d:>8} {prof:>8}")  # fmt: skip
    return "\n".join(lines)


def merge(path: Path, env: dict, rows: list) -> list:
    """Merge rows into the JSON at ``path`` by (model, mode, variant, dry_run); returns all rows."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": [], "results": []}
    keys = {(r["model"], r["mode"], r["variant"], r.get("dry_run")) for r in rows}
    kept = [r for r in old.get("results", []) if (r["model"], r["mode"], r["variant"], r.get("dry_run")) not in keys]
    results = kept + rows
    order = {name: i for i, name in enumerate(MODELS)}
    results.sort(key=lambda r: (r.get("dry_run", False), order.get(r["model"], 99), r["mode"] != "eager",
                                r["variant"] != "unpatched", r["variant"] != "dense", r["variant"].startswith("svg"),
                                -r.get("target_density", r["density"]), r["variant"]))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": old.get("runs", []) + [env], "results": results}, indent=2) + "\n")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--modes", default=None, help="eager,compiled (default both; eager only with --dry-run)")
    p.add_argument("--densities", default="0.5,0.3,0.2,0.1")
    p.add_argument("--svg-densities", default="0.3,0.25,0.2", help="SVG rows ('' for none)")
    p.add_argument("--svg-backends", default="auto,flex",
                   help="sparse backends of the SVG rows (auto = --backend; 'triton-device': Triton, decided on the device)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant, after one warm-up")
    p.add_argument("--backend", default="auto", help="sparse backend of our integration")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results/e2e.json; a temp file with --dry-run)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this long")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (fp32), to check the script")
    args = p.parse_args(argv)
    args.models = model_names(p, args.models)
    args.modes = [m.strip() for m in (args.modes or ("eager" if args.dry_run else "eager,compiled")).split(",")]
    if set(args.modes) - {"eager", "compiled"}:
        p.error("--modes takes eager and/or compiled")
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    args.svg_densities = [float(d) for d in args.svg_densities.split(",") if d.strip()]
    args.svg_backends = [b.strip() for b in args.svg_backends.split(",") if b.strip()]
    if {b.removesuffix("-device") for b in args.svg_backends} - {"auto", "flex", "triton", "fa4", "reference"}:
        p.error("--svg-backends takes auto, flex, triton, fa4, reference (each with -device: decided on the device)")
    if args.dry_run:
        args.block_size = min(args.block_size, 16)
    args.out = args.out or results_path("e2e", args.dry_run)
    return args


def model_names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """``--models`` (comma-separated) checked against :data:`MODELS`."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    return names


def results_path(stem: str, dry_run: bool) -> Path:
    """``bench/results/<stem>.json``; a dry run's goes to the temp folder, out of the results."""
    if dry_run:
        return Path(tempfile.gettempdir()) / f"{stem}-dry-run.json"
    return Path(__file__).parent / "results" / f"{stem}.json"


def device_and_dtype(dry_run: bool, script: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (the measurement), or the CPU in fp32 for a dry run; exits without a GPU otherwise."""
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not dry_run:
        raise SystemExit(f"{script} needs a CUDA GPU (or --dry-run)")
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.dry_run, "bench/e2e.py")
    env = environment(device)
    say(f"e2e on {env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}, "
        f"flash_attn {env['flash_attn']}; models {args.models}, modes {args.modes}, densities {args.densities}, "
        f"svg {args.svg_densities} via {args.svg_backends}")  # fmt: skip
    deadline = START + args.budget_s
    rows: list = []
    for name in args.models:
        try:
            run_model((TINY if args.dry_run else MODELS)[name], args, device, dtype, rows, deadline)
        except torch.cuda.OutOfMemoryError as err:  # keep what was measured
            say(f"{name}: out of memory ({err})")
            torch.cuda.empty_cache()
    results = merge(args.out, env, rows)
    say(f"wrote {args.out}")
    print(table([r for r in results if r.get("dry_run", False) == args.dry_run]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
