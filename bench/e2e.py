"""End-to-end benchmark: one denoising forward of real-size video transformers, dense vs sparse.

    python bench/e2e.py [--models wan-1.3b,cogvideox1.5] [--modes eager,compiled] [--repeats 2]
                        [--densities 0.5,0.3,0.2,0.1] [--out bench/results/e2e.json] [--budget-s 540]
    python bench/e2e.py --dry-run          # tiny models on the CPU (results to a temp file)

Models (diffusers configs as published, random weights, bf16; built on the meta device and
materialised on the GPU, so no download): ``wan-1.3b`` (Wan2.1-T2V-1.3B, 832x480, 81 frames),
``wan-14b`` (Wan2.1-T2V-14B, 1280x720), ``hunyuan`` (HunyuanVideo, 1280x720, 129 frames, 256
text tokens of which 64 real), ``cogvideox1.5`` (CogVideoX1.5-5B, 1360x768, 81 frames),
``wan2.2-a14b`` (Wan2.2-T2V-A14B 1280x720: both experts, ``wan2.2-a14b-transformer`` and
``-transformer_2``, built and timed one after the other, each its own weights and plan),
``hunyuan1.5`` (HunyuanVideo 1.5 720p T2V, 121 frames: 1000 MLLM tokens of which 120 real, 256
ByT5 of which 16, 729 image tokens, padding in T2V).

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
  ``density`` is the realised one (dense first layer included). ``svg-NN-<backend>-plan``: the
  offline plan at SVG's own density, i.e. one forward's SVG choices recorded (``to_plan``) and
  replayed as a fixed plan through the same backend: against ``svg-NN-<backend>-device`` the
  online method's whole cost (issue 16: within 3%).
- ``top-k-NN`` (``--online-densities``, default 0.25): online block selection from pooled q/k
  (:class:`sparse_vdit.methods.online.TopP` with ``p = 1`` and a fixed budget of NN% of the key
  blocks per query block: the equal-density comparison with ``sparse-NN``), every layer call,
  tables built on the device; ``hybrid-NN``: the ``sparse-NN`` plan with every fourth head made
  dense, those heads selected online at NN% (:class:`~sparse_vdit.methods.online.Hybrid`);
  ``top-k-NN-clustered`` (``--online-cluster-iters``, default 2; 0: no row): the top-k after
  SVG2-style k-means of each head's queries and keys (:mod:`sparse_vdit.methods.cluster`);
  ``top-k-NN-gG`` (``--online-key-groups``, default 2): the top-k rule on aligned groups of G key
  blocks (``TopP(key_group=G)``: kept blocks in runs, fewer ranges for the kernel; its own
  fidelity row); ``top-k-NN-everyK`` (``--online-every``, default 2): tables reused for K steps,
  each timed unit K forwards at successive timesteps (the first selects, the rest reuse), reported
  per forward: the steady-state cost of ``every=K``; ``top-k-NN-list`` and ``hybrid-NN-list``
  (``--online-block-list``): the top-k and the hybrid with the Triton kernel's block-list mode on
  (``launcher.OPTIONS["block_list"] = True``: one loop over each query tile's listed key blocks, not
  one per range; the other rows take the kernel's mode by ``launcher.DEFAULTS["block_list"]``: since
  #22 the lists for top-k tables, key groups and hybrids, the ranges for plans). Their ``profile``
  column is the selection's own time as a share of the attention time.

``--triton-options NAME=VALUE ...``: the Triton kernel's launch options (``kernels.triton.launcher.OPTIONS``,
e.g. ``schedule=heads tma=False``) for the whole run; the rows carry them
(``options``, shown after the variant) and merge apart from rows without them.

``--profile DIR``: after each variant's timing, one more forward (or timed unit) under torch.profiler,
its operators by self device and host time written to ``DIR/<model>-<mode>-<variant>.txt`` (where a
variant's time goes, e.g. the hybrid's cost beyond the top-k's).

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
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import (START, device_and_dtype, environment, merge_results, out_of_memory_said, profile_to,  # noqa: E402
                    results_path, say)
from models import (  # noqa: E402
    MODELS, TINY, Bench, build, compile_blocks, cudnn_first, layout_of, make_inputs, mixed_plan, mode_names,
    model_names, transformer_blocks,
)

import sparse_vdit  # noqa: E402
from sparse_vdit import Plan, VideoLayout, compile_layer  # noqa: E402
from sparse_vdit.integrations.diffusers import model_spec  # noqa: E402
from sparse_vdit.timing import clock, seconds_between  # noqa: E402

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


@torch.no_grad()
def measure(model, inputs, repeats: int, attention_seconds=None, profile_seconds=None,
            trace: Path | None = None) -> dict:
    """Warm-up forward, then ``repeats`` timed forwards: median seconds and attention share.

    ``profile_seconds`` (SVG): seconds of online classification in the last forward, reported
    with its share of the attention time. ``inputs`` a list: each timed unit runs those forwards
    one after the other (e.g. successive denoising steps) and every number is per forward (the
    unit's total over its length). ``trace``: one more (untimed) unit under torch.profiler, its
    operator tables written there (``--profile``).
    """
    steps = inputs if isinstance(inputs, list) else [inputs]
    hidden = steps[0]["hidden_states"]
    context = cudnn_first() if hidden.device.type == "cuda" else contextlib.nullcontext()
    times, attention, profile = [], [], []
    with context:
        for i in range(repeats + 1):
            start = clock(hidden)
            for step in steps:
                model(**step)
            seconds = seconds_between(start, clock(hidden)) / len(steps)
            att = attention_seconds() / len(steps) if attention_seconds else None
            prof = profile_seconds() / len(steps) if profile_seconds else None
            if i:  # the first forward is the warm-up (kernels, tables, compilation)
                times.append(seconds)
                attention.append(att)
                profile.append(prof)
        if trace is not None:
            profile_to(trace, lambda: [model(**step) for step in steps], trace.stem)
            if attention_seconds:
                attention_seconds()  # the profiled unit's timings are not kept
            if profile_seconds:
                profile_seconds()
    median = statistics.median(times)
    att = None if attention[0] is None else statistics.median(attention)
    result = {"seconds": median, "all_seconds": times, "attention_seconds": att,
              "attention_share": None if att is None else att / median}  # fmt: skip
    if profile[0] is not None:
        prof = statistics.median(profile)
        result.update(profile_seconds=prof, profile_share=prof / att if att else None)
    return result


# --- main --------------------------------------------------------------------------------------


def run_model(bench: Bench, args, device, dtype, rows: list, deadline: float) -> None:
    say(f"{bench.name}: building {bench.cls} ({'tiny' if args.dry_run else 'published config'}) on {device}")
    model = build(bench, device, dtype)
    inputs = make_inputs(bench, model, device, dtype)
    spec = model_spec(model)
    layout = layout_of(bench, model, inputs)
    plans = {"dense": Plan.dense(spec, block_size=args.block_size)}
    for d in args.densities:
        plans[f"sparse-{round(d * 100):02d}"] = mixed_plan(spec, layout, d, args.block_size, seed=bench.seed)
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

    def trace(self, variant: str) -> Path | None:
        """Where ``--profile`` puts the operator tables of ``variant`` (None without it)."""
        folder = self.args.profile
        return None if folder is None else folder / f"{self.model}-{self.mode}-{variant}.txt"

    def record(self, variant: str, result: dict, density: float) -> None:
        row = {"model": self.model, "mode": self.mode, "variant": variant, "density": density,
               "backend": self.backend, "dry_run": self.args.dry_run, **result}  # fmt: skip
        if self.args.triton_options:
            row["options"] = options_label(self.args.triton_options)
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
                result = measure(model, inputs, repeats, sdpa_seconds, trace=run.trace("unpatched"))
        else:  # the timer cannot see inside compiled graphs
            result = measure(model, inputs, repeats, trace=run.trace("unpatched"))
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
            result = measure(model, inputs, repeats, attention_seconds, trace=run.trace(variant))
            run.record(variant, result, plan.density(layout))
            sparse_vdit.clear_caches()  # GPU memory does not grow with the plans tried
    finally:
        sparse_vdit.remove(model)
    run_svg(run, model, inputs, layout)
    run_online(run, model, inputs, layout)


def run_online(run: Mode, model, inputs, layout: VideoLayout) -> None:
    """Online rows: top-k selection at each ``--online-densities``, and the hybrid on a plan of that density."""
    from sparse_vdit.kernels.triton import launcher as triton_launcher
    from sparse_vdit.methods.online import Hybrid, TopP
    from sparse_vdit.patterns import dense

    if not run.args.online_densities:
        return
    block = run.args.block_size
    state = sparse_vdit.apply(model, Plan.dense(model_spec(model), block_size=block), backend=run.args.backend)
    state.timing = True

    def attention_seconds() -> float:
        seconds = sum(state.attention_seconds().values())
        state.reset_timings()
        return seconds

    def share(table, call) -> torch.Tensor:  # computed share of blocks, left on the device (no sync while timed)
        if table is None:
            return torch.ones((), dtype=torch.float64, device=call.q.device)
        if isinstance(table, tuple):
            table = compile_layer(table, layout, block, call.q.device)
        table = getattr(table, "table", table)  # a clustered selection's table
        cells = table.num_heads * table.num_q_blocks * table.num_kv_blocks
        return table.kv_num_blocks.sum(dtype=torch.float64).to(call.q.device) / cells

    try:
        for density in run.args.online_densities:
            tag = f"{round(density * 100):02d}"
            plan = mixed_plan(state.spec, layout, density, block)
            layers = [tuple(dense() if h % 4 == 1 else p for h, p in enumerate(row)) for row in plan.schedule[0].layers]
            hybrid_plan = Plan.from_layers(state.spec, layers, block_size=block, layout=layout)
            clustered = (f"top-k-{tag}-clustered",) if run.args.online_cluster_iters else ()
            grouped = tuple(f"top-k-{tag}-g{g}" for g in run.args.online_key_groups)
            every = run.args.online_every
            reused = (f"top-k-{tag}-every{every}",) if every > 1 else ()
            listed = (f"top-k-{tag}-list", f"hybrid-{tag}-list") if run.args.online_block_list else ()
            for variant in (f"top-k-{tag}", *listed[:1], *grouped, *reused, *clustered, f"hybrid-{tag}", *listed[1:]):
                if not run.fits():
                    return
                iters = run.args.online_cluster_iters if variant.endswith("clustered") else 0
                group = int(variant.rsplit("-g", 1)[1]) if variant in grouped else 1
                online = TopP(1.0, min_density=density, max_density=density, block_size=block, cluster_iters=iters,
                              key_group=group, every=every if variant in reused else 1)  # fmt: skip
                online.timing = True
                state.pattern_source = online if variant.startswith("top-k") else Hybrid(hybrid_plan, online)
                densities = []

                def profile_seconds() -> float:
                    seconds = sum(online.profile_seconds().values())
                    online.reset_timings()
                    return seconds

                state.observers[:] = [lambda call, table, out: densities.append(share(table, call))]
                # every-k rows: one timed unit is k successive steps (a new generation each unit:
                # the first step selects, the others reuse its tables), numbers per forward
                steps = successive_steps(inputs, every) if variant in reused else inputs
                with triton_launcher.options_set(**({"block_list": True} if variant in listed else {})):
                    result = measure(model, steps, run.args.repeats, attention_seconds, profile_seconds,
                                     run.trace(variant))
                result.update(target_density=density, online_calls=online.calls, online_reused=online.reused,
                              key_group=group, every=online.reuse.every, block_list=variant in listed)  # fmt: skip
                run.record(variant, result, float(torch.stack(densities).mean()) if densities else 1.0)
                state.observers.clear()
                sparse_vdit.clear_caches()
    finally:
        sparse_vdit.remove(model)


def successive_steps(inputs: dict, count: int) -> list:
    """``count`` copies of a forward's inputs with timesteps 0, 1, ... below its own: successive
    denoising steps to the step tracker (a timestep above the last starts a new generation)."""
    return [{**inputs, "timestep": inputs["timestep"] - i} for i in range(count)]


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
    from sparse_vdit.kernels import fa4
    from sparse_vdit.methods.svg import SVG

    if not run.args.svg_densities:
        return
    fa4_on_device = fa4.SELECT_ON_DEVICE
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
                if name.endswith("-plan"):
                    svg_plan_row(run, model, inputs, layout, state, density, name, attention_seconds)
                    continue
                on_device = name.endswith("-device")  # decided on the device (Triton, FA4): nothing recorded
                fa4.SELECT_ON_DEVICE = on_device
                svg = SVG(density, warmup_steps=0, record=not on_device, decide="device" if on_device else "auto",
                          block_size=run.args.block_size)  # fmt: skip
                svg.spec, svg.timing = state.svg.spec, True
                state.pattern_source = state.svg = svg
                state.backend = svg_backend(run, name.removesuffix("-device"))
                variant = f"svg-{round(density * 100):02d}" + ("" if name == "auto" else f"-{name}")
                result = measure(model, inputs, run.args.repeats, attention_seconds, profile_seconds, run.trace(variant))
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
                run.record(variant, result, achieved)
                sparse_vdit.clear_caches()  # an SVG row makes new tables every call
    finally:
        fa4.SELECT_ON_DEVICE = fa4_on_device
        sparse_vdit.remove(model)


def svg_plan_row(run: Mode, model, inputs, layout: VideoLayout, state, density: float, name: str,
                 attention_seconds) -> None:  # fmt: skip
    """``svg-NN-<backend>-plan``: SVG's choices of one (untimed) forward, recorded, then timed as a
    fixed plan through the same backend (the offline plan at SVG's density; no profiling)."""
    from sparse_vdit.methods.svg import SVG

    svg = SVG(density, warmup_steps=0, record=True, block_size=run.args.block_size)
    svg.spec = state.svg.spec
    state.pattern_source = state.svg = svg
    state.backend = svg_backend(run, name.removesuffix("-plan"))
    with torch.no_grad():
        model(**inputs)
    plan = svg.to_plan()
    state.set_plan(plan)
    state.svg = svg  # profile_seconds stays readable (nothing classified while the plan runs)
    variant = f"svg-{round(density * 100):02d}-{name}"
    result = measure(model, inputs, run.args.repeats, attention_seconds, trace=run.trace(variant))
    result.update(target_density=density, svg_backend=state.backend, svg_mode=svg.mode)
    run.record(variant, result, plan.density(layout))
    sparse_vdit.clear_caches()


def table(rows: list) -> str:
    labels = [r["variant"] + (f" [{r['options']}]" if r.get("options") else "") for r in rows]
    width = max([13, *map(len, labels)])
    head = (f"{'model':<13} {'mode':<9} {'variant':<{width}} {'density':>8} {'ms':>10} {'attn':>6} {'x unpatched':>12} "
            f"{'x dense':>8} {'profile':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r, label in zip(rows, labels):
        share = "" if r.get("attention_share") is None else f"{r['attention_share']:.0%}"
        vs_u = f"{r['speedup_vs_unpatched']:.2f}" if "speedup_vs_unpatched" in r else ""
        vs_d = f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else ""
        prof = "" if r.get("profile_share") is None else f"{r['profile_share']:.1%}"
        lines.append(f"{r['model']:<13} {r['mode']:<9} {label:<{width}} {r['density']:>8.1%} "
                     f"{r['seconds'] * 1e3:>10.1f} {share:>6} {vs_u:>12} {vs_d:>8} {prof:>8}")  # fmt: skip
    return "\n".join(lines)


def merge(path: Path, env: dict, rows: list) -> list:
    """Merge rows into the JSON at ``path`` by (model, mode, variant, options, dry_run); returns all rows."""
    order = {name: i for i, name in enumerate(MODELS)}
    return merge_results(
        path, env, rows, key=lambda r: (r["model"], r["mode"], r["variant"], r.get("options", ""), r.get("dry_run")),
        order=lambda r: (r.get("dry_run", False), order.get(r["model"], 99), r["mode"] != "eager",
                         r["variant"] != "unpatched", r["variant"] != "dense",
                         2 if r["variant"].startswith(("top-k", "hybrid")) else r["variant"].startswith("svg"),
                         -r.get("target_density", r["density"]), r["variant"]),
    )  # fmt: skip


def triton_options(pairs: list[str]) -> dict:
    """``["tma=False", "tiles=(128, 64, 8, 3)"]`` -> ``{"tma": False, "tiles": (128, 64, 8, 3)}`` (values as Python
    literals, else strings), names checked against ``kernels.triton.launcher.OPTIONS``."""
    import ast

    from sparse_vdit.kernels.triton import launcher

    options = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in launcher.OPTIONS:
            raise ValueError(f"--triton-options takes NAME=VALUE with NAME one of {sorted(launcher.OPTIONS)}; got {pair!r}")
        try:
            options[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[name] = text
    return options


def options_label(options: dict) -> str:
    """How a row names the Triton options it ran with: ``schedule=heads,tma=False``."""
    return ",".join(f"{name}={value}" for name, value in sorted(options.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--modes", default=None, help="eager,compiled (default both; eager only with --dry-run)")
    p.add_argument("--densities", default="0.5,0.3,0.2,0.1")
    p.add_argument("--svg-densities", default="0.3,0.25,0.2", help="SVG rows ('' for none)")
    p.add_argument("--svg-backends", default="auto,flex",
                   help="sparse backends of the SVG rows (auto = --backend; 'triton-device': Triton, decided on the "
                        "device; 'triton-plan': SVG's recorded choices replayed as a fixed plan)")
    p.add_argument("--online-densities", default="0.25", help="online top-k and hybrid rows ('' for none)")
    p.add_argument("--online-cluster-iters", type=int, default=2, help="k-means rounds of the clustered rows (0: none)")
    p.add_argument("--online-key-groups", default="2",
                   help="top-k-NN-gG rows: the rule on aligned groups of G key blocks (comma-separated; '' for none)")
    p.add_argument("--online-every", type=int, default=2,
                   help="top-k-NN-everyK row: tables reused for K successive steps, timed over K forwards (<= 1: none)")
    p.add_argument("--online-block-list", action="store_true",
                   help="a top-k-NN-list row: the top-k with the Triton kernel's block-list mode on")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant, after one warm-up")
    p.add_argument("--backend", default="auto", help="sparse backend of our integration")
    p.add_argument("--block-size", type=int, default=sparse_vdit.block_table.DEFAULT_BLOCK)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results/e2e.json; a temp file with --dry-run)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting measurements after this long")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (fp32), to check the script")
    p.add_argument("--triton-options", nargs="*", default=[], metavar="NAME=VALUE",
                   help="the Triton kernel's launch options for the run (launcher.OPTIONS), e.g. tma=False")
    p.add_argument("--profile", type=Path, default=None,
                   help="folder: after each variant's timing, one more forward under torch.profiler (operator tables)")
    args = p.parse_args(argv)
    args.models = model_names(p, args.models)
    args.modes = mode_names(p, args.modes, args.dry_run)
    args.densities = [float(d) for d in args.densities.split(",") if d.strip()]
    args.svg_densities = [float(d) for d in args.svg_densities.split(",") if d.strip()]
    args.svg_backends = [b.strip() for b in args.svg_backends.split(",") if b.strip()]
    args.online_densities = [float(d) for d in args.online_densities.split(",") if d.strip()]
    args.online_key_groups = [int(g) for g in args.online_key_groups.split(",") if g.strip() and int(g) > 1]
    if {b.removesuffix("-plan").removesuffix("-device") for b in args.svg_backends} - {"auto", "flex", "triton", "fa4",
                                                                                        "reference"}:  # fmt: skip
        p.error("--svg-backends takes auto, flex, triton, fa4, reference (each with -device: decided on the device, "
                "or -plan: SVG's recorded choices as a fixed plan)")
    try:
        args.triton_options = triton_options(args.triton_options)
    except ValueError as error:
        p.error(str(error))
    if args.dry_run:
        args.block_size = min(args.block_size, 16)
    args.out = args.out or results_path("e2e", args.dry_run)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.dry_run, "bench/e2e.py")
    env = environment(device)
    say(f"e2e on {env['device']}: torch {env['torch']}, diffusers {env['diffusers']}, triton {env['triton']}, "
        f"flash_attn {env['flash_attn']}; models {args.models}, modes {args.modes}, densities {args.densities}, "
        f"svg {args.svg_densities} via {args.svg_backends}")  # fmt: skip
    deadline = START + args.budget_s
    rows: list = []
    if args.triton_options:
        from sparse_vdit.kernels.triton import launcher

        env["triton_options"] = options_label(args.triton_options)
        options = launcher.options_set(**args.triton_options)
    else:
        options = contextlib.nullcontext()
    with options:
        for name in args.models:
            with out_of_memory_said(name):
                run_model((TINY if args.dry_run else MODELS)[name], args, device, dtype, rows, deadline)
    results = merge(args.out, env, rows)
    say(f"wrote {args.out}")
    print(table([r for r in results if r.get("dry_run", False) == args.dry_run]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
