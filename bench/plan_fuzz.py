"""Mutation fuzz of plan files: every mutated plan loads and runs, or raises a PlanError naming the field.

Starts from valid plans (the shipped organism plan, ``Plan.uniform`` ones, a mixed one), applies
random mutations to the parsed document (delete / rename / retype / enlarge values, add keys)
or to the text (invalid UTF-8, truncation, NaN / Infinity / huge numbers, duplicate keys, deep
nesting), and sorts the outcomes: ``plan_error`` (a clear refusal), ``ran`` (loaded, every
pattern compiled and run on a tiny layout, density and JSON round trip computed) or ``other``
(any other exception: a bug). Seeded, so a run is repeatable.

    python bench/plan_fuzz.py --mutations 2000 --seed 0 [--out bench/results/plan_fuzz.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from sparse_vdit import VideoLayout
from sparse_vdit.kernels import sparse_attention
from sparse_vdit.patterns import compile_layer, dense, diagonal, multi_diagonal, skip, temporal, vertical
from sparse_vdit.plan import ModelSpec, Plan, PlanError, StepRange

SHIPPED = Path(__file__).parents[1] / "src/sparse_vdit/organism/weights/plan.json"
TINY = VideoLayout(2, 3, 5)  # 30 tokens: every pattern compiles and runs in milliseconds

NASTY = [None, True, False, 0, -1, 1, 2, 0.5, 1.7, -0.0, 1e308, 1e-308, 2**31, 2**40, 10**12, 2**63, "0.5", "", "x",
         "dense", [], {}, [1, 2], {"a": 1}, [[0, 1]], 1e400]  # fmt: skip
TEXT_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "1" + "0" * 40, "-0", "1e-400"]


def base_plans() -> list[str]:
    """Valid plans to mutate, as JSON text."""
    spec = ModelSpec("wan", 3, 4, "tiny")
    mixed = [[dense(), skip(), diagonal(0.5), multi_diagonal(0.1)],
             [vertical(((0.0, 1.0), (2.5, 2.75)), 0.3), diagonal(1.0), temporal(0.05), dense()], [skip()] * 4]  # fmt: skip
    plans = [
        Plan(spec, (StepRange(0, tuple(map(tuple, mixed))), StepRange(3, tuple(map(tuple, mixed[::-1])))),
             warmup_steps=1, block_size=16, layout=VideoLayout(4, 6, 7, 5, "suffix", 3)),  # fmt: skip
        Plan.uniform(spec, diagonal(1.0), block_size=32, layout=VideoLayout(3, 4, 4)),
        Plan.uniform(spec, multi_diagonal(0.2), warmup_steps=2),
    ]
    return [SHIPPED.read_text()] + [p.dumps() for p in plans]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree; long lists contribute a few of their entries."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i in sorted({0, len(node) // 2, len(node) - 1}) if node else ():
            yield from _paths(node[i], prefix + (i,))


def _typo(key: str, rng: random.Random) -> str:
    if len(key) < 2:
        return key + "x"
    i = rng.randrange(len(key))
    return rng.choice([key[:i] + key[i + 1 :], key[:i] + "_" + key[i:], key + "s", key.upper()])


def mutate_tree(data, rng: random.Random):
    """One structural mutation of a parsed plan (in place); returns the mutated document."""
    paths = [p for p, _ in _paths(data) if p]
    path = rng.choice(paths)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last, value = path[-1], parent[path[-1]]
    op = rng.choice(["delete", "nasty", "nasty", "rename", "add", "wrap", "scale", "copy"])
    if op == "delete":
        del parent[last]
    elif op == "nasty":
        parent[last] = copy.deepcopy(rng.choice(NASTY))
    elif op == "rename" and isinstance(parent, dict):
        parent[_typo(last, rng)] = parent.pop(last)
    elif op == "add":
        target = value if isinstance(value, dict) else parent if isinstance(parent, dict) else data
        target[rng.choice(["extra", "step", "widht", "columns", "name", "text_valid"])] = rng.choice(NASTY)
    elif op == "wrap":
        parent[last] = [value]
    elif op == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[last] = value * rng.choice([-1, 0, 2, 1000, 10**9, 2**40]) + rng.choice([0, 1, 0.5])
    else:
        parent[last] = copy.deepcopy(rng.choice([v for _, v in _paths(data)]))
    return data


def mutate_text(text: str, rng: random.Random) -> str | bytes:
    """One textual mutation: bytes that are not UTF-8, cut text, non-JSON numbers, duplicate keys, nesting."""
    op = rng.choice(["bytes", "cut", "number", "duplicate", "nest", "bom"])
    if op == "bytes":
        raw = text.encode()
        i = rng.randrange(len(raw))
        return raw[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + raw[i:]
    if op == "cut":
        return text[: rng.randrange(len(text))]
    if op == "number":
        digits = [i for i, c in enumerate(text) if c.isdigit() and not text[i - 1].isdigit()]
        i = rng.choice(digits)
        j = i
        while j < len(text) and (text[j].isdigit() or text[j] in ".eE-+"):
            j += 1
        return text[:i] + rng.choice(TEXT_NUMBERS) + text[j:]
    if op == "duplicate":
        key = rng.choice(['"block_size"', '"version"', '"steps"', '"width"', '"frames"', '"start"'])
        if key not in text:
            key = '"version"'
        i = text.index(key)
        return text[:i] + f"{key}: 64, " + text[i:]
    if op == "nest":
        depth = rng.choice([40, 5000, 200000])
        return text.replace('"made_by": {', '"made_by": {"deep": ' + "[" * depth + "]" * depth + ", ", 1)
    return "\ufeff" + text


FIELD = re.compile(r'(not valid JSON|not UTF-8 text|larger than|the top level: |"[a-z_]+": |[a-z_]+(\[\d+\])*(\.[a-z_]+(\[\d+\])*)*: )')


def names_field(message: str, source: str) -> bool:
    """Whether a PlanError starts with its source and then names the field (or the parse problem)."""
    return message.startswith(f"{source}: ") and FIELD.match(message, len(source) + 2) is not None


def run_plan(plan: Plan) -> None:
    """Use a loaded plan the way the library does, on a tiny layout."""
    torch.manual_seed(0)
    plan.summary()
    again = Plan.loads(plan.dumps())
    assert again == plan, "JSON round trip changed the plan"
    if plan.layout is not None:
        assert 0.0 <= plan.density() <= 1.0
    for layer in range(plan.num_layers):
        table = compile_layer(plan.patterns_for(plan.warmup_steps, layer), TINY, plan.block_size)
        if layer == 0:
            q, k, v = torch.randn(3, 1, TINY.num_tokens, plan.num_heads, 8).unbind(0)
            out = sparse_attention(q, k, v, table, backend="reference")
            assert torch.isfinite(out).all()


def fuzz(mutations: int, seed: int) -> dict:
    """Mutate ``mutations`` plans; outcome counts, the slowest case and every unexpected error."""
    rng = random.Random(seed)
    bases = base_plans()
    counts = {"plan_error": 0, "ran": 0, "other": 0}
    failures, slowest = [], (0.0, "")
    path = Path(tempfile.mkdtemp(prefix="plan_fuzz_")) / "plan.json"
    for i in range(mutations):
        text = rng.choice(bases)
        mutated = mutate_text(text, rng) if rng.random() < 0.3 else json.dumps(mutate_tree(json.loads(text), rng))
        path.write_bytes(mutated if isinstance(mutated, bytes) else mutated.encode())
        start = time.perf_counter()
        try:
            plan = Plan.load(path)
        except PlanError as err:
            outcome = str(err)
            if not names_field(outcome, str(path)):
                counts["other"] += 1
                failures.append({"case": i, "error": f"PlanError names no field: {outcome}"})
                continue
            counts["plan_error"] += 1
        except Exception:
            counts["other"] += 1
            failures.append({"case": i, "error": traceback.format_exc(limit=3)[-600:]})
            continue
        else:
            try:
                run_plan(plan)
                counts["ran"] += 1
                outcome = "ran"
            except Exception:
                counts["other"] += 1
                failures.append({"case": i, "error": "loaded, then: " + traceback.format_exc(limit=3)[-600:]})
                continue
        took = time.perf_counter() - start
        if took > slowest[0]:
            slowest = (took, outcome[:120])
    return {"mutations": mutations, "seed": seed, "counts": counts, "slowest_s": round(slowest[0], 3),
            "slowest_outcome": slowest[1], "failures": failures}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mutations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = fuzz(args.mutations, args.seed)
    for failure in result["failures"][:10]:
        print(f"case {failure['case']}:\n{failure['error']}\n", file=sys.stderr)
    c = result["counts"]
    print(f"{args.mutations} mutations (seed {args.seed}): {c['plan_error']} PlanError, {c['ran']} loaded and ran, "
          f"{c['other']} other errors; slowest {result['slowest_s']} s ({result['slowest_outcome']})")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if c["other"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
