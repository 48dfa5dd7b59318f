"""A plan in words and in a picture: pattern shares and density per layer, per step range.

:func:`summary_text` needs only the plan; :func:`draw_plan` imports matplotlib when called.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .layout import VideoLayout
from .patterns import Pattern, compile_layer
from .plan import Plan, StepRange

# pattern family -> (colour, short label); unknown families get grey
FAMILY_STYLE = {
    "dense": ("#3b3b3b", "dense"),
    "skip": ("#f4f1ea", "skip"),
    "diagonal": ("#2b6cb0", "diag"),
    "spatial": ("#63a4e8", "spat"),
    "multi_diagonal": ("#dd6b20", "mdiag"),
    "temporal": ("#f6ad55", "temp"),
    "vertical": ("#2f855a", "vert"),
}


def _order(names) -> list[str]:
    known = [n for n in FAMILY_STYLE if n in names]
    return known + sorted(set(names) - set(known))


class _Densities:
    """Block density of single patterns at one layout, memoised."""

    def __init__(self, layout: VideoLayout | None, block: int) -> None:
        self.layout, self.block, self.cache = layout, block, {}

    def __call__(self, pattern: Pattern) -> float | None:
        if self.layout is None:
            return None
        if pattern not in self.cache:
            self.cache[pattern] = compile_layer([pattern], self.layout, self.block).density
        return self.cache[pattern]

    def layer(self, heads) -> float | None:
        values = [self(p) for p in heads]
        return None if self.layout is None else sum(values) / len(values)


def range_label(plan: Plan, index: int, steps: int | None = None) -> str:
    """``steps a-b`` of step range ``index`` (after the warm-up); open-ended without ``steps``.

    Steps are counted from 1 here, as a user counts them (the plan file's ``start`` counts from 0).
    """
    start = max(plan.schedule[index].start, plan.warmup_steps) + 1
    end = plan.schedule[index + 1].start if index + 1 < len(plan.schedule) else steps
    if end is not None and end < start:
        return f"steps {plan.schedule[index].start + 1}-{end} (all warm-up)"
    if end == start:
        return f"step {start}"
    return f"steps {start}-{end}" if end is not None else f"steps {start}+"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _steps(plan: Plan) -> int | None:
    steps = plan.made_by.get("steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def summary_text(plan: Plan, layout: VideoLayout | None = None) -> str:
    """Model, layout, warm-up; per step range a table of layers (density, heads per pattern family)
    and the commonest patterns; overall density and speedups; the search's settings and stats."""
    layout = layout or plan.layout
    dens = _Densities(layout, plan.block_size)
    steps = _steps(plan)
    made = plan.made_by
    method = made.get("method", "?") + (f" (mode {made['mode']})" if "mode" in made else "")
    lines = [f"plan for {plan.spec.describe()}, block {plan.block_size}, made by {method}"]
    lines.append(f"layout: {layout.describe() if layout else 'not recorded (pass one for densities)'}; "
                 f"dense warm-up: {_count(plan.warmup_steps, 'step')}, {_count(plan.warmup_layers, 'layer')}")  # fmt: skip
    families = _order({p.name for r in plan.schedule for heads in r.layers for p in heads})
    for i, r in enumerate(plan.schedule):
        lines.append("")
        lines.append(_range_header(plan, i, steps, r, dens))
        short = [FAMILY_STYLE.get(f, ("", f))[1] for f in families]
        lines.append("  layer  density  " + "  ".join(f"{s:>5}" for s in short))
        for layer, heads in enumerate(r.layers):
            warm = layer < plan.warmup_layers
            count = Counter(p.name for p in heads)
            density = 1.0 if warm else dens.layer(heads)
            cells = "  ".join(f"{count.get(f, 0) if not warm else '-':>5}" for f in families)
            note = "  (warm-up: dense)" if warm else ""
            lines.append(f"  {layer:5d}  {_pct(density):>7}  {cells}{note}")
        common = Counter(str(p) for layer, heads in enumerate(r.layers) if layer >= plan.warmup_layers for p in heads)
        total = sum(common.values()) or 1
        top = ", ".join(f"{name} {n / total:.0%}" for name, n in common.most_common(6))
        lines.append(f"  commonest: {top}" + (" ..." if len(common) > 6 else ""))
    lines.append("")
    if layout is not None:
        density = plan.density(layout, steps=steps)
        over = f"over {steps} steps (warm-up included)" if steps else "after the warm-up"
        lines.append(
            f"overall: {density:.1%} of blocks {over}; block-count attention speedup {1 / max(density, 1e-9):.2f}x"
        )
    stats = made.get("stats", {})
    if stats:
        lines.append("search: " + _stats_text(stats))
    settings = [f"{k}={made[k]}" for k in ("error", "estimate", "sample_blocks", "tune", "epsilon", "lam", "buckets",
                                           "warmup_steps", "warmup_layers", "backend") if k in made]  # fmt: skip
    if "cost" in made:
        cost = made["cost"]
        settings.append(f"cost={cost.get('kind', cost) if isinstance(cost, dict) else cost}")
    if settings:
        lines.append("settings: " + " ".join(settings))
    if "prompts" in made:
        lines.append(f"runs: {len(made['prompts'])} prompt(s) x {len(made.get('seeds', [0]))} seed(s)")
    return "\n".join(lines)


def _range_header(plan: Plan, i: int, steps: int | None, r: StepRange, dens: _Densities) -> str:
    searched = [heads for layer, heads in enumerate(r.layers) if layer >= plan.warmup_layers]
    all_layers = [1.0 if layer < plan.warmup_layers else dens.layer(h) for layer, h in enumerate(r.layers)]
    density = None if dens.layout is None else sum(all_layers) / len(all_layers)
    count = Counter(p.name for heads in searched for p in heads)
    total = sum(count.values()) or 1
    shares = ", ".join(f"{name} {n / total:.0%}" for name, n in sorted(count.items(), key=lambda kv: -kv[1]))
    return f"range {i + 1}, {range_label(plan, i, steps)}: density {_pct(density)}; heads: {shares}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _stats_text(stats: dict) -> str:
    parts = []
    if stats.get("expected_speedup") is not None:
        parts.append(f"expected attention speedup {stats['expected_speedup']:.2f}x ({stats.get('speedup_basis', '')})")
    if "search_seconds" in stats:
        runs = stats.get("run_seconds") or []
        parts.append(f"{stats['search_seconds']:.1f} s" + (f" for {len(runs)} run(s)" if runs else ""))
    if stats.get("dense_seconds"):
        per_run = sorted(stats.get("run_seconds") or [stats["search_seconds"]])[
            len(stats.get("run_seconds") or [0]) // 2
        ]
        parts.append(f"one dense generation {stats['dense_seconds']:.1f} s (search run / dense: "
                     f"{per_run / stats['dense_seconds']:.2f}x)")  # fmt: skip
    stability = stats.get("stability")
    if stability:
        parts.append(f"stability: {stability['changed_share']:.0%} of searched heads differ between the "
                     f"{stability['runs']} runs")  # fmt: skip
    if "layer_calls" in stats:
        parts.append(f"{stats['layer_calls']} layer calls searched")
    return "; ".join(parts)


# --- picture -----------------------------------------------------------------------------------


def draw_plan(plan: Plan, path: str | Path, layout: VideoLayout | None = None, title: str | None = None) -> Path:
    """Write a PNG: per step range a layers x heads grid coloured by pattern family (each cell
    labelled with its block density where there is room), and the density of each layer beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    layout = layout or plan.layout
    dens = _Densities(layout, plan.block_size)
    steps = _steps(plan)
    families = _order({p.name for r in plan.schedule for heads in r.layers for p in heads} | {"dense"})
    index = {f: i for i, f in enumerate(families)}
    cmap = ListedColormap([FAMILY_STYLE.get(f, ("#9e9e9e", f))[0] for f in families])
    layers, heads, ranges = plan.num_layers, plan.num_heads, len(plan.schedule)
    cell = 0.34 if heads <= 24 else 0.2
    grid_w, grid_h = max(heads * cell, 1.6), max(layers * cell, 1.6)
    fig_w = ranges * (grid_w + 2.4) + 0.6
    fig_h = grid_h + 1.75
    fig = plt.figure(figsize=(fig_w, fig_h))
    widths = []
    for _ in range(ranges):
        widths += [grid_w, 1.3, 0.9]
    grid = fig.add_gridspec(1, len(widths), width_ratios=widths, left=0.6 / fig_w, right=0.99,
                            top=1 - 0.8 / fig_h, bottom=0.85 / fig_h, wspace=0.08)  # fmt: skip
    labels = heads <= 16 and layers <= 48 and layout is not None
    for i, r in enumerate(plan.schedule):
        ax, bar = fig.add_subplot(grid[0, 3 * i]), fig.add_subplot(grid[0, 3 * i + 1])
        codes = [[index["dense" if layer < plan.warmup_layers else p.name] for p in row]
                 for layer, row in enumerate(r.layers)]  # fmt: skip
        ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(families) - 0.5, interpolation="nearest", aspect="auto")
        ax.set_xticks(range(heads))
        ax.set_xticklabels([str(h) if heads <= 24 or h % 4 == 0 else "" for h in range(heads)], fontsize=7)
        ax.set_yticks(range(layers))
        ax.set_yticklabels([str(l) if layers <= 48 or l % 4 == 0 else "" for l in range(layers)], fontsize=7)
        ax.set_xticks([h - 0.5 for h in range(1, heads)], minor=True)
        ax.set_yticks([l - 0.5 for l in range(1, layers)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_xlabel("head", fontsize=8)
        if i == 0:
            ax.set_ylabel("layer", fontsize=8)
        ax.set_title(range_label(plan, i, steps), fontsize=9)
        if plan.warmup_layers:
            ax.axhspan(-0.5, plan.warmup_layers - 0.5, facecolor="none", edgecolor="#bbbbbb", hatch="///", linewidth=0)
        if labels:
            for layer, row in enumerate(r.layers):
                for h, p in enumerate(row):
                    if layer < plan.warmup_layers or p.name == "dense":
                        continue
                    value = dens(p)
                    dark = p.name not in ("skip", "temporal")
                    ax.text(h, layer, f"{value * 100:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "#333333")  # fmt: skip
        values = [1.0 if layer < plan.warmup_layers else (dens.layer(row) or 0.0) for layer, row in enumerate(r.layers)]
        bar.barh(range(layers), [v * 100 for v in values], color="#718096", height=0.7)
        bar.set_ylim(layers - 0.5, -0.5)
        bar.set_xlim(0, 100)
        bar.set_yticks([])
        bar.set_xticks([0, 50, 100])
        bar.tick_params(labelsize=7)
        bar.set_xlabel("blocks %", fontsize=8)
        bar.set_title("density" if layout is not None else "density (no layout)", fontsize=8)
        for layer, v in enumerate(values):
            if layout is not None and layers <= 48:
                inside = v >= 0.7
                x, ha, colour = (v * 100 - 2, "right", "white") if inside else (v * 100 + 2, "left", "#222222")
                bar.text(x, layer, f"{v:.0%}", va="center", ha=ha, fontsize=6, color=colour)
        fig.add_subplot(grid[0, 3 * i + 2]).set_axis_off()
    handles = [Patch(facecolor=FAMILY_STYLE.get(f, ("#9e9e9e", f))[0], edgecolor="#888888", label=f) for f in families]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    made = plan.made_by
    head = title or f"{plan.spec.describe()}: plan by {made.get('method', '?')}" + (
        f" ({made['mode']})" if "mode" in made else "")  # fmt: skip
    sub = [layout.describe()] if layout is not None else []
    if layout is not None:
        sub.append(f"{plan.density(layout, steps=steps):.1%} of blocks" + (f" over {steps} steps" if steps else ""))
    if plan.warmup_steps or plan.warmup_layers:
        sub.append(f"warm-up {plan.warmup_steps} steps, {plan.warmup_layers} layers dense")
    if labels:
        sub.append("cell: % of blocks")
    fig.suptitle(head + "\n" + "; ".join(sub), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
