"""The street scenes' renderer: `generate_scene(split_seed, index)` draws one example.

The dataset (classes, what makes it a fair test, how a scene is made) is described in
`tce_jax.datasets.street_scenes` and docs/street_scenes.md; the drawing primitives are in
`street_scenes_canvas`. Changing anything here changes the dataset: tests pin its bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from tce_jax.datasets.street_scenes_canvas import HEIGHT, WIDTH, Camera, Canvas, Sprite

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "vegetation",
    "sky",
    "car",
    "pole",
    "traffic_sign",
    "person",
    "rider",
    "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255

(ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE, TRAFFIC_SIGN, PERSON, RIDER, BICYCLE) = (
    range(NUM_CLASSES)
)

# Every example is drawn from np.random.default_rng([_BASE_SEED, split seed, index]).
_BASE_SEED = 20_211_124
SPLIT_SEEDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

# Per-pixel texture amplitude (in 0..255 units) for each label value, applied before the blur.
_TEXTURE = np.full(256, 8.0, np.float32)
_TEXTURE[:NUM_CLASSES] = (10, 8, 8, 26, 3, 6, 5, 5, 8, 8, 5)

# Shared by person and rider: the look-alike pair.
_SKIN = np.array([(224, 172, 140), (198, 134, 96), (141, 85, 54), (90, 56, 37)], np.float32)
_HAIR = np.array([(30, 25, 20), (70, 45, 25), (150, 110, 60), (110, 110, 110)], np.float32)
_CLOTHES = np.array(
    [
        (30, 30, 35), (200, 200, 195), (40, 60, 120), (120, 30, 35), (60, 90, 60),
        (150, 120, 80), (90, 90, 95), (200, 160, 40), (60, 100, 170), (160, 70, 120),
    ],
    np.float32,
)  # fmt: skip
_CAR_PAINT = np.array(
    [
        (20, 20, 22), (210, 210, 210), (150, 150, 155), (100, 100, 105), (150, 25, 25),
        (25, 45, 110), (30, 80, 50), (200, 180, 140), (60, 40, 30), (220, 200, 60),
    ],
    np.float32,
)  # fmt: skip
_FACADE = np.array(
    [(125, 125, 125), (175, 160, 130), (145, 85, 65), (195, 195, 188), (105, 100, 95)],
    np.float32,
)
_SIGN_FACE = np.array([(200, 30, 30), (30, 70, 170), (225, 190, 30), (235, 235, 235)], np.float32)


def _rgb(rng: np.random.Generator, base, jitter: float = 12.0) -> np.ndarray:
    """A colour near ``base`` (RGB, 0..255): brightness and per-channel jitter."""
    base = np.asarray(base, np.float32)
    scale = np.float32(rng.uniform(0.85, 1.15))
    return base * scale + rng.uniform(-jitter, jitter, 3).astype(np.float32)


def _count(rng: np.random.Generator, mean: float, n_max: int) -> int:
    """Binomial(n_max, mean / n_max) from uniforms only (no libm calls: bit-identical)."""
    return int((rng.random(n_max) < mean / n_max).sum())


def _uniform_in_rows(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A depth in [lo, hi] whose foot point is uniform in image rows (1/depth is uniform).

    Arithmetic only (no libm), so it is bit-identical across machines.
    """
    return 1.0 / (1.0 / hi + rng.random() * (1.0 / lo - 1.0 / hi))


def _piecewise(rng, length: float, seg_lo: float, seg_hi: float):
    """Random breakpoints 0 < b1 < b2 < ... covering [0, length]."""
    edges = [0.0]
    while edges[-1] < length:
        edges.append(edges[-1] + rng.uniform(seg_lo, seg_hi))
    return np.asarray(edges)


def _jittered(rng: np.random.Generator, bases: np.ndarray, n: int, jitter: float) -> np.ndarray:
    """``n`` colours drawn from the rows of ``bases``, each jittered like ``_rgb``: ``[n, 3]``."""
    picked = bases[rng.integers(len(bases), size=n)]
    scale = rng.uniform(0.85, 1.15, (n, 1)).astype(np.float32)
    return picked * scale + rng.uniform(-jitter, jitter, (n, 3)).astype(np.float32)


def _facade(rng: np.random.Generator, length: float):
    """A facade made of segments (buildings of random heights, or park vegetation).

    Returns ``(hit, shade)``: ``hit(along, h)`` says where a ray meeting the facade plane
    ``along`` metres from its start at height ``h`` (m) hits it; ``shade(along, h)`` gives
    the labels and colours of such hits (computed only for the pixels that end up visible).
    """
    edges = _piecewise(rng, length, 5.0, 22.0)
    n = len(edges)
    park = rng.random(n) < 0.15
    heights = np.where(park, rng.uniform(4.0, 9.0, n), rng.uniform(6.0, 24.0, n))
    floor_h = rng.uniform(2.8, 3.6, n)
    bay = rng.uniform(2.2, 4.0, n)
    colours = _jittered(rng, _FACADE, n, 10.0)
    windows = _jittered(rng, np.array([(55, 65, 80)], np.float32), n, 12.0)
    green = _rgb(rng, (65, 110, 45), 12)
    # Park tops are bumpy: piecewise-linear noise along the facade.
    bump_x = np.arange(0.0, length + 1.5, 1.5)
    bump_y = rng.uniform(0.55, 1.35, len(bump_x))

    def segment(along):
        return np.clip(np.searchsorted(edges, along) - 1, 0, n - 1)

    def hit(along, h):
        idx = segment(along)
        top = np.where(park[idx], heights[idx] * np.interp(along, bump_x, bump_y), heights[idx])
        return (h >= 0) & (h <= top)

    def shade(along, h):
        idx = segment(along)
        u = np.mod(along / bay[idx], 1.0)
        is_window = ~park[idx] & (np.mod(h / floor_h[idx], 1.0) > 0.35) & (u > 0.3) & (u < 0.75)
        labels = np.where(park[idx], VEGETATION, BUILDING).astype(np.uint8)
        rgb = np.where(is_window[:, None], windows[idx], colours[idx])
        return labels, np.where(park[idx][:, None], green, rgb)

    return hit, shade


def _render_background(rng: np.random.Generator, cam: Camera, canvas: Canvas, street) -> None:
    """Sky, facades and ground: per pixel, the nearest surface hit by the camera ray."""
    xc, wr, x_left, x_right, z_end = street
    ys, xs = Canvas.ys.ravel(), Canvas.xs.ravel()
    dy, dx = ys - cam.vy, xs - cam.vx
    inf = np.float64(np.inf)

    sky_top = _rgb(rng, (95, 150, 215), 15)
    sky_bottom = _rgb(rng, (185, 205, 230), 12)
    if rng.random() < 0.3:  # overcast: a grey sky, close to the facade greys
        grey = np.float32(rng.uniform(160, 215))
        sky_top = sky_bottom = grey + rng.uniform(-6, 6, 3).astype(np.float32)
    t = np.clip(Canvas.ys / max(cam.vy, 1.0), 0.0, 1.0)[..., None].astype(np.float32)
    canvas.image[:] = sky_top * (1 - t) + sky_bottom * t

    # Depth of each candidate surface along each pixel's ray (inf: not hit). Facades are the
    # planes X = x_left (left of the vanishing point), X = x_right and Z = z_end; `along` is the
    # coordinate along each facade (Z for the sides, X + 200 m for the end of the street).
    with np.errstate(divide="ignore", invalid="ignore"):
        z_ground = np.where(dy > 0, cam.f * cam.hc / dy, inf)
        z_sides = (
            np.where(dx < 0, cam.f * x_left / dx, inf),
            np.where(dx > 0, cam.f * x_right / dx, inf),
        )
    z_back = np.full_like(dy, z_end)
    facades = []  # (depth, along, height, shade)
    for z_side in z_sides:
        hit, shade = _facade(rng, z_end)
        ok = np.isfinite(z_side) & (z_side <= z_end)
        depth = np.full_like(dy, inf)
        h = cam.hc - dy[ok] * z_side[ok] / cam.f
        depth[ok] = np.where(hit(z_side[ok], h), z_side[ok], inf)
        facades.append((depth, z_side, shade))
    hit, shade = _facade(rng, 400.0)
    along_back = dx * z_end / cam.f + 200.0
    depth = np.where(hit(along_back, cam.hc - dy * z_end / cam.f), z_back, inf)
    facades.append((depth, along_back, shade))

    depths = np.stack([z_ground] + [f[0] for f in facades])
    nearest = np.argmin(depths, axis=0)
    visible = np.isfinite(depths.min(axis=0))
    label = canvas.label.reshape(-1)
    image = canvas.image.reshape(-1, 3)

    for k, (_, along, shade) in enumerate(facades, start=1):
        m = visible & (nearest == k)
        z = depths[k, m]
        label[m], image[m] = shade(along[m], cam.hc - dy[m] * z / cam.f)

    # Ground: road (with markings), sidewalks with tiles and a light curb.
    road_c = _rgb(rng, (88, 86, 92), 8)
    side_c = _rgb(rng, (150, 142, 132), 12)
    paint_c = _rgb(rng, (215, 215, 205) if rng.random() < 0.7 else (215, 185, 60), 8)
    centre_line = rng.random() < 0.8
    zebra = rng.uniform(6.0, 20.0) if rng.random() < 0.25 else None
    m = visible & (nearest == 0)
    z = z_ground[m]
    rel = dx[m] * cam.hc / dy[m] - xc  # lateral position relative to the road centre, m
    dist = np.abs(rel)
    is_road = dist <= wr
    marking = (dist > wr - 0.25) & (dist < wr - 0.12)
    if centre_line:
        marking |= (dist < 0.08) & (np.mod(z / 6.0, 1.0) < 0.45)
    if zebra is not None:
        marking |= (z > zebra) & (z < zebra + 3.0) & (np.mod(rel / 0.9, 1.0) < 0.5)
    marking &= is_road
    tiles = (np.mod(rel / 0.6, 1.0) < 0.12) | (np.mod(z / 0.6, 1.0) < 0.12)
    curb = ~is_road & (dist < wr + 0.2)
    rgb = np.where(is_road[:, None], road_c, side_c * np.where(tiles, 0.88, 1.0)[:, None])
    rgb = np.where(marking[:, None], paint_c, rgb)
    rgb = np.where(curb[:, None], side_c * 1.15, rgb)
    label[m] = np.where(is_road, ROAD, SIDEWALK)
    image[m] = rgb


def _pedestrian(sprite: Sprite, rng, colours) -> None:
    """A person walking (side view, legs apart) or standing (facing or away from the camera)."""
    skin, hair, shirt, trousers = colours
    h = rng.uniform(1.6, 1.9)
    side = rng.random() < 0.5
    d = 1.0 if rng.random() < 0.5 else -1.0
    hip = 0.5 * h
    if side:
        stride = rng.uniform(0.05, 0.16) * h
        for foot in (-stride, stride):
            sprite.segment((0, hip), (foot, 0.02 * h), 0.045 * h, PERSON, trousers)
        sprite.box(-0.075 * h, 0.075 * h, hip - 0.02 * h, 0.84 * h, PERSON, shirt)
        sprite.segment((0, 0.8 * h), (d * stride * 0.8, 0.52 * h), 0.03 * h, PERSON, shirt)
    else:
        for a, b in ((-0.11, -0.015), (0.015, 0.11)):
            sprite.box(a * h, b * h, 0.0, hip, PERSON, trousers)
        sprite.box(-0.13 * h, 0.13 * h, hip - 0.02 * h, 0.84 * h, PERSON, shirt)
        for a, b in ((-0.185, -0.135), (0.135, 0.185)):  # arms
            sprite.box(a * h, b * h, 0.47 * h, 0.82 * h, PERSON, shirt)
    head = skin if (side or rng.random() < 0.5) else hair
    sprite.ellipse((0, 0.925 * h), 0.065 * h, 0.075 * h, PERSON, head)


def _cyclist(sprite: Sprite, rng, colours, *, view: str, ridden: bool = True) -> None:
    """A bicycle seen from the 'back' (riding away) or the 'side', with its rider if ``ridden``.

    The rider has the pedestrians' palette and body parts: it differs by context only (the
    bicycle, a leaning torso, bent legs that do not reach the ground).
    """
    skin, hair, shirt, trousers = colours
    k = rng.uniform(1.6, 1.9) / 1.75  # the rider's size; the geometry below is for 1.75 m
    frame = _rgb(rng, _CAR_PAINT[rng.integers(len(_CAR_PAINT))], 15)
    tyre = _rgb(rng, (25, 25, 25), 6)
    if view == "back":  # the rear wheel edge-on under a hunched rider, handlebar ends out
        sprite.box(-0.03 * k, 0.03 * k, 0.0, 0.7 * k, BICYCLE, tyre)
        sprite.box(-0.3 * k, 0.3 * k, 1.0 * k, 1.06 * k, BICYCLE, frame)
        pedal = rng.uniform(0.2, 0.45)
        for a, b, low in ((-0.17, -0.05, pedal), (0.05, 0.17, 0.65 - pedal)):
            sprite.box(a * k, b * k, low * k, 0.95 * k, RIDER, trousers)
        sprite.box(-0.2 * k, 0.2 * k, 0.93 * k, 1.45 * k, RIDER, shirt)
        for sgn in (-1.0, 1.0):
            sprite.segment((sgn * 0.18 * k, 1.4 * k), (sgn * 0.27 * k, 1.04 * k), 0.04 * k,
                           RIDER, shirt)  # fmt: skip
        sprite.ellipse((0, 1.56 * k), 0.11 * k, 0.125 * k, RIDER, hair)
        return

    d = k if rng.random() < 0.5 else -k  # heading right or left
    rear, front = (-0.5 * d, 0.34 * k), (0.55 * d, 0.34 * k)
    crank, seat = (0.0, 0.3 * k), (-0.15 * d, 0.9 * k)
    head_tube, bar = (0.42 * d, 0.85 * k), (0.45 * d, 1.0 * k)
    for hub in (rear, front):
        sprite.ring(hub, 0.33 * k, 0.03 * k, BICYCLE, tyre)
    for a, b in ((rear, crank), (crank, seat), (seat, rear), (seat, head_tube),
                 (head_tube, crank), (head_tube, front), (head_tube, bar)):  # fmt: skip
        sprite.segment(a, b, 0.02 * k, BICYCLE, frame)
    if not ridden:
        return
    hip, shoulder = (-0.12 * d, 0.98 * k), (0.2 * d, 1.48 * k)
    phase = rng.uniform(-0.12, 0.12)
    for knee, foot in (((0.1 * d, 0.7 * k), (phase * d, 0.2 * k)),
                       ((-0.02 * d, 0.62 * k), (-phase * d, 0.4 * k))):  # fmt: skip
        sprite.segment(hip, knee, 0.065 * k, RIDER, trousers)
        sprite.segment(knee, foot, 0.055 * k, RIDER, trousers)
    sprite.segment(hip, shoulder, 0.14 * k, RIDER, shirt)
    sprite.segment(shoulder, bar, 0.04 * k, RIDER, shirt)
    sprite.ellipse((0.28 * d, 1.64 * k), 0.11 * k, 0.125 * k, RIDER, skin)


def _car(canvas: Canvas, rng, cam: Camera, x: float, z: float) -> None:
    """A car seen from behind or in front, with its side face when that is visible."""
    w, hb, h, length = rng.uniform(1.7, 1.9), rng.uniform(0.85, 1.0), rng.uniform(1.4, 1.6), 4.3
    paint = _rgb(rng, _CAR_PAINT[rng.integers(len(_CAR_PAINT))], 10)
    glass = _rgb(rng, (45, 55, 65), 8)
    dark = _rgb(rng, (22, 22, 24), 4)
    if abs(x) > w / 2:  # the side facing the middle of the view, drawn in perspective
        sgn = np.sign(x)
        xs = x - sgn * w / 2
        body = ((0.25, z), (hb, z), (hb, z + length), (0.25, z + length))
        canvas.polygon([cam.project(xs, y, zz) for y, zz in body], CAR, paint * 0.85)
        cabin = ((0.0, hb, z + 0.5), (0.2, h, z + 1.2), (0.2, h, z + 3.0), (0.0, hb, z + 3.8))
        canvas.polygon([cam.project(xs + sgn * du, y, zz) for du, y, zz in cabin], CAR, glass)
        for zz in (z + 0.7, z + length - 0.7):  # wheels
            r = 0.32 * cam.f / zz
            canvas.ellipse(*cam.project(xs, 0.32, zz), r * 0.45, r, CAR, dark)
    car = Sprite(canvas, cam, x, z)
    u = w / 2
    for a, b in ((-u, -u + 0.3), (u - 0.3, u)):  # wheels
        car.box(a, b, 0.0, 0.4, CAR, dark)
    car.box(-u, u, 0.25, hb, CAR, paint)
    car.polygon([(-u + 0.09, hb), (u - 0.09, hb), (u - 0.27, h), (-u + 0.27, h)], CAR, paint)
    car.polygon([(-u + 0.18, hb + 0.04), (u - 0.18, hb + 0.04), (u - 0.32, h - 0.08),
                 (-u + 0.32, h - 0.08)], CAR, glass)  # fmt: skip
    lights = (230, 40, 30) if rng.random() < 0.6 else (235, 230, 200)  # rear or front
    for a in (-u, u - 0.25):
        car.box(a, a + 0.25, 0.65, 0.8, CAR, _rgb(rng, lights, 10))
    car.box(-0.25, 0.25, 0.38, 0.5, CAR, _rgb(rng, (225, 225, 215), 8))  # number plate


def _pole(sprite: Sprite, rng, *, sign: bool, light: bool, toward: float) -> None:
    """A pole in the greys of the facades; with a lamp arm over the road and/or a sign on top."""
    grey = _rgb(rng, (125, 125, 125) if rng.random() < 0.6 else (85, 90, 85), 18)
    height = rng.uniform(3.5, 5.0) if sign and not light else rng.uniform(6.0, 9.0)
    half = rng.uniform(0.06, 0.11)
    sprite.box(-half, half, 0.0, height, POLE, grey)
    if light:
        reach = toward * rng.uniform(1.2, 2.5)
        sprite.segment((0.0, height), (reach, height), 0.05, POLE, grey)
        sprite.box(reach - 0.25, reach + 0.25, height - 0.12, height, POLE, grey * 1.1)
    if sign:
        size = rng.uniform(0.65, 1.0)
        v = height - rng.uniform(0.2, 1.2)
        face = _rgb(rng, _SIGN_FACE[rng.integers(len(_SIGN_FACE))], 12)
        kind = rng.integers(3)
        if kind == 0:  # round, with a white centre
            sprite.ellipse((0.0, v), size / 2, size / 2, TRAFFIC_SIGN, face)
            sprite.ellipse((0.0, v), size * 0.3, size * 0.3, TRAFFIC_SIGN,
                           _rgb(rng, (230, 230, 230), 8))  # fmt: skip
        elif kind == 1:  # triangle
            tri = [(-size / 2, v - size * 0.4), (size / 2, v - size * 0.4), (0.0, v + size * 0.5)]
            sprite.polygon(tri, TRAFFIC_SIGN, face)
        else:  # rectangle
            sprite.box(-size / 2, size / 2, v - size * 0.4, v + size * 0.4, TRAFFIC_SIGN, face)


def _tree(sprite: Sprite, rng) -> None:
    """A street tree: a trunk as thin as a pole (but vegetation) under a few leafy blobs."""
    trunk_h = rng.uniform(2.0, 3.5)
    sprite.box(-0.12, 0.12, 0.0, trunk_h + 0.5, VEGETATION, _rgb(rng, (95, 80, 65), 12))
    r = rng.uniform(1.4, 2.8)
    leaf = _rgb(rng, (70, 115, 45), 14)
    for _ in range(3):
        centre = (rng.uniform(-0.5, 0.5) * r, trunk_h + r * rng.uniform(0.6, 1.1))
        rx, ry = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.6, 0.9)
        sprite.ellipse(centre, rx, ry, VEGETATION, leaf * np.float32(rng.uniform(0.85, 1.1)))


def _clutter(sprite: Sprite, rng) -> None:
    """Unlabelled street furniture (bins, boxes): the ignore label."""
    w, h = rng.uniform(0.4, 1.0), rng.uniform(0.6, 1.3)
    sprite.box(-w / 2, w / 2, 0.0, h, IGNORE_LABEL, _rgb(rng, rng.uniform(40, 200, 3), 10))


def generate_scene(
    split_seed: int, index: int, extra_things: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one street scene, deterministically.

    Args:
      split_seed: the split's seed (``SPLIT_SEEDS[split]``).
      index: the example's index in the split.
      extra_things: ``extra_things(canvas, cam, street, z_near)`` -> more ``(depth, draw)``
        pairs, painted with the scene's own things in depth order (the rare objects of
        ``street_scenes_rare``); ``street`` is ``(xc, wr, x_left, x_right, z_end)``. It must
        draw from its own random stream: the scene's own stream, hence every other pixel's
        colour and label, stays as without it.

    Returns:
      ``(image, label)``: ``uint8 [HEIGHT, WIDTH, 3]`` RGB and ``uint8 [HEIGHT, WIDTH]`` train ids
      in ``0..NUM_CLASSES-1`` or ``IGNORE_LABEL``. The same arguments give the same bytes on every
      run and machine: the random stream is ``np.random.default_rng([seed, split_seed, index])``
      and rendering uses only IEEE arithmetic (no libm transcendental functions, no float sums).
    """
    rng = np.random.default_rng([_BASE_SEED, split_seed, index])
    canvas = Canvas(SKY)
    cam = Camera(
        f=rng.uniform(55.0, 70.0),
        hc=rng.uniform(1.5, 2.1),
        vx=rng.uniform(50.0, 78.0),
        vy=rng.uniform(20.0, 30.0),
    )
    # The street, in metres: road centre xc and half-width wr, facades at x_left and x_right,
    # the end of the street at depth z_end.
    xc, wr = rng.uniform(-1.5, 1.5), rng.uniform(3.5, 6.0)
    x_left, x_right = xc - wr - rng.uniform(1.8, 4.0), xc + wr + rng.uniform(1.8, 4.0)
    z_end = rng.uniform(50.0, 140.0)
    street = (xc, wr, x_left, x_right, z_end)
    _render_background(rng, cam, canvas, street)

    # Things, as (depth, draw) pairs, painted far to near so that near ones occlude.
    z_near = cam.f * cam.hc / (HEIGHT - cam.vy) * 0.8  # feet a little below the bottom row
    things = []

    def place(lo: float, hi: float, x: float) -> tuple[float, Sprite]:
        z = _uniform_in_rows(rng, max(lo, z_near), min(hi, z_end - 5.0))
        return z, Sprite(canvas, cam, x, z)

    def side() -> float:
        return -1.0 if rng.random() < 0.5 else 1.0

    def on_sidewalk(sgn: float, lo: float = 0.1, hi: float = 0.9) -> float:
        curb, wall = xc + sgn * wr, (x_left if sgn < 0 else x_right)
        return curb + (wall - curb) * rng.uniform(lo, hi)

    def person_colours():  # skin, hair, shirt, trousers: shared by pedestrians and riders
        return (
            _rgb(rng, _SKIN[rng.integers(len(_SKIN))], 8),
            _rgb(rng, _HAIR[rng.integers(len(_HAIR))], 8),
            _rgb(rng, _CLOTHES[rng.integers(len(_CLOTHES))], 12),
            _rgb(rng, _CLOTHES[rng.integers(len(_CLOTHES))] * 0.7, 10),
        )

    for _ in range(_count(rng, 2.5, 6)):  # cars in four lanes, the outer ones parked
        lane = (-0.675, -0.225, 0.225, 0.675)[rng.integers(4)]
        x = xc + lane * wr
        z = _uniform_in_rows(rng, max(4.0, z_near), min(70.0, z_end - 5.0))
        things.append((z, functools.partial(_car, canvas, rng, cam, x, z)))
    for _ in range(_count(rng, 3.0, 8)):  # poles at the curb: plain, lamps, signs
        sgn = side()
        z, sprite = place(3.0, 60.0, xc + sgn * (wr + rng.uniform(0.3, 0.8)))
        kind = rng.random()
        draw = functools.partial(
            _pole, sprite, rng, sign=kind < 0.55, light=0.35 < kind < 0.8, toward=-sgn
        )
        things.append((z, draw))
    for _ in range(_count(rng, 1.5, 6)):  # street trees near the facades
        z, sprite = place(4.0, 60.0, on_sidewalk(side(), 0.6, 0.9))
        things.append((z, functools.partial(_tree, sprite, rng)))
    for _ in range(_count(rng, 0.5, 4)):
        z, sprite = place(3.0, 40.0, on_sidewalk(side(), 0.3, 0.95))
        things.append((z, functools.partial(_clutter, sprite, rng)))
    for _ in range(_count(rng, 3.0, 10)):  # pedestrians, mostly on the sidewalks
        sgn, crossing = side(), rng.random() < 0.15
        x = xc + rng.uniform(-wr, wr) if crossing else on_sidewalk(sgn)
        z, sprite = place(3.0, 45.0, x)
        things.append((z, functools.partial(_pedestrian, sprite, rng, person_colours())))
    for _ in range(_count(rng, 0.5, 3)):  # cyclists, near the road edges
        sgn = side()
        z, sprite = place(4.0, 45.0, xc + sgn * (wr - rng.uniform(0.6, 1.6)))
        view = "back" if rng.random() < 0.55 else "side"
        things.append((z, functools.partial(_cyclist, sprite, rng, person_colours(), view=view)))
    for _ in range(_count(rng, 0.3, 3)):  # parked bicycles
        z, sprite = place(3.0, 30.0, on_sidewalk(side(), 0.5, 0.9))
        draw = functools.partial(_cyclist, sprite, rng, person_colours(), view="side", ridden=False)
        things.append((z, draw))

    if extra_things is not None:
        things += extra_things(canvas, cam, street, z_near)
    # A stable sort by depth: drawing (and its random draws) happens in a reproducible order.
    for _, draw in sorted(things, key=lambda t: -t[0]):
        draw()

    if rng.random() < 0.25:  # the ego vehicle's bonnet, unlabelled as in Cityscapes
        u = (Canvas.xs - WIDTH / 2) / (WIDTH / 2)
        rise = rng.uniform(3.0, 8.0) * (1.0 - 0.6 * u * u)
        bonnet = Canvas.ys >= HEIGHT - rise
        canvas.label[bonnet] = IGNORE_LABEL
        canvas.image[bonnet] = _rgb(rng, _CAR_PAINT[rng.integers(len(_CAR_PAINT))], 10) * 0.8

    return _finish(rng, cam, canvas), canvas.label


def _finish(rng: np.random.Generator, cam: Camera, canvas: Canvas) -> np.ndarray:
    """Texture, optical blur, cast shadow, illumination and sensor noise; quantised to uint8."""
    img = canvas.image
    img += rng.uniform(-1.0, 1.0, img.shape).astype(np.float32) * _TEXTURE[canvas.label][..., None]
    # [1, 2, 1] / 4 blur in both directions, edges replicated.
    p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
    img = (p[:-2] + 2 * p[1:-1] + p[2:]) * np.float32(0.25)
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    img = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * np.float32(0.25)
    if rng.random() < 0.4:  # a building's shadow across the street
        a, b = rng.uniform(-1.0, 1.0), rng.uniform(-40.0, 40.0)
        shade = (Canvas.xs - cam.vx - b) > a * (Canvas.ys - cam.vy) * 3.0
        shade &= Canvas.ys > cam.vy + rng.uniform(0.0, 6.0)
        # On the street and what stands on it, not on the facades or the sky.
        shade &= (canvas.label != BUILDING) & (canvas.label != SKY)
        shade &= (canvas.label != VEGETATION) | (Canvas.ys > cam.vy + 12.0)
        img[shade] *= np.float32(rng.uniform(0.5, 0.75))
    gain = np.float32(rng.uniform(0.65, 1.25))
    cast = (1.0 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    img = img * gain * cast + rng.integers(-4, 5, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
