"""Drawing primitives of the street scenes (`street_scenes_render`), in numpy.

A pinhole `Camera` over flat ground; a `Canvas` of labels and colours, painted with masks
computed on each primitive's bounding box (pixel centres at integer coordinates); a `Sprite`
draws in metres around an object's foot point. Only IEEE arithmetic, so every machine paints
the same bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

HEIGHT = 64
WIDTH = 128


class Canvas:
    """Label map and float image, painted with masks computed on each primitive's bounding box."""

    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)

    def __init__(self, background: int) -> None:
        self.label = np.full((HEIGHT, WIDTH), background, np.uint8)
        self.image = np.zeros((HEIGHT, WIDTH, 3), np.float32)

    @staticmethod
    def _window(x0: float, x1: float, y0: float, y1: float):
        ix0, ix1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, WIDTH)
        iy0, iy1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, HEIGHT)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return np.s_[iy0:iy1, ix0:ix1]

    def _paint(self, sl, mask: np.ndarray, cls: int, colour: np.ndarray) -> None:
        self.label[sl][mask] = cls
        self.image[sl][mask] = colour

    def box(self, x0, x1, y0, y1, cls, colour) -> None:
        """Pixels whose centre lies in [x0, x1) x [y0, y1), at least one pixel wide and tall."""
        if x1 - x0 < 1.0:
            xc = 0.5 * (x0 + x1)
            x0, x1 = xc - 0.5, xc + 0.5
        if y1 - y0 < 1.0:
            yc = 0.5 * (y0 + y1)
            y0, y1 = yc - 0.5, yc + 0.5
        sl = self._window(x0, x1, y0, y1)
        if sl is None:
            return
        xs, ys = self.xs[sl], self.ys[sl]
        self._paint(sl, (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1), cls, colour)

    def ellipse(self, cx, cy, rx, ry, cls, colour) -> None:
        rx, ry = max(rx, 0.6), max(ry, 0.6)
        sl = self._window(cx - rx, cx + rx, cy - ry, cy + ry)
        if sl is None:
            return
        u = (self.xs[sl] - cx) / rx
        v = (self.ys[sl] - cy) / ry
        self._paint(sl, u * u + v * v <= 1.0, cls, colour)

    def ring(self, cx, cy, r, half_width, cls, colour) -> None:
        hw = max(half_width, 0.55)
        ro = r + hw
        sl = self._window(cx - ro, cx + ro, cy - ro, cy + ro)
        if sl is None:
            return
        d2 = (self.xs[sl] - cx) ** 2 + (self.ys[sl] - cy) ** 2
        ri = max(r - hw, 0.0)
        self._paint(sl, (d2 <= ro * ro) & (d2 >= ri * ri), cls, colour)

    def segment(self, x0, y0, x1, y1, half_width, cls, colour) -> None:
        """A thick line; at least about one pixel wide whatever the scale."""
        hw = max(half_width, 0.55)
        sl = self._window(min(x0, x1) - hw, max(x0, x1) + hw, min(y0, y1) - hw, max(y0, y1) + hw)
        if sl is None:
            return
        dx, dy = x1 - x0, y1 - y0
        px, py = self.xs[sl] - x0, self.ys[sl] - y0
        len2 = dx * dx + dy * dy
        t = np.clip((px * dx + py * dy) / len2, 0.0, 1.0) if len2 > 0 else 0.0
        ex, ey = px - t * dx, py - t * dy
        self._paint(sl, ex * ex + ey * ey <= hw * hw, cls, colour)

    def polygon(self, pts, cls, colour) -> None:
        """A convex polygon given by its vertices in order (either orientation)."""
        pts = np.asarray(pts, np.float64)
        sl = self._window(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
        if sl is None:
            return
        xs, ys = self.xs[sl], self.ys[sl]
        pos = np.ones(xs.shape, bool)
        neg = np.ones(xs.shape, bool)
        for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
            cross = (bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
            pos &= cross >= 0
            neg &= cross <= 0
        self._paint(sl, pos | neg, cls, colour)


@dataclasses.dataclass
class Camera:
    """Pinhole camera at height ``hc`` (m) over a flat ground; Y is up, Z is depth."""

    f: float  # focal length, pixels
    hc: float  # camera height, m
    vx: float  # principal point column (vanishing point of the street)
    vy: float  # horizon row

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        return self.vx + self.f * x / z, self.vy + self.f * (self.hc - y) / z


class Sprite:
    """Draws in metres relative to an object's foot point (u to the right, v up) at depth z.

    Every part of an object is painted at the depth of its foot point: at these sizes the
    perspective within one person or car face is negligible.
    """

    def __init__(self, canvas: Canvas, cam: Camera, x: float, z: float) -> None:
        self.canvas = canvas
        self.s = cam.f / z  # pixels per metre
        self.fx, self.fy = cam.project(x, 0.0, z)

    def xy(self, u: float, v: float) -> tuple[float, float]:
        return self.fx + u * self.s, self.fy - v * self.s

    def box(self, u0, u1, v0, v1, cls, colour) -> None:
        s = self.s
        self.canvas.box(self.fx + u0 * s, self.fx + u1 * s, self.fy - v1 * s, self.fy - v0 * s,
                        cls, colour)  # fmt: skip

    def segment(self, a, b, half_width, cls, colour) -> None:
        self.canvas.segment(*self.xy(*a), *self.xy(*b), half_width * self.s, cls, colour)

    def ellipse(self, centre, rx, ry, cls, colour) -> None:
        self.canvas.ellipse(*self.xy(*centre), rx * self.s, ry * self.s, cls, colour)

    def ring(self, centre, r, half_width, cls, colour) -> None:
        self.canvas.ring(*self.xy(*centre), r * self.s, half_width * self.s, cls, colour)

    def polygon(self, pts, cls, colour) -> None:
        self.canvas.polygon([self.xy(u, v) for u, v in pts], cls, colour)
