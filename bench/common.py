"""The bench library: what every script under bench/ shares (paths, clocks, timing, results, versions).

Scripts stay thin: they parse their arguments, build what they measure, and use these helpers
to time it (:func:`time_fn`: CUDA events on the GPU, the host clock on the CPU), to name their
result files (:func:`results_path`), to merge rows into them (:func:`merge_results`) and to say
what they ran on (:func:`environment`, :func:`gpu_versions`). ``models.py`` holds the real-size
and tiny diffusers transformers the end-to-end scripts build.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(HERE.parent / "src"))

from sparse_vdit.block_table import DEFAULT_BLOCK  # noqa: E402
from sparse_vdit.layout import VideoLayout  # noqa: E402
from sparse_vdit.patterns import compile_layer, dense, diagonal, multi_diagonal, skip, vertical  # noqa: E402
from sparse_vdit.files import write_text_whole  # noqa: E402
from sparse_vdit.timing import device_name  # noqa: E402

START = time.perf_counter()
BLOCK = DEFAULT_BLOCK


def say(*args) -> None:
    """Print with the seconds since the bench started, flushed (long GPU runs are read live)."""
    print(f"[{time.perf_counter() - START:7.1f}s]", *args, flush=True)


@contextlib.contextmanager
def out_of_memory_said(what: str):
    """Run the block; a CUDA out-of-memory error in it is said (``what: out of memory``) and the cache
    emptied instead of raised, so the rows measured before it are kept."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        say(f"{what}: out of memory ({err})")
        torch.cuda.empty_cache()


def random_sets(shape, count: int, device, dtype, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``count`` seeded (q, k, v) sets of random ``[1, tokens, heads, dim]`` tensors for ``shape``
    (anything with ``layout``, ``heads``, ``dim``), to rotate so the L2 cache does not flatter."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = shape.layout.num_tokens
    return [tuple(torch.randn(1, n, shape.heads, shape.dim, generator=g, device=device, dtype=dtype) for _ in range(3))
            for _ in range(count)]  # fmt: skip


def time_fn(fn: Callable, sets, est_ms: float | None = None, target_ms: float = 500.0, max_reps: int = 20):
    """Median ms of ``fn(*set)`` over rotated input sets, host ms per call, and the repetitions.

    One warm-up call per set first (compilation, caches). On CUDA each call is timed with its own
    pair of events; on the CPU (dry runs: checks of the script, not measurements) one timed call
    per set with the host clock.
    """
    if not sets[0][0].is_cuda:
        fn(*sets[0])
        host = []
        for args in sets:
            t0 = time.perf_counter()
            fn(*args)
            host.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(host), statistics.median(host), len(host)
    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    if est_ms is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*sets[0])
        end.record()
        torch.cuda.synchronize()
        est_ms = start.elapsed_time(end)
    reps = int(max(3, min(max_reps, target_ms / max(est_ms, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    host = []
    for i, (start, end) in enumerate(events):
        args = sets[i % len(sets)]
        t0 = time.perf_counter()
        start.record()
        fn(*args)
        end.record()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    return statistics.median(times), 1e3 * statistics.median(host), reps


def energy_counter(device: torch.device) -> Callable[[], float] | None:
    """The card's energy counter for ``device`` (NVML: joules drawn since the driver loaded), or None on the
    CPU, without NVML (``pynvml``, the ``nvidia-ml-py`` package) or where the card does not count."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda._get_nvml_device_index(device) if hasattr(torch.cuda, "_get_nvml_device_index") else 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # millijoules
    except Exception:  # no NVML, or a card without the counter
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3


def energy_per_call(fn: Callable, sets, counter: Callable[[], float], seconds: float = 2.5,
                    synchronize: Callable[[], None] | None = None) -> tuple[float, int, float]:  # fmt: skip
    """``(joules per call, calls, seconds per call)`` of ``fn(*set)`` over rotated input sets: ``counter``
    (joules) read around at least ``seconds`` of calls, 3 or more, each waited for (the card's whole draw while
    they run, its idle floor included; NVML's counter moves in steps of tens of milliseconds, hence the seconds).
    Joules over those seconds are the calls' mean watts (their clock may differ from a timed run's)."""
    sync = synchronize or torch.cuda.synchronize
    sync()
    before, t0, calls = counter(), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - t0 < seconds:
        fn(*sets[calls % len(sets)])
        sync()
        calls += 1
    elapsed = time.perf_counter() - t0
    return (counter() - before) / calls, calls, elapsed / calls


def gpu_versions() -> dict:
    """The GPU and the software under a kernel measurement (torch, CUDA, cuDNN, Triton, FA4)."""
    import triton

    from sparse_vdit.kernels import fa4

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "flash_attn_4": fa4.version(),
        "python": platform.python_version(),
    }


def environment(device: str | torch.device) -> dict:
    """What a model-level run ran on: device (with its core count on a CPU), torch, diffusers, triton,
    flash-attn-4, date."""
    import diffusers

    from sparse_vdit.kernels import fa4

    device = torch.device(device)
    cores = "" if device.type == "cuda" else f", {os.cpu_count()} cores"
    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "device": device_name(device) + cores,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        info["triton"] = __import__("triton").__version__
    except ImportError:
        info["triton"] = None
    info["flash_attn"] = fa4.version()
    return info


def profile_to(path: Path, fn: Callable[[], object], what: str) -> str:
    """Run ``fn`` once under ``torch.profiler``: its top operators by self CUDA (on a GPU) and self CPU
    time go to ``path`` (folders made) and the log, headed by ``what``; returns the text."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    sorts = (["self_cuda_time_total"] if on_gpu else []) + ["self_cpu_time_total"]
    text = "\n\n".join(f"{what}, sorted by {key}:\n{averages.table(sort_by=key, row_limit=25)}" for key in sorts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    say(f"profile of {what} written to {path}")
    return text


def results_path(stem: str, dry_run: bool) -> Path:
    """``bench/results/<stem>.json``; a dry run's goes to the temp folder, out of the results."""
    if dry_run:
        return Path(tempfile.gettempdir()) / f"{stem}-dry-run.json"
    return HERE / "results" / f"{stem}.json"


def device_and_dtype(dry_run: bool, script: str) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (the measurement), or the CPU in fp32 for a dry run; exits without a GPU otherwise."""
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    if device.type != "cuda" and not dry_run:
        raise SystemExit(f"{script} needs a CUDA GPU (or --dry-run)")
    return device, torch.float32 if device.type == "cpu" else torch.bfloat16


def merge_results(path: Path, env: dict, rows: list, key: Callable[[dict], tuple],
                  order: Callable[[dict], tuple] | None = None, old: dict | None = None) -> list:  # fmt: skip
    """Merge ``rows`` into the JSON at ``path`` (or into ``old``, its earlier content): rows with the
    same ``key`` are replaced, the rest kept, sorted by ``order``; ``env`` joins the file's ``runs``.
    Returns all rows."""
    if old is None:
        old = json.loads(path.read_text()) if path.exists() else {"runs": [], "results": []}
    new = {key(r) for r in rows}
    results = [r for r in old.get("results", []) if key(r) not in new] + rows
    if order is not None:
        results.sort(key=order)
    write_json(path, {"runs": old.get("runs", []) + [env], "results": results}, indent=2)
    return results


def write_json(path, data, indent: int = 1) -> Path:
    """Write ``data`` as JSON at ``path`` (its folder created; replaced whole, never half written).

    Scripts call it after every row too, so that a run stopped at its time limit keeps what it measured.
    """
    return write_text_whole(path, json.dumps(data, indent=indent) + "\n")


def out_dir(default: str = "bench/results") -> str:
    """Where a script writes by default: ``$OUT`` (the lent GPU machine's output folder) or ``default``."""
    return os.environ.get("OUT", default)


# --- attention shapes and their tables (bench/attention.py, svg.py, kernel_variants.py) ---------


@dataclass(frozen=True)
class Shape:
    name: str
    layout: VideoLayout
    heads: int
    dim: int


SHAPES = {
    "wan1.3b-480p": Shape("wan1.3b-480p", VideoLayout(21, 30, 52), 12, 128),
    "hunyuan-720p": Shape("hunyuan-720p", VideoLayout(33, 45, 80, 256, "suffix"), 24, 128),
    "cogvideox1.5-768p": Shape("cogvideox1.5-768p", VideoLayout(11, 48, 85, 226, "prefix"), 48, 64),
    "wan14b-720p": Shape("wan14b-720p", VideoLayout(21, 45, 80), 40, 128),
}
QUICK_SHAPES = ("wan1.3b-480p", "hunyuan-720p")
DENSITIES = (0.05, 0.10, 0.20, 0.30, 0.50, 1.00)
KINDS = ("band", "multi_diag", "vertical", "mixed")
STRIPE = ((0.0, 0.5),)  # vertical stripe: the first half of the first frame


def kind_patterns(kind: str, s: float, layout: VideoLayout, heads: int) -> list:
    """The heads of a ``kind`` table at band scale ``s`` (fraction of the video on each side)."""
    frames = s * layout.frames  # diagonal widths are in frames
    if kind == "band":
        return [diagonal(frames)] * heads
    if kind == "multi_diag":
        return [multi_diagonal(s)] * heads
    if kind == "vertical":
        return [vertical(STRIPE, frames)] * heads
    if kind == "mixed":
        cycle = [diagonal(frames), multi_diagonal(s), vertical(STRIPE, frames), multi_diagonal(0.5 * s)]
        return [cycle[h % 4] for h in range(heads - 1)] + [skip()]
    raise ValueError(kind)


def _density(patterns, layout) -> float:
    return compile_layer(patterns, layout, BLOCK, "cpu").density  # block ranges only: cheap


def table_for(kind: str, target: float, layout: VideoLayout, heads: int, device):
    """(table, scale) whose density is the closest bisection reaches to ``target``."""
    if target >= 1.0:
        return compile_layer([dense()] * heads, layout, BLOCK, device), 1.0
    lo, hi = 0.0, 0.5
    best = (math.inf, 0.0)
    for _ in range(18):
        mid = (lo + hi) / 2
        d = _density(kind_patterns(kind, mid, layout, heads), layout)
        best = min(best, (abs(d - target), mid))
        if abs(d - target) < 0.002:
            break
        lo, hi = (mid, hi) if d < target else (lo, mid)
    s = best[1]
    return compile_layer(kind_patterns(kind, s, layout, heads), layout, BLOCK, device), s


def sdpa_with(backend):
    """``fn(q, k, v)``: SDPA on ``[B, N, H, D]`` tensors with one ``SDPBackend`` forced; ``[B, N, H, D]`` out (a view)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return run
