"""Strict plan files: mutated plans load and run, or raise a PlanError that names the field."""

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_vdit import VideoLayout, compile_layer
from sparse_vdit.kernels import sparse_attention
from sparse_vdit.patterns import Pattern, diagonal, multi_diagonal, skip, vertical, with_sink
from sparse_vdit.plan import ModelSpec, Plan, PlanError
import sparse_vdit.plan_schema as schema
from strategies import examples

SHIPPED = Path(__file__).parents[2] / "src/sparse_vdit/organism/weights/plan.json"
SPEC = ModelSpec("wan", 2, 3, "tiny")
BASES = {
    "shipped": json.loads(SHIPPED.read_text()),
    "uniform-diagonal": Plan.uniform(SPEC, diagonal(1.0), block_size=16, layout=VideoLayout(3, 4, 4)).to_dict(),
    "uniform-vertical": Plan.uniform(SPEC, vertical(((0.0, 1.0), (1.5, 2.0)), 0.5), warmup_steps=1).to_dict(),
    "uniform-temporal": Plan.uniform(SPEC, multi_diagonal(0.2), block_size=32).to_dict(),
    "uniform-sink": Plan.uniform(SPEC, with_sink(multi_diagonal(0.2), 0.5), block_size=32).to_dict(),
}
TINY = VideoLayout(2, 3, 5)


def label(path) -> str:
    """How PlanErrors spell a field: model.num_layers, schedule[0].heads[1], patterns[2].width."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


# Fields whose change can make another field wrong (the error then names that one).
RELATED = {
    "model": ("schedule[", "warmup.layers", '"patterns"'),
    "patterns": ("schedule[",),
    "block_size": ('"layout"',),
    "format": ('"version"',),
}


def run(plan: Plan) -> None:
    """Use a loaded plan as the library does, on a tiny layout."""
    assert Plan.loads(plan.dumps()) == plan
    if plan.layout is not None:
        assert 0.0 <= plan.density() <= 1.0
    q, k, v = torch.randn(3, 1, TINY.num_tokens, plan.num_heads, 8).unbind(0)
    for layer in range(plan.num_layers):
        table = compile_layer(plan.patterns_for(plan.warmup_steps, layer), TINY, plan.block_size)
        assert torch.isfinite(sparse_attention(q, k, v, table, backend="reference")).all()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "made_by":
                yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i in sorted({0, len(node) - 1}) if node else ():
            yield from _paths(node[i], prefix + (i,))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["0.5", "dense", "", "steps"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["name", "width", "a"]), inner, max_size=2),
    max_leaves=6,
)  # fmt: skip


@st.composite
def mutated_plans(draw):
    base = draw(st.sampled_from(sorted(BASES)))
    data = copy.deepcopy(BASES[base])
    path = draw(st.sampled_from([p for p in _paths(data) if p]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "replace", "delete", "rename"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "rename" and isinstance(parent, dict):
        parent[path[-1] + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(path[-1])
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return path, json.dumps(data)


@examples(150)
@given(mutated_plans())
def test_mutated_plans_run_or_raise_a_plan_error_naming_the_field(case):
    path, text = case
    try:
        plan = Plan.loads(text, "plan.json")
    except PlanError as err:
        message = str(err)
        assert message.startswith("plan.json: ")
        named = [label(path[:n]) for n in range(1, len(path) + 1)] + ['"' + path[0] + '"', "the top level"]
        named += RELATED.get(path[0], ())
        assert any(name in message for name in named), (path, message)
        return
    run(plan)


DROP = object()


def _edit(base, path, value):
    """``BASES[base]`` as JSON with the value at ``path`` set to ``value`` (removed for :data:`DROP`)."""
    data = copy.deepcopy(BASES[base])
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DROP:
        target.pop(path[-1])
    else:
        target[path[-1]] = value
    return json.dumps(data)


REFUSED = {
    "malformed-json": ('{"format": "sparse-vdit-plan",', "not valid JSON"),
    "not-an-object": ("[1, 2]", "must be a JSON object"),
    "other-format": (_edit("shipped", ["format"], "something"), "not a sparse-vdit plan"),
    "future-version": (_edit("shipped", ["version"], 7), "version 7 is newer"),
    "string-version": (_edit("shipped", ["version"], "1"), "\"version\": must be an integer, got \"1\""),
    "unknown-top-key": (_edit("shipped", ["extra"], 1), "the top level: unknown key 'extra'"),
    "missing-schedule": (_edit("shipped", ["schedule"], DROP), "missing key 'schedule'"),
    "unknown-family": (_edit("shipped", ["model", "family"], "sora"), "model.family: must be one of .*\"sora\""),
    "zero-layers": (_edit("shipped", ["model", "num_layers"], 0), r"model.num_layers: must lie in \[1, 4096\], got 0"),
    "unknown-pattern": (_edit("shipped", ["patterns", 0], {"name": "diag"}), r"patterns\[0\].name: .*did you mean 'diagonal'"),
    "unknown-parameter": (_edit("shipped", ["patterns", 0], {"name": "diagonal", "radius": 2}),
                          r"patterns\[0\]: unknown key 'radius'"),  # fmt: skip
    "negative-width": (_edit("shipped", ["patterns", 0], {"name": "diagonal", "width": -1}), r"patterns\[0\].width: must lie in"),
    "index-out-of-palette": (_edit("shipped", ["schedule", 0, "heads", 1, 2], 99),
                             r"schedule\[0\].heads\[1\]\[2\]: pattern index 99"),  # fmt: skip
    "wrong-layer-count": (_edit("shipped", ["schedule", 0, "heads", 7], DROP), "has 7 layers, but model.num_layers is 8"),
    "wrong-head-count": (_edit("shipped", ["schedule", 1, "heads", 0, 3], DROP), r"schedule\[1\].heads\[0\]: has 3 heads"),
    "ranges-not-from-0": (_edit("shipped", ["schedule", 0, "start"], 1), "must start at 0"),
    "ranges-not-increasing": (_edit("shipped", ["schedule", 1, "start"], 0), "increase strictly"),
    "negative-warmup": (_edit("shipped", ["warmup", "steps"], -1), "warmup.steps: must lie in"),
    "warmup-beyond-layers": (_edit("shipped", ["warmup", "layers"], 9), r"warmup.layers: must lie in \[0, 8\]"),
    "zero-frames": (_edit("shipped", ["layout", "frames"], 0), "layout.frames: must lie in"),
    "layout-unknown-key": (_edit("shipped", ["layout", "depth"], 3), "layout.*depth"),
    "misspelt-warmup-key": (_edit("shipped", ["warmup"], {"step": 5}), "warmup\": unknown key 'step'; did you mean 'steps'"),
    "misspelt-top-key": (_edit("shipped", ["shedule"], []), "unknown key 'shedule'; did you mean 'schedule'"),
    "string-width": (_edit("shipped", ["patterns", 1, "width"], "0.5"), r"patterns\[1\].width: must be a number, got \"0.5\""),
    "bool-width": (_edit("shipped", ["patterns", 1, "width"], True), r"patterns\[1\].width: must be a number, got true"),
    "wide-multi-diagonal": (_edit("shipped", ["patterns", 2, "width"], 1.7), r"patterns\[2\].width: must lie in \[0, 1\]"),
    "huge-column": (_edit("uniform-vertical", ["patterns", 0, "columns", 0, 1], 1e300), r"columns\[0\]\[1\]: must lie"),
    "empty-columns": (_edit("uniform-vertical", ["patterns", 0, "columns"], []), "at least one column range"),
    "columns-on-diagonal": (_edit("uniform-diagonal", ["patterns", 0, "columns"], [[0, 1]]), "unknown key 'columns'"),
    "block-2^40": (_edit("shipped", ["block_size"], 2**40), r"\"block_size\": must lie in \[16, 1024\]"),
    "block-not-power": (_edit("shipped", ["block_size"], 96), "must be a power of two"),
    "layout-10^12-tokens": (_edit("shipped", ["layout", "frames"], 10**12), "layout.frames: must lie in"),
    "layout-too-many-tokens": (_edit("shipped", ["layout", "height"], 20000), r"\"layout\": \d+ tokens; at most"),
    "bool-frames": (_edit("shipped", ["layout", "frames"], True), "layout.frames: must be an integer, got true"),
    "float-layers": (_edit("shipped", ["model", "num_layers"], 8.0), "model.num_layers: must be an integer, got 8.0"),
    "huge-warmup": (_edit("shipped", ["warmup", "steps"], 10**30), "warmup.steps: must lie in"),
    "huge-start": (_edit("shipped", ["schedule", 1, "start"], 10**30), r"schedule\[1\].start: must lie in"),
    "deep-made-by": (_edit("shipped", ["made_by", "x"], json.loads("[" * 40 + "]" * 40)), "nested more than 32"),
    "duplicate-key": ('{"format": "sparse-vdit-plan", "version": 1, "version": 1}', "'version' appears twice"),
    "nan": (SHIPPED.read_text().replace('"width": 2.0', '"width": NaN'), "NaN is not a JSON number"),
    "infinity": (SHIPPED.read_text().replace('"width": 2.0', '"width": Infinity'), "Infinity is not a JSON number"),
    "1e400": (SHIPPED.read_text().replace('"width": 2.0', '"width": 1e400'), "not valid JSON: 1e400 is too large"),
    "5000-digits": (SHIPPED.read_text().replace('"block_size": 64', '"block_size": ' + "9" * 5000), "not valid JSON"),
    "deep-nesting": ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_the_field_named(case, tmp_path):
    text, message = REFUSED[case]
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_file_bytes(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_bytes(SHIPPED.read_bytes()[:100] + b"\xff\xfe" + SHIPPED.read_bytes()[100:])
    with pytest.raises(PlanError, match="not UTF-8 text"):
        Plan.load(path)
    path.write_bytes(b"\xef\xbb\xbf" + SHIPPED.read_bytes())  # a byte-order mark is fine
    assert Plan.load(path) == Plan.load(SHIPPED)
    monkeypatch.setattr(schema, "MAX_FILE_BYTES", 1000)
    with pytest.raises(PlanError, match="larger than"):
        Plan.load(path)
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path)  # a folder


def test_patterns_refuse_non_finite_parameters():
    for width in (float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="width must be a finite number"):
            Pattern("diagonal", width)
    with pytest.raises(ValueError, match="column range"):
        Pattern("vertical", 0.0, ((0.0, float("inf")),))
    with pytest.raises(PlanError, match="block_size must be a power of two in \\[16, 1024\\]"):
        Plan.uniform(SPEC, "dense", block_size=2048)


def test_valid_plans_still_load():
    for name, data in BASES.items():
        run(Plan.from_dict(data, name))


def test_sinks_load_and_are_checked():
    plan = Plan.uniform(SPEC, with_sink(diagonal(1.0)), block_size=16)
    assert Plan.loads(plan.dumps()).patterns_for(0, 0)[0] == with_sink(diagonal(1.0))
    data = plan.to_dict()
    for value, cause in ((-1.0, "sink"), ("1", "sink"), (1e9, "sink")):
        bad = copy.deepcopy(data)
        bad["patterns"][0]["sink"] = value
        with pytest.raises(PlanError, match=cause):
            Plan.from_dict(bad)
    bad = copy.deepcopy(data)
    bad["patterns"][0] = {"name": "skip", "sink": 1.0}  # skip visits nothing, a sink included
    with pytest.raises(PlanError, match="sink"):
        Plan.from_dict(bad)
    assert skip().to_dict() == {"name": "skip"}
