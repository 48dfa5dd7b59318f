"""Strict reading of plan files: every key known, exact types, finite numbers in range, sizes bounded.

:func:`read_plan_text` reads a file as UTF-8 and :func:`parse_plan_json` parses it, refusing
duplicate keys, ``NaN`` / ``Infinity`` and absurd nesting; :func:`plan_fields` checks the parsed
document against the schema (``plan.py`` describes it) and returns plain Python values for
:class:`~sparse_vdit.plan.Plan`. Every error is a :class:`PlanError` of the form
``"<source>: <field>: <cause>"`` raised before anything is allocated from the file's numbers.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layout import TEXT_POSITIONS, VideoLayout
from .patterns import Pattern, pattern_names

FORMAT = "sparse-vdit-plan"
VERSION = 1
FAMILIES = ("wan", "hunyuan_video", "cogvideox", "hunyuan_video15", "skyreels_v2", "ltx_video", "mochi")
# pipeline components that hold a denoising transformer (Wan2.2 A14B: high-noise, then low-noise expert)
EXPERT_COMPONENTS = ("transformer", "transformer_2")
EXPERTS_KEYS = ("format", "version", "experts")

MAX_FILE_BYTES = 64 << 20  # the largest real plan (HunyuanVideo, many ranges) is well under 1 MB
MAX_DEPTH = 32  # nesting of "made_by"
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_STEPS = 100_000  # step-range starts and warm-up steps
MIN_BLOCK, MAX_BLOCK = 16, 1024  # block_size: a power of two in this range
MAX_TOKENS = 1 << 21  # a recorded layout: 17x HunyuanVideo 720p
MAX_BLOCKS = 1 << 14  # a recorded layout's blocks along one side at the plan's block size
MAX_FRAMES = 10_000  # frame-major widths and vertical column bounds, in frames
MAX_COLUMNS = 256  # column ranges of one vertical pattern
MAX_NAME = 200  # characters of model.name

TOP_KEYS = ("format", "version", "model", "layout", "block_size", "warmup", "made_by", "patterns", "schedule")
MODEL_KEYS = ("family", "num_layers", "num_heads", "name")
LAYOUT_KEYS = ("frames", "height", "width", "text", "text_position", "text_valid")
WARMUP_KEYS = ("steps", "layers")
RANGE_KEYS = ("start", "heads")
# Parameters each pattern takes; token-major patterns give ``width`` as a fraction of the video.
PATTERN_KEYS = {"dense": (), "skip": (), "vertical": ("columns", "width")}
BAND_KEYS = ("width",)


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model it is applied to."""


@dataclass(frozen=True)
class PlanFields:
    """A checked plan document as Python values (what :class:`~sparse_vdit.plan.Plan` is built from)."""

    family: str
    num_layers: int
    num_heads: int
    name: str | None
    schedule: tuple[tuple[int, tuple[tuple[Pattern, ...], ...]], ...]
    warmup_steps: int
    warmup_layers: int
    block_size: int
    layout: VideoLayout | None
    made_by: dict


# --- reading and parsing --------------------------------------------------------------------


def read_plan_text(path: str | Path) -> str:
    """The file's text, read as UTF-8; PlanError if it cannot be read, is too large or is not UTF-8."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise PlanError(f"cannot read plan {path}: {err.strerror or err}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PlanError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB: not a plan file")
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as err:
        raise PlanError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    pass


class _Constant(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Constant(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Constant(f"{text[:20]} is too large for a float; it")
    return value


def parse_plan_json(text: str, source: str) -> Any:
    """Parse strict JSON: no duplicate keys, no NaN/Infinity, bounded nesting and number sizes."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant,
                          parse_float=_finite_float)  # fmt: skip
    except json.JSONDecodeError as err:
        raise PlanError(f"{source}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except _Duplicate as err:
        raise PlanError(f"{source}: not valid JSON: the key {err.args[0]!r} appears twice in one object") from None
    except _Constant as err:
        raise PlanError(f"{source}: not valid JSON: {err.args[0]} is not a JSON number") from None
    except RecursionError:
        raise PlanError(f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise PlanError(f"{source}: not valid JSON: {err}") from None


# --- field checks ---------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Raises PlanErrors that name the source and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, cause: str) -> PlanError:
        return PlanError(f"{self.source}: {where}: {cause}")

    def keys(self, data: Any, where: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(data, dict):
            raise self.fail(where, f"must be a JSON object, got {_show(data)}")
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
                raise self.fail(where, f"unknown key {key!r}{hint}")
        for key in required:
            if key not in data:
                raise self.fail(where, f"missing key {key!r}")
        return data

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"must be an integer, got {_show(value)}")
        if not low <= value <= high:
            raise self.fail(where, f"must lie in [{low}, {high}], got {_show(value)}")
        return value

    def number(self, value: Any, where: str, low: float, high: float, above_low: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(where, f"must be a number, got {_show(value)}")
        if isinstance(value, int) and abs(value) > 1 << 53:
            raise self.fail(where, f"must lie in [{low:g}, {high:g}], got {_show(value)}")
        value = float(value)
        if not math.isfinite(value) or not low <= value <= high or (above_low and value == low):
            bracket = "(" if above_low else "["
            raise self.fail(where, f"must lie in {bracket}{low:g}, {high:g}], got {_show(value)}")
        return value

    def list(self, value: Any, where: str, most: int) -> list:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {_show(value)}")
        if len(value) > most:
            raise self.fail(where, f"has {len(value)} entries, at most {most} allowed")
        return value

    def choice(self, value: Any, where: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(where, f"must be one of {', '.join(choices)}, got {_show(value)}{hint}")
        return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _pattern(check: _Checker, data: Any, where: str) -> Pattern:
    check.keys(data, where, ("name", "width", "columns", "sink"), ("name",))
    name, known = data["name"], pattern_names()
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise check.fail(f"{where}.name", f"unknown pattern {name!r}; {hint}known: {', '.join(known)}")
    params = PATTERN_KEYS.get(name, BAND_KEYS)
    params = params if name == "skip" else (*params, "sink")  # a sink: frames of keys every query visits
    check.keys(data, where, ("name", *params))
    token_major = Pattern(name).token_major
    width = 0.0
    if "width" in data:
        high = 1.0 if token_major else float(MAX_FRAMES)
        width = check.number(data["width"], f"{where}.width", 0.0, high)
    columns: list[tuple[float, float]] = []
    if "columns" in params:
        if "columns" not in data:
            raise check.fail(where, "missing key 'columns' (vertical needs at least one column range)")
        ranges = check.list(data["columns"], f"{where}.columns", MAX_COLUMNS)
        if not ranges:
            raise check.fail(f"{where}.columns", "vertical needs at least one column range")
        for i, pair in enumerate(ranges):
            at = f"{where}.columns[{i}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise check.fail(at, f"must be a [start, end] pair of frames, got {_show(pair)}")
            lo = check.number(pair[0], f"{at}[0]", 0.0, float(MAX_FRAMES))
            hi = check.number(pair[1], f"{at}[1]", 0.0, float(MAX_FRAMES))
            if not lo < hi:
                raise check.fail(at, f"start {lo:g} must be below end {hi:g}")
            columns.append((lo, hi))
    sink = check.number(data["sink"], f"{where}.sink", 0.0, float(MAX_FRAMES)) if "sink" in data else 0.0
    return Pattern(name, width, tuple(columns), sink)


def _layout(check: _Checker, data: Any, block: int) -> VideoLayout:
    check.keys(data, '"layout"', LAYOUT_KEYS, ("frames", "height", "width"))
    sizes = {key: check.integer(data[key], f"layout.{key}", 1, MAX_TOKENS) for key in ("frames", "height", "width")}
    text = check.integer(data.get("text", 0), "layout.text", 0, MAX_TOKENS)
    position = check.choice(data.get("text_position", "none"), "layout.text_position", TEXT_POSITIONS)
    valid = data.get("text_valid")
    if valid is not None:
        valid = check.integer(valid, "layout.text_valid", 0, text)
    tokens = sizes["frames"] * sizes["height"] * sizes["width"] + text
    if tokens > MAX_TOKENS:
        raise check.fail('"layout"', f"{tokens} tokens; at most {MAX_TOKENS} allowed")
    if -(-tokens // block) > MAX_BLOCKS:
        raise check.fail('"layout"', f"{tokens} tokens make more than {MAX_BLOCKS} blocks of {block}")
    try:
        return VideoLayout(sizes["frames"], sizes["height"], sizes["width"], text, position, valid)
    except ValueError as err:
        raise check.fail('"layout"', str(err)) from None


def _header(check: _Checker, data: Any) -> None:
    if not isinstance(data, dict):
        raise check.fail("the top level", f"must be a JSON object, got {_show(data)}")
    if data.get("format") != FORMAT:
        raise check.fail('"format"', f"not a sparse-vdit plan (must be {FORMAT!r}, got {_show(data.get('format'))})")
    version = check.integer(data.get("version"), '"version"', 1, 1 << 31)
    if version > VERSION:
        raise check.fail('"version"', f"plan version {version} is newer than this sparse-vdit reads ({VERSION}); "
                                      "upgrade sparse-vdit")  # fmt: skip


def expert_documents(data: Any, source: str) -> dict[str, Any] | None:
    """The per-expert plan documents of a file holding one plan per pipeline component, or None
    for a single-plan file::

        {"format": "sparse-vdit-plan", "version": 1,
         "experts": {"transformer": {<a plan>}, "transformer_2": {<a plan>}}}
    """
    check = _Checker(source)
    _header(check, data)
    if "experts" not in data:
        return None
    check.keys(data, "the top level", EXPERTS_KEYS, EXPERTS_KEYS)
    experts = check.keys(data["experts"], '"experts"', EXPERT_COMPONENTS)
    if not experts:
        raise check.fail('"experts"', "holds no plan")
    return dict(experts)


def plan_fields(data: Any, source: str) -> PlanFields:
    """Check a parsed plan document against the schema; PlanError naming the field otherwise."""
    check = _Checker(source)
    _header(check, data)
    if "experts" in data:
        raise check.fail("the top level", "holds one plan per expert (" + ", ".join(map(str, data["experts"])) +
                         "): read it with sparse_vdit.load_plans (sparse_vdit.apply takes its path)")  # fmt: skip
    check.keys(data, "the top level", TOP_KEYS, ("model", "patterns", "schedule"))

    model = check.keys(data["model"], '"model"', MODEL_KEYS, ("family", "num_layers", "num_heads"))
    family = check.choice(model["family"], "model.family", FAMILIES)
    num_layers = check.integer(model["num_layers"], "model.num_layers", 1, MAX_LAYERS)
    num_heads = check.integer(model["num_heads"], "model.num_heads", 1, MAX_HEADS)
    name = model.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise check.fail("model.name", f"must be a string of at most {MAX_NAME} characters or null, got {_show(name)}")

    block = check.integer(data.get("block_size", 128), '"block_size"', MIN_BLOCK, MAX_BLOCK)
    if block & (block - 1):
        raise check.fail('"block_size"', f"must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {block}")
    layout = None if data.get("layout") is None else _layout(check, data["layout"], block)

    warmup = check.keys(data.get("warmup", {}), '"warmup"', WARMUP_KEYS)
    warmup_steps = check.integer(warmup.get("steps", 0), "warmup.steps", 0, MAX_STEPS)
    warmup_layers = check.integer(warmup.get("layers", 0), "warmup.layers", 0, num_layers)

    made_by = data.get("made_by", {})
    if not isinstance(made_by, dict):
        raise check.fail('"made_by"', f"must be a JSON object, got {_show(made_by)}")
    if _depth(made_by) > MAX_DEPTH:
        raise check.fail('"made_by"', f"nested more than {MAX_DEPTH} levels deep")

    palette_data = check.list(data["patterns"], '"patterns"', num_layers * num_heads)
    palette = [_pattern(check, p, f"patterns[{i}]") for i, p in enumerate(palette_data)]

    ranges = check.list(data["schedule"], '"schedule"', MAX_STEPS)
    if not ranges:
        raise check.fail('"schedule"', "has no step ranges")
    schedule = []
    previous = -1
    for i, entry in enumerate(ranges):
        where = f"schedule[{i}]"
        check.keys(entry, where, RANGE_KEYS, RANGE_KEYS)
        start = check.integer(entry["start"], f"{where}.start", 0, MAX_STEPS)
        if (i == 0 and start != 0) or start <= previous:
            raise check.fail(f"{where}.start", f"{start}: step ranges must start at 0 and increase strictly")
        previous = start
        rows = check.list(entry["heads"], f"{where}.heads", MAX_LAYERS)
        if len(rows) != num_layers:
            raise check.fail(f"{where}.heads", f"has {len(rows)} layers, but model.num_layers is {num_layers}")
        layers = []
        for layer, row in enumerate(rows):
            row = check.list(row, f"{where}.heads[{layer}]", MAX_HEADS)
            if len(row) != num_heads:
                raise check.fail(f"{where}.heads[{layer}]", f"has {len(row)} heads, but model.num_heads is {num_heads}")
            for head, index in enumerate(row):
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(palette):
                    raise check.fail(f"{where}.heads[{layer}][{head}]",
                                     f"pattern index {_show(index)} not in the palette of {len(palette)} patterns")  # fmt: skip
            layers.append(tuple(palette[index] for index in row))
        schedule.append((start, tuple(layers)))
    return PlanFields(family, num_layers, num_heads, name, tuple(schedule), warmup_steps, warmup_layers, block,
                      layout, made_by)  # fmt: skip
