"""How much of the SVG reference's attention our tables compute (CPU, no N x N mask).

    python bench/svg_coverage.py [--out DIR] [--shapes wan-480p wan-720p hunyuan-720p]

For each layout at the reference's density (Wan T2V 0.25, Wan I2V 0.3, HunyuanVideo 0.25) and
each head kind (spatial: frame-major, temporal: token-major), the reference's executed mask
(:mod:`sparse_vdit.methods.svg_reference`: band ``|q - k| <= B`` plus the first-frame sink on Wan,
text rows and columns on HunyuanVideo, all in the head's own order) is counted pair by pair per
(query block, key block) from interval arithmetic, one chunk of query tokens at a time; our
table's visited blocks then give the covered share of the reference's (query, key) pairs:
``coverage = sum over visited blocks of reference pairs / all reference pairs`` (target >= 0.99).
Both SVG modes are measured: ``reference`` (the default) and ``ours`` (fitted widths, no sink).

Then, on a small Wan-like layout where dense attention fits, a head that attends the first
frame (a sink head) is run through each mode's spatial table and the reference's token mask:
relative RMS error against dense attention, float64 (target: ours within 2x of the reference's).
Writes ``svg_coverage.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sparse_vdit import VideoLayout, compile_layer
from sparse_vdit.methods.svg import SVG
from sparse_vdit.methods.svg_reference import WAN_T2V, ReferenceConfig
from sparse_vdit.plan import KNOWN_MODELS, ModelSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside
from common import write_json  # noqa: E402

BLOCK = 128
SHAPES = {  # name: (layout, model, density: the reference scripts')
    "wan-480p": (VideoLayout(21, 30, 52), KNOWN_MODELS["wan2.1-t2v-1.3b"], 0.25),
    "wan-480p-i2v": (VideoLayout(21, 30, 52), ModelSpec("wan", 40, 40, "wan2.1-i2v-14b-480p"), 0.3),
    "wan-720p": (VideoLayout(21, 45, 80), KNOWN_MODELS["wan2.1-t2v-14b"], 0.25),
    "hunyuan-720p": (VideoLayout(33, 45, 80, 256, "suffix", text_valid=128), KNOWN_MODELS["hunyuan-video"], 0.25),
}


def _overlap(lo_a, hi_a, lo_b, hi_b):
    """Length of [lo_a, hi_a) n [lo_b, hi_b), elementwise (broadcast), clipped at 0."""
    return (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp_min(0)


def reference_pairs(config: ReferenceConfig, layout: VideoLayout, density: float, chunk: int = 4096) -> torch.Tensor:
    """float64 [Qb, Kb]: the reference's kept (query, key) pairs per block pair, in the head's own order.

    Kept: ``|q - k| <= band``; or ``k`` in the sink ``[v0, v0 + S)`` (Wan); or ``q`` or ``k`` text
    (real text keys only). Counted with interval overlaps per query token and key block.
    """
    n, kv, v0 = layout.num_tokens, layout.kv_len, layout.video_start
    band = config.band_tokens(layout, density)
    kb = -(-kv // BLOCK)
    k_lo = torch.arange(kb, dtype=torch.long) * BLOCK
    k_hi = torch.clamp(k_lo + BLOCK, max=kv)
    valid_text = layout.text if layout.text_valid is None else layout.text_valid
    t_lo, t_hi = torch.tensor(layout.text_start), torch.tensor(layout.text_start + valid_text)
    s_lo = torch.tensor(v0)
    s_hi = torch.tensor(v0 + (layout.frame_tokens if config.sink else 0))
    out = torch.zeros(-(-n // BLOCK), kb, dtype=torch.float64)
    for start in range(0, n, chunk):
        q = torch.arange(start, min(n, start + chunk), dtype=torch.long)[:, None]
        b_lo, b_hi = q - band, q + band + 1  # empty when band < 0
        extra_lo = torch.where(t_hi > t_lo, t_lo, s_lo)  # a second key interval: text (MMDiT) or the sink (Wan)
        extra_hi = torch.where(t_hi > t_lo, t_hi, s_hi)
        count = (_overlap(b_lo, b_hi, k_lo, k_hi) + _overlap(extra_lo, extra_hi, k_lo, k_hi)
                 - _overlap(torch.maximum(b_lo, extra_lo), torch.minimum(b_hi, extra_hi), k_lo, k_hi))  # fmt: skip
        is_text = (q >= layout.text_start) & (q < layout.text_start + layout.text) & (layout.text > 0)
        count = torch.where(is_text, k_hi - k_lo, count)  # text rows see every key
        out.index_add_(0, (q[:, 0] // BLOCK), count.double())
    return out


def coverage(shape: str) -> list[dict]:
    layout, spec, density = SHAPES[shape]
    rows = []
    for mode in ("reference", "ours"):
        svg = SVG(density, mode=mode, block_size=BLOCK)
        svg.spec = spec
        if mode == "reference":
            pairs = reference_pairs(svg.reference(layout), layout, density)
            total = float(pairs.sum())
        for kind, pattern in zip(("spatial", "temporal"), svg.candidates(layout)):
            table = compile_layer([pattern], layout, BLOCK)
            visited = table.block_mask(0)
            rows.append(dict(shape=shape, layout=layout.describe(), density=density, mode=mode, head=kind,
                             pattern=str(pattern), coverage=float(pairs[visited].sum()) / total,
                             reference_pair_density=total / (layout.num_tokens * layout.kv_len),
                             table_density=table.density))  # fmt: skip
    return rows


def sink_head_errors(layout: VideoLayout = VideoLayout(21, 12, 16), density: float = 0.25, dim: int = 64) -> list[dict]:
    """A head whose keys of the first frame score 12 above the rest (plus noise), float64: the error
    of each mode's spatial table and of the reference's token mask against dense attention."""
    g = torch.Generator().manual_seed(0)
    n, per = layout.num_tokens, layout.frame_tokens
    q = torch.randn(1, n, dim, generator=g, dtype=torch.float64) * 0.3
    k = torch.randn(1, n, dim, generator=g, dtype=torch.float64) * 0.3
    v = torch.randn(1, n, dim, generator=g, dtype=torch.float64)
    q[..., 0], k[..., 0] = 12 * dim**0.5, (torch.arange(n) < per).double()
    scale = dim**-0.5
    scores = (q @ k.transpose(1, 2)) * scale

    def attend(mask):
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v

    full = attend(torch.ones(n, n, dtype=torch.bool))
    error = lambda out: float((out - full).norm() / full.norm())  # noqa: E731
    pos = torch.arange(n)
    band = WAN_T2V.band_tokens(layout, density, BLOCK)
    rows = [dict(layout=layout.describe(), mask="reference (band + kv < S)",
                 error=error(attend(((pos[:, None] - pos[None, :]).abs() <= band) | (pos[None, :] < per))))]  # fmt: skip
    for mode in ("reference", "ours"):
        svg = SVG(density, mode=mode, block_size=BLOCK)
        svg.spec = KNOWN_MODELS["wan2.1-t2v-1.3b"]
        pattern = svg.candidates(layout)[0]
        mask = compile_layer([pattern], layout, BLOCK).block_mask(0).repeat_interleave(BLOCK, 0)
        mask = mask.repeat_interleave(BLOCK, 1)[:n, :n]
        rows.append(dict(layout=layout.describe(), mask=f"{mode}: {pattern}", error=error(attend(mask))))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    start = time.time()
    result = {"command": "python bench/svg_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "block": BLOCK, "coverage": [], "sink_head": sink_head_errors()}  # fmt: skip
    for shape in args.shapes:
        result["coverage"] += coverage(shape)
    result["wall_s"] = time.time() - start
    print(f"{'shape':14s} {'mode':9s} {'head':8s} {'coverage':>8s} {'ref pairs':>9s} {'table':>6s}  pattern")
    for r in result["coverage"]:
        print(f"{r['shape']:14s} {r['mode']:9s} {r['head']:8s} {r['coverage']:8.4f} {r['reference_pair_density']:9.3f} "
              f"{r['table_density']:6.3f}  {r['pattern']}")  # fmt: skip
    print("\nsink head (attends the first frame), relative RMS error vs dense attention, float64:")
    for r in result["sink_head"]:
        print(f"  {r['mask']:45s} {r['error']:.3e}")
    path = write_json(os.path.join(args.out, "svg_coverage.json"), result)
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
