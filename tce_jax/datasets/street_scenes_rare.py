"""The rare-object street scenes: `generate_rare_scene(split_seed, index)` draws one example.

Each scene is the `street_scenes` scene of the same (split, index), with a few rare objects added
in depth order: a wall along one sidewalk, a box truck, a city bus, a tram (Cityscapes' ``train``
is mostly trams) and a motorcycle, each present in a few percent of the scenes (`PRESENCE`) and
then near enough to cover a real area. The five classes are appended after the street scenes'
eleven, so the train ids of the frequent classes keep their meaning. The rare objects draw from a
random stream of their own, so a scene without them is byte-identical to the `street_scenes`
scene, and the frequent classes keep their distribution except where a rare object covers them.
"""

from __future__ import annotations

import functools

import numpy as np

from tce_jax.datasets.street_scenes_canvas import Camera, Canvas, Sprite
from tce_jax.datasets.street_scenes_render import (
    _BASE_SEED,
    _CAR_PAINT,
    _CLOTHES,
    _FACADE,
    _HAIR,
    RIDER,
    _rgb,
    _uniform_in_rows,
    generate_scene,
)
from tce_jax.datasets.street_scenes_render import CLASS_NAMES as FREQUENT_CLASS_NAMES

RARE_CLASS_NAMES: tuple[str, ...] = ("wall", "truck", "bus", "train", "motorcycle")
CLASS_NAMES: tuple[str, ...] = FREQUENT_CLASS_NAMES + RARE_CLASS_NAMES
NUM_CLASSES = len(CLASS_NAMES)
WALL, TRUCK, BUS, TRAIN, MOTORCYCLE = range(len(FREQUENT_CLASS_NAMES), NUM_CLASSES)

# The probability that a scene holds each rare object (independent draws): 2-10%, as the rare
# classes of Cityscapes (the tram, its `train`, the rarest).
PRESENCE: dict[int, float] = {WALL: 0.08, TRUCK: 0.06, BUS: 0.05, TRAIN: 0.03, MOTORCYCLE: 0.05}

# Each rare object covers at least this many pixels (of 64x128) where it is present: a
# placement that leaves less in view (behind a near car, say) is drawn again.
MIN_PIXELS = 32
_ATTEMPTS = 20

# The rare objects' random streams: np.random.default_rng([_BASE_SEED, split seed, index, 1])
# says which are present, [..., 1, attempt] where they are and how they look.
_RARE_STREAM = 1

_LANES = (-0.675, -0.225, 0.225, 0.675)  # lane centres, in road half-widths (as the cars')
_BUS_PAINT = np.array(
    [(205, 190, 40), (185, 35, 35), (228, 228, 222), (40, 90, 160), (45, 130, 75)], np.float32
)
_WALL_PAINT = np.array(
    [(160, 158, 150), (120, 118, 112), (140, 82, 62), (175, 165, 140)], np.float32
)


def _side_face(canvas: Canvas, cam: Camera, x, w, z, length, y0, y1, cls, colour) -> None:
    """The side of a box vehicle facing the middle of the view, in perspective (if visible)."""
    if abs(x) <= w / 2:
        return
    xs = x - np.sign(x) * w / 2
    face = ((y0, z), (y1, z), (y1, z + length), (y0, z + length))
    canvas.polygon([cam.project(xs, y, zz) for y, zz in face], cls, colour)


def _side_wheels(canvas: Canvas, cam: Camera, x, w, depths, cls, colour) -> None:
    if abs(x) <= w / 2:
        return
    xs = x - np.sign(x) * w / 2
    for zz in depths:
        r = 0.5 * cam.f / zz
        canvas.ellipse(*cam.project(xs, 0.5, zz), r * 0.45, r, cls, colour)


def _bus(canvas: Canvas, rng, cam: Camera, x: float, z: float) -> None:
    """A city bus seen from behind or in front, with its side face when that is visible."""
    w, h, length = 2.55, rng.uniform(3.0, 3.3), rng.uniform(11.0, 13.0)
    paint = _rgb(rng, _BUS_PAINT[rng.integers(len(_BUS_PAINT))], 10)
    glass = _rgb(rng, (45, 55, 65), 8)
    dark = _rgb(rng, (22, 22, 24), 4)
    _side_face(canvas, cam, x, w, z, length, 0.3, h, BUS, paint * 0.85)
    _side_face(canvas, cam, x + np.sign(x) * 0.02, w, z + 0.4, length - 0.8, 1.25, h - 0.4,
               BUS, glass)  # fmt: skip
    _side_wheels(canvas, cam, x, w, (z + 2.6, z + length - 3.0), BUS, dark)
    bus = Sprite(canvas, cam, x, z)
    u = w / 2
    for a, b in ((-u + 0.1, -u + 0.45), (u - 0.45, u - 0.1)):
        bus.box(a, b, 0.0, 0.5, BUS, dark)
    bus.box(-u, u, 0.3, h, BUS, paint)
    front = rng.random() < 0.5
    bus.box(-u + 0.12, u - 0.12, 1.0 if front else 1.6, h - 0.45, BUS, glass)
    if front:  # the destination display over the windscreen
        bus.box(-u + 0.4, u - 0.4, h - 0.4, h - 0.1, BUS, _rgb(rng, (230, 150, 30), 10))
    lights = (235, 230, 200) if front else (230, 40, 30)
    for a in (-u + 0.1, u - 0.4):
        bus.box(a, a + 0.3, 0.55, 0.75, BUS, _rgb(rng, lights, 10))


def _truck(canvas: Canvas, rng, cam: Camera, x: float, z: float) -> None:
    """A box truck from behind (cargo doors) or in front (cab under the cargo box)."""
    w, h, length = 2.45, rng.uniform(3.2, 3.8), rng.uniform(7.0, 9.0)
    box = _rgb(rng, _FACADE[rng.integers(len(_FACADE))] if rng.random() < 0.4 else (225, 225, 220))
    cab = _rgb(rng, _CAR_PAINT[rng.integers(len(_CAR_PAINT))], 10)
    dark = _rgb(rng, (22, 22, 24), 4)
    glass = _rgb(rng, (45, 55, 65), 8)
    _side_face(canvas, cam, x, w, z, length, 0.35, 1.1, TRUCK, dark)
    _side_face(canvas, cam, x, w, z, length, 1.1, h, TRUCK, box * 0.88)
    _side_wheels(canvas, cam, x, w, (z + 1.5, z + length - 1.8), TRUCK, dark)
    truck = Sprite(canvas, cam, x, z)
    u = w / 2
    for a, b in ((-u + 0.1, -u + 0.5), (u - 0.5, u - 0.1)):
        truck.box(a, b, 0.0, 0.55, TRUCK, dark)
    if rng.random() < 0.4:  # the front: the cab, the cargo box's top above it
        truck.box(-u + 0.1, u - 0.1, 2.7, h, TRUCK, box)
        truck.box(-u, u, 0.35, 2.8, TRUCK, cab)
        truck.box(-u + 0.15, u - 0.15, 1.7, 2.6, TRUCK, glass)
        for a in (-u + 0.1, u - 0.4):
            truck.box(a, a + 0.3, 0.6, 0.8, TRUCK, _rgb(rng, (235, 230, 200), 10))
        return
    truck.box(-u + 0.2, u - 0.2, 0.35, 1.1, TRUCK, dark)
    truck.box(-u, u, 1.1, h, TRUCK, box)
    truck.box(-0.03, 0.03, 1.2, h - 0.1, TRUCK, box * 0.6)  # the seam between the doors
    for a in (-u + 0.1, u - 0.35):
        truck.box(a, a + 0.25, 0.7, 0.9, TRUCK, _rgb(rng, (230, 40, 30), 10))


def _tram(canvas: Canvas, rng, cam: Camera, x: float, z: float, z_end: float) -> None:
    """A tram in the middle of the street: a long two-tone body, windows, a pantograph."""
    w, h = 2.4, rng.uniform(3.2, 3.5)
    length = min(rng.uniform(25.0, 35.0), z_end - z - 2.0)
    body = _rgb(rng, _BUS_PAINT[rng.integers(len(_BUS_PAINT))], 10)
    skirt = _rgb(rng, (70, 70, 75), 10)
    glass = _rgb(rng, (45, 55, 65), 8)
    grey = _rgb(rng, (60, 60, 60), 8)
    _side_face(canvas, cam, x, w, z, length, 0.25, 1.0, TRAIN, skirt * 0.85)
    _side_face(canvas, cam, x, w, z, length, 1.0, h, TRAIN, body * 0.85)
    _side_face(canvas, cam, x + np.sign(x) * 0.02, w, z + 0.6, length - 1.2, 1.3, h - 0.5,
               TRAIN, glass)  # fmt: skip
    tram = Sprite(canvas, cam, x, z)
    u = w / 2
    tram.box(-u, u, 0.25, 1.0, TRAIN, skirt)
    tram.box(-u, u, 1.0, h, TRAIN, body)
    tram.box(-u + 0.15, u - 0.15, 1.35, h - 0.45, TRAIN, glass)
    tram.box(-u + 0.5, u - 0.5, h - 0.4, h - 0.15, TRAIN, _rgb(rng, (230, 150, 30), 10))
    # The pantograph: a folded arm up to a collector bar.
    tram.segment((-0.3, h), (0.3, h + 0.6), 0.04, TRAIN, grey)
    tram.segment((0.3, h + 0.6), (-0.1, h + 1.2), 0.04, TRAIN, grey)
    tram.box(-0.7, 0.7, h + 1.15, h + 1.25, TRAIN, grey)


def _motorcycle(sprite: Sprite, rng, *, view: str, ridden: bool) -> None:
    """A motorcycle from the 'back' or the 'side', with its rider (helmeted) if ``ridden``."""
    paint = _rgb(rng, _CAR_PAINT[rng.integers(len(_CAR_PAINT))], 12)
    tyre, metal = _rgb(rng, (25, 25, 25), 6), _rgb(rng, (110, 110, 115), 10)
    shirt = _rgb(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 12)
    trousers = _rgb(rng, _CLOTHES[rng.integers(len(_CLOTHES))] * 0.7, 10)
    helmet = _rgb(rng, _HAIR[rng.integers(len(_HAIR))] if rng.random() < 0.5 else (220, 220, 220))
    if view == "back":
        sprite.box(-0.08, 0.08, 0.0, 0.6, MOTORCYCLE, tyre)
        sprite.box(-0.24, 0.24, 0.45, 0.9, MOTORCYCLE, paint)
        sprite.box(-0.1, 0.1, 0.75, 0.85, MOTORCYCLE, _rgb(rng, (230, 40, 30), 10))
        sprite.box(-0.4, 0.4, 1.0, 1.06, MOTORCYCLE, metal)
        if ridden:
            for a, b in ((-0.3, -0.12), (0.12, 0.3)):
                sprite.box(a, b, 0.5, 0.95, RIDER, trousers)
            sprite.box(-0.22, 0.22, 0.9, 1.5, RIDER, shirt)
            sprite.ellipse((0.0, 1.63), 0.15, 0.16, RIDER, helmet)
        return
    d = 1.0 if rng.random() < 0.5 else -1.0
    for hub in ((-0.7 * d, 0.32), (0.7 * d, 0.32)):
        sprite.ring(hub, 0.25, 0.07, MOTORCYCLE, tyre)
        sprite.ellipse(hub, 0.08, 0.08, MOTORCYCLE, metal)
    sprite.polygon([(-0.45 * d, 0.4), (0.35 * d, 0.4), (0.5 * d, 0.75), (-0.35 * d, 0.8)],
                   MOTORCYCLE, metal * 0.7)  # fmt: skip  # the engine
    sprite.ellipse((0.2 * d, 0.86), 0.32, 0.13, MOTORCYCLE, paint)  # the tank
    sprite.segment((-0.75 * d, 0.85), (-0.1 * d, 0.9), 0.06, MOTORCYCLE, tyre)  # the seat
    sprite.segment((0.7 * d, 0.32), (0.5 * d, 1.05), 0.04, MOTORCYCLE, metal)  # the fork
    if ridden:
        hip, knee, foot = (-0.3 * d, 0.98), (0.15 * d, 0.85), (0.0, 0.42)
        sprite.segment(hip, knee, 0.08, RIDER, trousers)
        sprite.segment(knee, foot, 0.065, RIDER, trousers)
        shoulder = (0.0, 1.5)
        sprite.segment(hip, shoulder, 0.15, RIDER, shirt)
        sprite.segment(shoulder, (0.5 * d, 1.05), 0.045, RIDER, shirt)
        sprite.ellipse((0.1 * d, 1.66), 0.15, 0.16, RIDER, helmet)


def _wall(canvas: Canvas, rng, cam: Camera, x: float, z0: float, z1: float) -> None:
    """A wall along the sidewalk's outer edge: concrete, stone or brick panels under a cap."""
    h = rng.uniform(1.0, 2.6)
    colour = _rgb(rng, _WALL_PAINT[rng.integers(len(_WALL_PAINT))], 10)
    edges = np.arange(z0, z1, rng.uniform(2.0, 3.5)).tolist() + [z1]
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        shade = np.float32(1.04 if k % 2 else 0.96)
        face = ((0.0, a), (h, a), (h, b), (0.0, b))
        canvas.polygon([cam.project(x, y, zz) for y, zz in face], WALL, colour * shade)
    cap = ((h - 0.15, z0), (h, z0), (h, z1), (h - 0.15, z1))
    canvas.polygon([cam.project(x, y, zz) for y, zz in cap], WALL, colour * np.float32(1.15))


def _rare_things(rng: np.random.Generator, present, canvas: Canvas, cam: Camera, street, z_near):
    """The rare objects ``present`` of one scene, as ``(depth, draw)`` pairs (`generate_scene`)."""
    xc, wr, x_left, x_right, z_end = street
    things = []

    def depth(lo: float, hi: float) -> float:  # near enough to cover a real area
        return _uniform_in_rows(rng, max(lo, z_near), hi)

    def lane() -> float:
        return xc + _LANES[rng.integers(len(_LANES))] * wr

    if WALL in present:  # painted before every thing: they all stand nearer the road than it
        sgn = -1.0 if rng.random() < 0.5 else 1.0
        x = (x_left if sgn < 0 else x_right) - sgn * 0.15
        z0 = depth(3.0, 20.0)
        z1 = min(z0 + rng.uniform(10.0, 30.0), z_end - 1.0)
        things.append((z_end, functools.partial(_wall, canvas, rng, cam, x, z0, z1)))
    for cls, draw, hi in ((TRUCK, _truck, 25.0), (BUS, _bus, 28.0)):
        if cls in present:
            x, z = lane(), depth(6.0, hi)
            things.append((z, functools.partial(draw, canvas, rng, cam, x, z)))
    if TRAIN in present:  # on tracks in the middle of the street
        x, z = xc + rng.uniform(-0.5, 0.5), depth(8.0, 35.0)
        things.append((z, functools.partial(_tram, canvas, rng, cam, x, z, z_end)))
    if MOTORCYCLE in present:  # ridden in a lane, or parked at the curb
        ridden = rng.random() < 0.7
        curb = xc + (wr + rng.uniform(0.4, 1.2)) * (-1.0 if rng.random() < 0.5 else 1.0)
        x, z = (lane() if ridden else curb), depth(3.0, 12.0)
        view = "back" if ridden and rng.random() < 0.5 else "side"
        sprite = Sprite(canvas, cam, x, z)
        things.append((z, functools.partial(_motorcycle, sprite, rng, view=view, ridden=ridden)))
    return things


def generate_rare_scene(split_seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The `street_scenes` scene of (split_seed, index) with its rare objects, deterministically:
    ``(image, label)`` as `street_scenes_render.generate_scene`, labels in ``0..NUM_CLASSES-1``
    or 255. Each rare object is present with its `PRESENCE` probability and, when present,
    covers at least `MIN_PIXELS` pixels."""
    seed = [_BASE_SEED, split_seed, index, _RARE_STREAM]
    draws = np.random.default_rng(seed).random(len(PRESENCE))
    present = [cls for cls, u in zip(PRESENCE, draws, strict=True) if u < PRESENCE[cls]]
    for attempt in range(_ATTEMPTS):
        things = functools.partial(_rare_things, np.random.default_rng([*seed, attempt]), present)
        image, label = generate_scene(split_seed, index, things)
        pixels = np.bincount(label.ravel(), minlength=256)
        if all(pixels[cls] >= MIN_PIXELS for cls in present):
            return image, label
    # No placement kept every rare object in view (none of the 1400 scenes of the three splits):
    # the scene without them.
    return generate_scene(split_seed, index)
