"""Procedural captioned videos: coloured, textured shapes moving over moving backgrounds.

A scene is sampled on the CPU from ``numpy.random.default_rng([seed, index])`` (so sample
``index`` of ``seed`` is the same whatever the batch), stored as a :class:`Scene` of plain
attributes, and rendered for a whole batch at once with torch (on any device). The caption is a
pure function of the attributes.

Coordinates are fractions of the frame height, ``x`` to the right and ``y`` downwards; an angle
that grows turns an object clockwise on screen. Motion words describe the world: under a camera
pan everything that ``stays`` or ``moves`` drifts against the pan, while ``bounces`` is bounded by
the frame edges (the walls travel with the camera).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .detail import Detail, background_detail, detail_params, object_detail, sample_detail

FRAMES, HEIGHT, WIDTH = 8, 64, 64

COLOURS = {
    "red": (0.95, -0.75, -0.75),
    "orange": (0.95, 0.15, -0.9),
    "yellow": (0.95, 0.9, -0.7),
    "green": (-0.7, 0.85, -0.7),
    "cyan": (-0.75, 0.9, 0.95),
    "blue": (-0.6, -0.45, 0.95),
    "magenta": (0.9, -0.7, 0.9),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "disc", "triangle", "ring", "bar")
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = ("gradient", "striped", "checkered")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPINS = {"clockwise": 1.0, "anticlockwise": -1.0}
MOTIONS = ("moves", "bounces", "rotates", "stays")
ROTATABLE = ("square", "triangle", "bar")
MAX_OBJECTS = 3

WORDS = (
    ("<pad>", ",", "in", "front", "background", "still", "scrolls", "camera", "pans", "gradient")
    + tuple(COLOURS) + TEXTURES + SHAPES + MOTIONS
    + tuple(DIRECTIONS) + tuple(SPINS)
)


@dataclass(frozen=True, eq=False)
class ObjectAttrs:
    """One object: what it is, how it moves, and its per-frame screen trajectory."""

    shape: str
    colour: str
    texture: str
    motion: str
    direction: str | None  # left/right/up/down, clockwise/anticlockwise, or None for "stays"
    size: float  # half-size in frame heights
    period: float  # texture period in frame heights
    front: bool  # passes in front of an earlier object
    positions: np.ndarray = field(repr=False)  # (T, 2) screen x, y
    angles: np.ndarray = field(repr=False)  # (T,) radians

    def words(self) -> list[str]:
        w = [self.colour, self.texture, self.shape, self.motion]
        if self.direction is not None:
            w.append(self.direction)
        if self.front:
            w += ["in", "front"]
        return w


@dataclass(frozen=True, eq=False)
class Scene:
    """A sampled video: objects back to front, background, camera."""

    objects: tuple[ObjectAttrs, ...]
    background: str
    bg_colours: np.ndarray = field(repr=False)  # (2, 3)
    bg_axis: np.ndarray = field(repr=False)  # (2,) unit normal of the gradient / stripes
    bg_period: float
    bg_motion: str  # still / scrolls / pans
    bg_direction: str | None
    bg_offsets: np.ndarray = field(repr=False)  # (T, 2) pattern shift on screen
    camera: np.ndarray = field(repr=False)  # (T, 2) camera position (world = screen + camera)
    detail: Detail | None = field(default=None, repr=False)  # random textures (detail.py), if drawn

    @property
    def caption(self) -> str:
        clauses = [" ".join(o.words()) for o in self.objects]
        if self.bg_motion == "scrolls":
            clauses.append(f"{self.background} background scrolls {self.bg_direction}")
        elif self.bg_motion == "pans":
            clauses += [f"{self.background} background", f"camera pans {self.bg_direction}"]
        else:
            clauses.append(f"{self.background} background still")
        return ", ".join(clauses)


class Vocabulary:
    """Fixed word list and deterministic caption embeddings (no learned text encoder).

    Each token's embedding is ``[word vector, mean of the clause's context vectors]``: the second
    half tells every token of ``red striped square moves left`` which object it belongs to, the
    part of a text encoder's work a bag of word vectors cannot do. Padding tokens are zeros, so the
    empty caption (classifier-free guidance) embeds to all zeros.
    """

    def __init__(self, tokens: int = 32, dim: int = 64, seed: int = 0):
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        self.words = WORDS
        self.tokens, self.dim, self.seed = tokens, dim, seed
        self.index = {w: i for i, w in enumerate(self.words)}
        g = torch.Generator().manual_seed(seed)
        self.word_vectors = torch.randn(len(self.words), dim // 2, generator=g)
        self.context_vectors = torch.randn(len(self.words), dim // 2, generator=g)
        self.word_vectors[0] = 0
        self.context_vectors[0] = 0

    def split(self, caption: str) -> list[str]:
        return caption.replace(",", " , ").split()

    def encode(self, caption: str) -> list[int]:
        """Token ids of ``caption`` (unpadded); raises on unknown words or too long captions."""
        words = self.split(caption)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"words not in the vocabulary: {unknown}")
        if len(words) > self.tokens:
            raise ValueError(f"caption has {len(words)} tokens, at most {self.tokens}: {caption!r}")
        return [self.index[w] for w in words]

    def embed(self, captions: list[str] | str) -> torch.Tensor:
        """Caption embeddings ``(batch, tokens, dim)`` float32, zero-padded."""
        if isinstance(captions, str):
            captions = [captions]
        out = torch.zeros(len(captions), self.tokens, self.dim)
        comma = self.index[","]
        for b, caption in enumerate(captions):
            ids = self.encode(caption)
            start = 0
            for end in range(len(ids) + 1):
                if end < len(ids) and ids[end] != comma:
                    continue
                clause = torch.tensor(ids[start:end], dtype=torch.long)
                if len(clause):
                    out[b, start:end, : self.dim // 2] = self.word_vectors[clause]
                    out[b, start:end, self.dim // 2 :] = self.context_vectors[clause].mean(0)
                if end < len(ids):
                    out[b, end, : self.dim // 2] = self.word_vectors[comma]
                start = end + 1
        return out


# ---------------------------------------------------------------- sampling (numpy, per scene)


def _bound(shape: str, size: float) -> float:
    """Radius of a circle around the shape (for bounds and overlap tests)."""
    return size * {"square": 1.42, "disc": 1.0, "triangle": 1.2, "ring": 1.0, "bar": 1.7}[shape]


def _bounce(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions into ``[lo, hi]`` by reflection at the walls."""
    span = hi - lo
    m = np.mod(z - lo, 2 * span)
    return lo + span - np.abs(m - span)


def _pick(rng, items, p=None):
    return items[rng.choice(len(items), p=p)]


def _sample_object(rng, frames, aspect, camera, *, motion=None, through=None) -> ObjectAttrs:
    shape = _pick(rng, SHAPES)
    size = float(rng.uniform(0.08, 0.13))
    r = _bound(shape, size)
    ramp = np.arange(frames) / max(frames - 1, 1)
    if motion is None:
        motion = _pick(rng, MOTIONS, p=[0.4, 0.25, 0.2, 0.15])
    if motion == "rotates" and shape not in ROTATABLE:
        shape = _pick(rng, ROTATABLE)
        r = _bound(shape, size)
    angle0 = float(rng.uniform(0, 2 * math.pi)) if shape in ROTATABLE else 0.0
    angles = np.full(frames, angle0)
    direction = None
    lo, hi = np.array([r, r]), np.array([aspect - r, 1 - r])
    if motion == "rotates":
        direction = _pick(rng, tuple(SPINS))
        angles = angle0 + SPINS[direction] * rng.uniform(0.5, 1.0) * math.pi * ramp
    if motion in ("moves", "bounces"):
        direction = _pick(rng, tuple(DIRECTIONS))
    d = np.array(DIRECTIONS.get(direction, (0.0, 0.0)))
    if motion == "bounces":
        # screen space: start so that the wall ahead is hit inside the clip
        travel = rng.uniform(0.7, 1.1)
        axis = int(d[1] != 0)
        start = rng.uniform(lo, hi)
        gap = rng.uniform(0.2, 0.6) * travel
        start[axis] = hi[axis] - gap if d[axis] > 0 else lo[axis] + gap
        start[axis] = np.clip(start[axis], lo[axis], hi[axis])
        raw = start[None] + d[None] * travel * ramp[:, None]
        pos = raw.copy()
        pos[:, axis] = _bounce(raw[:, axis], lo[axis], hi[axis])
    else:
        travel = rng.uniform(0.3, 0.5) if motion == "moves" else 0.0
        path = d[None] * travel * ramp[:, None] - camera  # screen displacement from the start
        if through is not None:  # pass over `through` (a screen trajectory) at mid-clip
            mid = frames // 2
            start = through[mid] - path[mid] + rng.uniform(-0.3, 0.3, 2) * size * np.abs(d[::-1])
        else:
            a, z = lo - path.min(0), hi - path.max(0)
            start = a + rng.random(2) * (z - a)  # an empty range is rejected by the caller
        pos = start[None] + path
    return ObjectAttrs(
        shape=shape,
        colour=_pick(rng, tuple(COLOURS)),
        texture=_pick(rng, TEXTURES),
        motion=motion,
        direction=direction,
        size=size,
        period=float(rng.uniform(0.07, 0.11)),
        front=through is not None,
        positions=pos,
        angles=np.asarray(angles, dtype=np.float64),
    )


def _inside(o: ObjectAttrs, aspect: float) -> bool:
    r = _bound(o.shape, o.size) - 1e-9
    lo, hi = o.positions.min(0), o.positions.max(0)
    return bool(lo[0] >= r and lo[1] >= r and hi[0] <= aspect - r and hi[1] <= 1 - r)


def _apart(a: ObjectAttrs, b: ObjectAttrs) -> bool:
    gap = np.linalg.norm(a.positions - b.positions, axis=1).min()
    return bool(gap > 1.05 * (_bound(a.shape, a.size) + _bound(b.shape, b.size)))


def sample_scene(seed: int, index: int = 0, frames: int = FRAMES, aspect: float = 1.0, detail: bool = False) -> Scene:
    """The scene ``index`` of ``seed``: independent of batch size and of other indices.

    ``detail``: also draw its random texture fields (:mod:`.detail`; the rest of the scene is the
    same either way).
    """
    rng = np.random.default_rng([seed, index])
    ramp = np.arange(frames) / max(frames - 1, 1)
    background = _pick(rng, BACKGROUNDS)
    bg_motion = _pick(rng, ("still", "scrolls", "pans"), p=[0.25, 0.45, 0.3])
    bg_direction = None if bg_motion == "still" else _pick(rng, tuple(DIRECTIONS))
    d = np.array(DIRECTIONS.get(bg_direction, (0.0, 0.0)))
    shift = d[None] * rng.uniform(0.15, 0.3) * ramp[:, None]
    camera = shift if bg_motion == "pans" else np.zeros((frames, 2))
    bg_offsets = -shift if bg_motion == "pans" else shift
    if bg_motion == "still":
        axis = np.array(_pick(rng, ((1.0, 0.0), (0.0, 1.0), (0.7071, 0.7071))))
    else:
        axis = np.abs(d)
    base = rng.uniform(-0.75, -0.35) + rng.uniform(-0.15, 0.15, 3)
    other = base + rng.choice([-1, 1]) * rng.uniform(0.2, 0.35) + rng.uniform(-0.1, 0.1, 3)
    bg_colours = np.clip(np.stack([base, other]), -1, 1)
    bg_period = float(rng.uniform(0.8, 1.2) if background == "gradient" else rng.uniform(0.2, 0.35))

    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    occlude = count >= 2 and rng.random() < 0.35
    objects: list[ObjectAttrs] = []
    for k in range(count):
        last = k == count - 1
        for _ in range(50):
            if occlude and last:
                behind = objects[int(rng.integers(len(objects)))]
                o = _sample_object(rng, frames, aspect, camera, motion="moves", through=behind.positions)
                others = [p for p in objects if p is not behind]
            else:
                motion = _pick(rng, ("stays", "rotates")) if occlude and k == 0 else None
                o = _sample_object(rng, frames, aspect, camera, motion=motion)
                others = objects
            if _inside(o, aspect) and all(_apart(o, p) for p in others):
                objects.append(o)
                break
    return Scene(
        objects=tuple(objects),
        background=background,
        bg_colours=bg_colours,
        bg_axis=axis / np.linalg.norm(axis),
        bg_period=bg_period,
        bg_motion=bg_motion,
        bg_direction=bg_direction,
        bg_offsets=bg_offsets,
        camera=camera,
        detail=sample_detail(seed, index, len(objects), aspect) if detail else None,
    )


# ---------------------------------------------------------------- rendering (torch, batched)


def scene_params(scenes: list[Scene], frames: int = FRAMES, detail: float = 0.0) -> dict[str, torch.Tensor]:
    """Pack scenes into padded float32/long CPU tensors (``MAX_OBJECTS`` slots) for :func:`render`.

    ``detail > 0``: the scenes' texture fields at that amplitude (scenes drawn with ``detail=True``).
    """
    b, k = len(scenes), MAX_OBJECTS
    p = {
        "active": torch.zeros(b, k),
        "shape": torch.zeros(b, k, dtype=torch.long),
        "texture": torch.zeros(b, k, dtype=torch.long),
        "colour": torch.zeros(b, k, 3),
        "size": torch.full((b, k), 0.1),
        "period": torch.full((b, k), 0.1),
        "pos": torch.zeros(b, k, frames, 2),
        "angle": torch.zeros(b, k, frames),
        "bg_kind": torch.zeros(b, dtype=torch.long),
        "bg_colours": torch.zeros(b, 2, 3),
        "bg_axis": torch.zeros(b, 2),
        "bg_period": torch.zeros(b),
        "bg_offsets": torch.zeros(b, frames, 2),
    }
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            p["active"][i, j] = 1
            p["shape"][i, j] = SHAPES.index(o.shape)
            p["texture"][i, j] = TEXTURES.index(o.texture)
            p["colour"][i, j] = torch.tensor(COLOURS[o.colour])
            p["size"][i, j] = o.size
            p["period"][i, j] = o.period
            p["pos"][i, j] = torch.from_numpy(o.positions)
            p["angle"][i, j] = torch.from_numpy(o.angles)
        p["bg_kind"][i] = BACKGROUNDS.index(s.background)
        p["bg_colours"][i] = torch.from_numpy(s.bg_colours)
        p["bg_axis"][i] = torch.from_numpy(s.bg_axis)
        p["bg_period"][i] = s.bg_period
        p["bg_offsets"][i] = torch.from_numpy(s.bg_offsets)
    if detail > 0:
        missing = [i for i, s in enumerate(scenes) if s.detail is None]
        if missing:
            raise ValueError(f"detail={detail} but scenes {missing[:5]} were sampled without detail fields")
        p.update(detail_params([s.detail for s in scenes], k, detail))
    return p


def _ramp(v: torch.Tensor, px: float) -> torch.Tensor:
    """Anti-aliased step: 0 below -px/2, 1 above +px/2."""
    return (0.5 + v / px).clamp(0, 1)


def _sdf_square(u, v, r):
    return torch.maximum(u.abs(), v.abs()) - r


def _sdf_disc(u, v, r):
    return torch.sqrt(u * u + v * v) - r


def _sdf_triangle(u, v, r):
    c = math.sqrt(3) / 2
    return torch.maximum(torch.maximum(-v, c * u + 0.5 * v), -c * u + 0.5 * v) - 0.6 * r


def _sdf_ring(u, v, r):
    return (torch.sqrt(u * u + v * v) - 0.7 * r).abs() - 0.3 * r


def _sdf_bar(u, v, r):
    return torch.maximum(u.abs() - 1.6 * r, v.abs() - 0.45 * r)


_SDF = (_sdf_square, _sdf_disc, _sdf_triangle, _sdf_ring, _sdf_bar)  # in SHAPES order


def _shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (frame heights, negative inside) of each sample's shape ``(B,)``."""
    sdf = torch.empty_like(u)
    for sid, fn in enumerate(_SDF):
        sel = (shape == sid).nonzero().squeeze(1)
        if len(sel):
            sdf[sel] = fn(u[sel], v[sel], r[sel])
    return sdf


def render(
    params: dict[str, torch.Tensor], height: int = HEIGHT, width: int = WIDTH, masks: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Render packed scenes to videos ``(batch, frames, 3, height, width)`` in [-1, 1].

    Runs on the device of ``params``. With ``masks=True`` also returns each slot's visible
    coverage ``(batch, MAX_OBJECTS, frames, height, width)`` after occlusion.
    """
    dev = params["pos"].device
    b, k, t, _ = params["pos"].shape
    px = 1.0 / height
    y = ((torch.arange(height, device=dev) + 0.5) * px).view(1, 1, height, 1)
    x = ((torch.arange(width, device=dev) + 0.5) * px).view(1, 1, 1, width)
    tau = 2 * math.pi

    # background (B, T, H, W) blend factor between its two colours
    off = params["bg_offsets"][..., None, None]  # (B, T, 2, 1, 1)
    bx, by = x - off[:, :, 0], y - off[:, :, 1]
    ax = params["bg_axis"].view(b, 1, 2, 1, 1)
    per = params["bg_period"].view(b, 1, 1, 1)
    phase = tau * (bx * ax[:, :, 0] + by * ax[:, :, 1]) / per
    edge = px * tau / per  # the pattern's phase change over one pixel
    kind = params["bg_kind"].view(b, 1, 1, 1)
    checker = torch.sin(tau * bx / per) * torch.sin(tau * by / per)
    mix = torch.where(
        kind == 0,
        0.5 + 0.5 * torch.cos(phase),
        torch.where(kind == 1, _ramp(torch.sin(phase), edge), _ramp(checker, edge)),
    )
    c0, c1 = params["bg_colours"][:, 0].view(b, 1, 3, 1, 1), params["bg_colours"][:, 1].view(b, 1, 3, 1, 1)
    video = c0 + (c1 - c0) * mix.unsqueeze(2)
    textured = "detail" in params
    if textured:
        video = video + background_detail(params, bx, by, width / height)

    cover = []
    for j in range(k):
        pos = params["pos"][:, j][..., None, None]  # (B, T, 2, 1, 1)
        ang = params["angle"][:, j].view(b, t, 1, 1)
        dx, dy = x - pos[:, :, 0], y - pos[:, :, 1]
        cs, sn = torch.cos(ang), torch.sin(ang)
        u, v = cs * dx + sn * dy, -sn * dx + cs * dy
        r = params["size"][:, j].view(b, 1, 1, 1)
        sdf = _shape_sdf(params["shape"][:, j], u, v, r)
        m = _ramp(-sdf, px) * params["active"][:, j].view(b, 1, 1, 1)
        p = params["period"][:, j].view(b, 1, 1, 1)
        tex = params["texture"][:, j].view(b, 1, 1, 1)
        e = px * tau / p
        wave = torch.sin(tau * u / p) * torch.where(tex == 2, torch.sin(tau * v / p), 1.0)
        shade = torch.where(tex == 0, 1.0, _ramp(wave, e))
        bright = params["colour"][:, j].view(b, 1, 3, 1, 1)
        dark = -1 + 0.45 * (bright + 1)
        m3 = m.unsqueeze(2)
        # over-composite: video * (1 - m) + (dark + (bright - dark) * shade) * m
        video = video.mul_(1 - m3).addcmul_(dark, m3).addcmul_(bright - dark, (shade * m).unsqueeze(2))
        if textured:
            video = video.addcmul_(object_detail(params, j, u, v, r), m3)
        if masks:
            cover = [c * (1 - m) for c in cover] + [m]
    video = video.clamp(-1, 1)
    if masks:
        return video, torch.stack(cover, 1)
    return video


# ---------------------------------------------------------------- batches and datasets


@dataclass
class Batch:
    """Rendered scenes: their videos, captions and the scene descriptions they came from."""

    videos: torch.Tensor  # (n, frames, 3, H, W) in [-1, 1]
    captions: list[str]
    scenes: list[Scene]


def make_batch(
    seed: int,
    n: int,
    start: int = 0,
    frames: int = FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
    device: str | torch.device = "cpu",
    detail: float = 0.0,
) -> Batch:
    """Scenes ``start .. start+n-1`` of ``seed``, rendered on ``device`` (``detail``: texture amplitude)."""
    scenes = [sample_scene(seed, start + i, frames, width / height, detail > 0) for i in range(n)]
    params = {k: v.to(device) for k, v in scene_params(scenes, frames, detail).items()}
    return Batch(render(params, height, width), [s.caption for s in scenes], scenes)


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is ``(video (T, 3, H, W), caption)`` of scene ``i`` of ``seed``."""

    def __init__(
        self, seed: int, length: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, detail: float = 0.0
    ):
        self.seed, self.length = seed, length
        self.frames, self.height, self.width, self.detail = frames, height, width, detail

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        b = make_batch(self.seed, 1, i, self.frames, self.height, self.width, detail=self.detail)
        return b.videos[0], b.captions[0]


class SceneStream(torch.utils.data.IterableDataset):
    """Endless batches of packed scene parameters and caption embeddings (CPU side of training).

    Batch ``i`` holds scenes ``i*batch_size ..`` of ``seed``; with several DataLoader workers,
    worker ``w`` makes batches ``w, w+workers, ..`` and the loader interleaves them in order, so
    the stream is the same for any worker count. Render the parameters with :func:`render` on the
    training device.
    """

    def __init__(
        self,
        seed: int,
        batch_size: int,
        vocab: Vocabulary,
        frames: int = FRAMES,
        aspect: float = 1.0,
        first: int = 0,
        detail: float = 0.0,
    ):
        self.seed, self.batch_size, self.vocab = seed, batch_size, vocab
        self.frames, self.aspect, self.first, self.detail = frames, aspect, first, detail

    def batch(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
        n = self.batch_size
        scenes = [sample_scene(self.seed, i * n + j, self.frames, self.aspect, self.detail > 0) for j in range(n)]
        captions = [s.caption for s in scenes]
        return scene_params(scenes, self.frames, self.detail), self.vocab.embed(captions), captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        i = self.first + w
        while True:
            yield self.batch(i)
            i += nw
