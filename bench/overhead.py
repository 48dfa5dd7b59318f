"""Host overhead of the integration itself: step tracking, layout detection, plan and table lookup.

    python bench/overhead.py [--models wan-1.3b,hunyuan,cogvideox1.5] [--repeats 30]

On a tiny transformer of each family (bench/models.py's tiny configs, fp32, CPU), where one
forward is almost all host work, it times the unpatched forward and the forward with
``sparse_vdit.apply(model, Plan.dense(...))`` (same dense SDPA underneath) and with a sparse plan
(reference kernel, so compute differs: its row is an upper bound). ``(patched - unpatched) /
attention layer calls`` is what the integration adds per layer call on the host; the issue's
target compares it with a dense step on the GPU (< 1%): e.g. Wan-1.3B 480p has 30 layer calls
in a 606 ms dense forward (BENCHMARKS.md, end to end). On the GPU the host work also overlaps
the kernels, so this is an upper bound. HunyuanVideo's row is not overhead: its patched dense path
drops the padded text keys that the unpatched model masks, so it computes less (negative "overhead").
Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
try:  # run as a script from a checkout without installing
    import sparse_vdit
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(HERE.parent / "src"))
    import sparse_vdit

from sparse_vdit import Plan
from sparse_vdit.integrations.diffusers import model_spec
from sparse_vdit.timing import device_name

sys.path.insert(0, str(HERE))  # sibling bench scripts
import models  # noqa: E402  (the tiny configs, model builder, inputs, layouts, mixed plans)

# dense forward (ms) and attention layer calls on the H100 (bench/results/e2e.json), for the share
GPU_DENSE_STEP = {"wan-1.3b": (606.3, 30), "hunyuan": (20234.9, 60), "cogvideox1.5": (3173.4, 42)}


def _median_forward(model, inputs, repeats: int) -> float:
    model(**inputs)  # warm-up: tables, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="wan-1.3b,hunyuan,cogvideox1.5")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=HERE / "results" / "overhead.json")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work, not kernels
    try:
        rows = _measure(args)
    finally:
        torch.set_num_threads(threads)
    data = {"command": "python bench/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": f"{device_name('cpu')}, 1 thread", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\n{'model':<14}{'calls':>6}{'unpatched ms':>14}{'dense +us/call':>16}{'sparse +us/call':>17}"
          f"{'share of GPU dense step':>25}")  # fmt: skip
    for r in rows:
        share = r.get("share_of_gpu_dense_step")
        print(f"{r['model']:<14}{r['layer_calls']:>6}{r['unpatched_ms']:>14.2f}{r['dense_us_per_call']:>16.0f}"
              f"{r['sparse_us_per_call']:>17.0f}{'' if share is None else f'{share:.3%}':>25}")  # fmt: skip
    return data


def _measure(args) -> list[dict]:
    device, dtype = torch.device("cpu"), torch.float32
    rows = []
    for name in args.models.split(","):
        bench = models.TINY[name]
        model = models.build(bench, device, dtype)
        inputs = models.make_inputs(bench, model, device, dtype)
        spec, layout = model_spec(model), models.layout_of(bench, model, inputs)
        calls = spec.num_layers
        unpatched = _median_forward(model, inputs, args.repeats)
        row = {"model": name, "layer_calls": calls, "unpatched_ms": unpatched * 1e3}
        for variant, plan, backend in (("dense", Plan.dense(spec, block_size=16), "auto"),
                                       ("sparse", models.mixed_plan(spec, layout, 0.3, 16), "reference")):  # fmt: skip
            with sparse_vdit.sparse(model, plan, backend=backend):
                seconds = _median_forward(model, inputs, args.repeats)
            row[f"{variant}_ms"] = seconds * 1e3
            row[f"{variant}_us_per_call"] = (seconds - unpatched) / calls * 1e6
        gpu_ms, gpu_calls = GPU_DENSE_STEP.get(name, (None, None))
        if gpu_ms:
            row["share_of_gpu_dense_step"] = row["dense_us_per_call"] * 1e-3 * gpu_calls / gpu_ms
        rows.append(row)
        print(f"{name}: unpatched {row['unpatched_ms']:.2f} ms, dense plan {row['dense_ms']:.2f} ms "
              f"({row['dense_us_per_call']:+.0f} us per layer call), sparse plan {row['sparse_ms']:.2f} ms "
              f"({row['sparse_us_per_call']:+.0f} us)", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
