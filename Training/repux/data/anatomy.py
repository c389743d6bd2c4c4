"""A random adult upper abdomen in patient space: what the synthetic CT phantoms show.

Everything here lives in the *body frame*: LPS axes (x toward the patient's left, y toward
posterior, z toward superior), millimetres, origin on the body axis at the level of the
renal hila. :class:`Anatomy` is drawn from a numpy Generator and knows nothing about voxels;
it hands out an ordered list of layers (:class:`Layer`), each confined to a box, that a
sampler paints into any grid (see :mod:`repux.data.phantoms`). Later layers cover earlier
ones and set the label of what they cover, so every voxel carries the label of the
structure whose CT number it shows.

Shapes are ellipsoids and tubes bent by smooth random displacement fields (sums of a few
plane waves with wavelengths of several centimetres), so no two organs are alike but all
stay smooth and anatomically placed. Organ CT numbers overlap on purpose (liver ~60 HU,
spleen ~50, kidney ~40 with a brighter cortex, pancreas ~40, each with a per-case offset):
position and shape, not a threshold, tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Label values of the phantom organs, in the 3D UX-Net FLARE order.
SPLEEN, KIDNEY, LIVER, PANCREAS = 1, 2, 3, 4

#: What a layer paints: ``paint(hu, label, points)`` with ``hu`` (float32 HU) and ``label``
#: (uint8) blocks of the output grid, written in place, and the voxel centres as :class:`Points`.
Painter = Callable[[np.ndarray, np.ndarray, "Points"], None]

_FAR = 1.0e4  # mm; "unbounded" along an axis (a grid clips it)


@dataclass
class Layer:
    """One structure to paint, confined to the body-frame box ``lo``..``hi`` (mm)."""

    name: str
    lo: np.ndarray
    hi: np.ndarray
    paint: Painter


@dataclass
class Points:
    """Body-frame positions of a block of voxel centres (float32 arrays of one shape) and the
    body-wall quantities most layers need, computed once per block.

    Attributes:
        x, y, z: coordinates in mm.
        depth: depth below the skin along the ray from the body axis, mm (negative outside).
        sine: y over the ray's length: -1 straight in front, +1 straight behind.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    depth: np.ndarray
    sine: np.ndarray

    def __getitem__(self, index) -> "Points":
        return Points(self.x[index], self.y[index], self.z[index], self.depth[index], self.sine[index])

    @property
    def xyz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x, self.y, self.z


class Waves:
    """A smooth random field: a sum of plane waves, ``components`` values per point.

    Used as a displacement field (3 components, mm) to bend shapes and as a texture
    (1 component, HU). ``bound`` is an upper limit of its magnitude.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        count: int,
        wavelength: tuple[float, float],
        amplitude: float,
        components: int = 3,
    ) -> None:
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        self.k = directions * (2 * np.pi / rng.uniform(*wavelength, size=(count, 1)))
        self.phase = rng.uniform(0, 2 * np.pi, size=count)
        self.amp = rng.normal(size=(count, components)) * (amplitude / np.sqrt(count))
        self.bound = float(np.linalg.norm(self.amp, axis=1).sum())

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        out: list = [0.0] * self.amp.shape[1]
        for (kx, ky, kz), phase, amps in zip(self.k, self.phase, self.amp):
            wave = np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(phase))
            for c, amp in enumerate(amps):
                out[c] = out[c] + np.float32(amp) * wave
        return out

    def warp(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The points moved by the field (a shape evaluated there looks bent)."""
        dx, dy, dz = self(x, y, z)
        return x + dx, y + dy, z + dz


def rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation about a random axis, by up to ``max_degrees`` (3x3)."""
    axis = rng.normal(size=3)
    return axis_rotation(axis, np.deg2rad(rng.uniform(-max_degrees, max_degrees)))


def axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about ``axis`` (Rodrigues' formula, 3x3)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


class Ellipsoid:
    """An ellipsoid (``semi`` axes in mm along the columns of ``rotation``) bent by ``warp``."""

    def __init__(self, center, semi, rotation: np.ndarray | None = None, warp: Waves | None = None) -> None:
        self.center = np.asarray(center, dtype=float)
        self.semi = np.asarray(semi, dtype=float)
        self.rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        self.warp = warp
        reach = self.semi.max() + (warp.bound if warp else 0.0)
        self.lo, self.hi = self.center - reach, self.center + reach

    def local(self, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates in the ellipsoid's own frame, scaled so the surface is the unit sphere."""
        if self.warp is not None:
            x, y, z = self.warp.warp(x, y, z)
        dx, dy, dz = x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2])
        r = self.rotation
        return tuple(
            (np.float32(r[0, i]) * dx + np.float32(r[1, i]) * dy + np.float32(r[2, i]) * dz) / np.float32(self.semi[i])
            for i in range(3)
        )

    def level(self, x, y, z) -> np.ndarray:
        """Squared scaled radius: below 1 inside."""
        u, v, w = self.local(x, y, z)
        return u * u + v * v + w * w


def catmull_rom(points: np.ndarray, samples: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curve through ``points`` (N, 3): (curve points (M, 3), their parameter 0..N-1)."""
    p = np.asarray(points, dtype=float)
    padded = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    curve, params = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = padded[i : i + 4]
        for t in np.linspace(0, 1, samples, endpoint=False):
            curve.append(
                0.5
                * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
            )
            params.append(i + t)
    curve.append(p[-1])
    params.append(len(p) - 1)
    return np.array(curve), np.array(params)


class Tube:
    """A tube along a polyline with a radius per vertex, optionally flattened and bent.

    ``squash`` scales the offsets from the axis before measuring (a value above 1 along y
    makes the tube thinner front to back), which gives flat cross-sections like the pancreas'.
    """

    def __init__(self, points, radii, warp: Waves | None = None, squash=(1.0, 1.0, 1.0)) -> None:
        self.points = np.asarray(points, dtype=float)
        self.radii = np.broadcast_to(np.asarray(radii, dtype=float), (len(self.points),)).copy()
        self.warp = warp
        self.squash = np.asarray(squash, dtype=float)
        reach = self.radii.max() / self.squash.min() + (warp.bound if warp else 0.0)
        self.lo, self.hi = self.points.min(axis=0) - reach, self.points.max(axis=0) + reach

    def distance(self, x, y, z) -> np.ndarray:
        """Signed distance to the wall in mm (negative inside), exact for a straight round tube."""
        if self.warp is not None:
            x, y, z = self.warp.warp(x, y, z)
        sx, sy, sz = (np.float32(s) for s in self.squash)
        best = None
        for p0, p1, r0, r1 in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            v = (p1 - p0) * self.squash
            wx, wy, wz = (x - np.float32(p0[0])) * sx, (y - np.float32(p0[1])) * sy, (z - np.float32(p0[2])) * sz
            t = wx * np.float32(v[0]) + wy * np.float32(v[1]) + wz * np.float32(v[2])
            t *= np.float32(1 / max(v @ v, 1e-9))
            np.clip(t, 0, 1, out=t)
            wx -= t * np.float32(v[0])
            wy -= t * np.float32(v[1])
            wz -= t * np.float32(v[2])
            signed = np.sqrt(wx * wx + wy * wy + wz * wz) - (np.float32(r0) + t * np.float32(r1 - r0))
            best = signed if best is None else np.minimum(best, signed)
        return best


def _box(shape) -> tuple[np.ndarray, np.ndarray]:
    return shape.lo, shape.hi


def _union_box(*boxes) -> tuple[np.ndarray, np.ndarray]:
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


class Anatomy:
    """One random upper abdomen (body frame, mm): body wall, spine, ribs, lung bases, heart,
    stomach, bowel, vessels and the four FLARE organs.

    ``fov_lo``/``fov_hi`` bound the region a scan of it should cover (the body from the lung
    bases to below the kidneys). Every random choice is made here, from ``rng``, so the
    same generator state gives the same patient whatever grid samples it.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        self._rng = rng
        # Body wall. The inner (cavity) outline is drawn first and the wall added outside,
        # so fat changes the patient's girth but not where the organs sit.
        self.skin = u(1.5, 3.0)
        self.fat = u(8.0, 30.0)  # lateral subcutaneous fat; thicker in front, thinner behind
        self.muscle = u(8.0, 13.0)
        self.inner_lr, self.inner_post = u(118, 140), u(75, 90)
        self.taper = u(-0.03, 0.05, size=2)  # relative change of width / depth per 100 mm up
        # Angular harmonics 2..4 of the outline (cosine, sine); a positive 4th cosine makes
        # the cross-section a little squarer than an ellipse, as an abdomen is.
        self.ripple = rng.normal(0, 0.012, size=(3, 2))
        self.ripple[2, 0] += u(0.02, 0.045)
        self.ripple_z = rng.normal(0, 0.008, size=(3, 2))  # their change per 100 mm up

        # Spine and the vessels in front of it (the anchors of the retroperitoneum).
        self.canal_y = self.inner_post - u(40, 50)
        self.canal_r = u(7, 9)
        self.vb_semi = np.array([u(19, 24), u(15, 19)])
        self.vb_y = self.canal_y - self.canal_r - 2 - self.vb_semi[1]
        self.vertebra_period, self.disc = u(33, 38), u(7, 10)
        self.vertebra_phase = u(0, self.vertebra_period)
        self.aorta_r = u(10, 13)
        self.aorta = np.array([u(8, 18), self.vb_y - self.vb_semi[1] - self.aorta_r - u(1, 4)])
        self.ivc = np.array([-u(20, 28), self.vb_y - self.vb_semi[1] - u(6, 12)])
        self.ivc_semi = np.array([u(11, 16), u(8, 11)])
        self.paraspinal_semi = np.array([u(24, 32), (self.inner_post - self.canal_y) / 2 + 8])
        self.psoas_top = u(20, 40)
        # The front of the cavity leaves room for pancreas and bowel in front of the aorta.
        self.inner_ant = max(u(80, 100), -(self.aorta[1] - self.aorta_r) + u(50, 65))
        self.a = self.inner_lr + self.skin + self.fat + self.muscle
        self.b_ant = self.inner_ant + self.skin + 1.6 * self.fat + self.muscle
        self.b_post = self.inner_post + self.skin + 0.7 * self.fat + self.muscle

        # Diaphragm: two domes, the right one higher; the thorax lies above.
        self.dome_r = u(130, 160)
        self.dome_l = self.dome_r - u(5, 20)
        self.dome_x = np.array([-u(50, 70), u(50, 70)])
        self.dome_y = -u(0, 20)
        self.dome_radius = u(100, 140)

        # Ribs 12 (lowest) up to 7: head height, descent per radian around the body, where
        # they end (radians from straight behind; the floating ribs stop at the side).
        self.rib_heads = u(40, 60) + np.arange(6) * u(28, 34)
        self.rib_slope = u(32, 45, size=6)
        self.rib_end = np.concatenate([[u(1.3, 1.7), u(1.8, 2.2)], u(2.6, 2.9, size=4)])
        self.rib_side_shift = u(-6, 6)

        # CT numbers. Organs share one contrast offset and get their own on top, so their
        # ranges overlap and vary from case to case.
        contrast = u(0, 1)  # 0 unenhanced .. 1 portal venous
        shared = rng.normal(0, 5)
        self.hu = {
            "skin": u(10, 40), "fat": u(-115, -90), "visceral_fat": u(-110, -80), "muscle": u(42, 58),
            "bone": u(600, 1000), "marrow": u(150, 300), "disc": u(60, 100), "csf": u(0, 20),
            "lung": u(-880, -820), "blood": 40 + 160 * contrast + rng.normal(0, 10),
            "vein": 40 + 110 * contrast + rng.normal(0, 10), "bowel_wall": u(35, 55),
            "fluid": u(0, 20), "cartilage": u(100, 200),
            "liver": 60 + shared + rng.normal(0, 6), "spleen": 50 + shared + rng.normal(0, 6),
            "kidney": 42 + shared + rng.normal(0, 5), "pancreas": 40 + shared + rng.normal(0, 6),
        }  # fmt: skip
        self.hu["cortex"] = self.hu["kidney"] + u(12, 25)

        self._draw_organs()
        self._draw_bowel()
        lowest_kidney = min(k.lo[2] for k in self.kidneys)
        # Room for the outline's ripples and taper over the scanned range, plus a margin.
        swell = 1 + np.abs(self.ripple).sum() + 0.015 * np.abs(self.ripple_z).sum() + 1.6 * np.abs(self.taper).max()
        # (A scan's grid may sit up to 8 mm off this box; the margins allow for it.)
        self.fov_lo = np.array([-self.a * swell - 10, -self.b_ant * swell - 10, lowest_kidney - u(10, 25)])
        self.fov_hi = np.array([self.a * swell + 10, self.b_post * swell + 10, self.dome_r + u(10, 25)])

    # ---- drawing ------------------------------------------------------------------
    def _bend(self, size: float, fraction: float = 0.12) -> Waves:
        """A displacement field for an organ of about ``size`` mm: smooth on that scale."""
        return Waves(self._rng, 4, (2.5 * size, 6 * size), fraction * size)

    def _draw_organs(self) -> None:
        rng, u = self._rng, self._rng.uniform

        # Liver: a big right lobe under the right dome and a left lobe reaching across the
        # midline in front; the diaphragm and the body wall cut it to shape, and a sloping
        # cut leaves room below it medially (duodenum, pancreatic head, right kidney).
        right_semi = np.array([u(60, 75), u(70, 85), u(70, 85)])
        right_center = np.array([-u(55, 72), u(-15, 5), self.dome_r - u(60, 75)])
        left_semi = np.array([u(40, 55), u(25, 35), u(28, 38)])
        left_center = [u(5, 25), -u(35, 50), self.dome_r - u(40, 55)]
        self.liver = [
            Ellipsoid(right_center, right_semi, rotation(rng, 10), self._bend(right_semi.mean())),
            Ellipsoid(left_center, left_semi, rotation(rng, 15), self._bend(left_semi.mean())),
        ]
        bottom = right_center[2] - right_semi[2]
        self.liver_cut = (right_center[0], bottom + u(5, 20), u(0.35, 0.7))  # x, z at x, slope

        # Spleen: left, posterior, long axis along the ribs.
        semi = np.array([u(22, 30), u(48, 60), u(40, 52)])
        spin = axis_rotation([0, 0, 1], np.deg2rad(u(25, 50))) @ rotation(rng, 10)
        center = [u(82, 98), u(30, 50), self.dome_l - u(45, 60)]
        self.spleen = Ellipsoid(center, semi, spin, self._bend(semi.mean(), 0.1))

        # Kidneys: either side of the spine, upper poles tilted inward, hila facing front and
        # medially; the left one a little higher.
        self.kidney_sides = (-1, 1)  # right, left
        self.kidneys = []
        right_z = u(-20, 0)
        for side, z in zip(self.kidney_sides, (right_z, right_z + u(8, 20))):
            semi = np.array([u(22, 27), u(26, 32), u(48, 58)])
            tilt = axis_rotation([0, 1, 0], -side * np.deg2rad(u(8, 15)))
            turn = axis_rotation([0, 0, 1], side * np.deg2rad(u(25, 40)))
            center = [side * u(60, 72), self.vb_y + u(0, 12), z]
            self.kidneys.append(Ellipsoid(center, semi, turn @ tilt, self._bend(semi.mean(), 0.06)))

        # Pancreas: head right of the midline by the duodenum, body across the aorta, tail up
        # to the splenic hilum in front of the left kidney.
        front = self.aorta[1] - self.aorta_r
        self.pancreas_z = z = u(15, 35)
        knots = np.array([
            [-u(25, 35), front - u(8, 16), z - u(15, 25)],
            [-u(0, 8), front - u(18, 26), z - u(0, 5)],
            [u(25, 40), front - u(10, 18), z + u(3, 10)],
            [u(60, 75), self.kidneys[1].center[1] - u(25, 35), z + u(12, 25)],
        ])  # fmt: skip
        curve, t = catmull_rom(knots)
        radii = np.interp(t, [0, 1, 2, 3], [u(17, 21), u(12, 14), u(12, 14), u(10, 12)])
        self.pancreas = Tube(curve, radii, Waves(rng, 4, (40, 100), 4.0), squash=(1.0, 1.25, 1.0))
        self.pancreas_lobules = Waves(rng, 6, (8, 16), 9.0, components=1)

        # Gallbladder in the liver's underside, in front.
        semi = np.array([u(12, 18), u(15, 22), u(25, 40)])
        self.gallbladder = Ellipsoid(
            [-u(30, 45), -u(30, 45), bottom + u(25, 40)], semi, rotation(rng, 25), self._bend(semi.mean(), 0.08)
        )

        # Liver vessels: branches from the porta hepatis out into the right lobe.
        porta = np.array([-u(25, 40), u(-5, 10), bottom + u(45, 60)])
        self.liver_vessels = []
        for _ in range(int(rng.integers(4, 7))):
            reach = np.array([-u(20, 80), u(-50, 50), u(-20, 60)])
            knots = np.vstack([porta, porta + reach * 0.5 + rng.normal(0, 8, 3), porta + reach])
            curve, t = catmull_rom(knots, 4)
            self.liver_vessels.append(Tube(curve, np.interp(t, [0, 2], [u(5, 7), u(2, 3)])))

        semi = np.array([u(50, 60), u(40, 50), u(45, 55)])
        self.heart = Ellipsoid([u(10, 30), -u(20, 40), self.dome_l + u(35, 50)], semi, rotation(rng, 20))

        # Per-organ smooth texture (HU) so organs are not flat.
        self.texture = {name: Waves(rng, 3, (20, 60), 5.0, components=1) for name in ("liver", "spleen", "kidney")}

    def _draw_bowel(self) -> None:
        rng, u = self._rng, self._rng.uniform
        # Stomach: left upper quadrant in front of spleen and pancreatic tail; air floats to
        # the front (the patient lies supine), fluid and food below.
        semi = np.array([u(35, 50), u(25, 35), u(40, 55)])
        self.stomach = Ellipsoid(
            [u(35, 55), -u(35, 55), self.dome_l - u(35, 50)], semi, rotation(rng, 20), self._bend(semi.mean(), 0.1)
        )
        self.stomach_level = self.stomach.center[1] - semi[1] * u(-0.2, 0.6)
        self.stomach_content = u(0, 35)

        # Colon: ascending on the right, transverse hanging in front, descending on the left.
        x = self.inner_lr - u(25, 35)
        hepatic_z, bottom = u(-10, 20), -150.0
        knots = np.array([
            [-x, u(0, 20), bottom], [-x, u(-10, 10), hepatic_z - 30], [-x + 10, -u(20, 40), hepatic_z],
            [0, -self.inner_ant + u(30, 45), hepatic_z - u(10, 40)],
            [x - 10, -u(10, 30), hepatic_z + u(20, 40)], [x, u(0, 20), hepatic_z - 20], [x, u(0, 20), bottom],
        ])  # fmt: skip
        curve, _ = catmull_rom(knots, 3)
        self.colon = Tube(curve, u(17, 24), Waves(rng, 4, (60, 150), 6.0))
        self.colon_air = Waves(rng, 6, (20, 50), 1.0, components=1)
        self.colon_air_cut = u(-0.3, 0.3)

        # Small bowel: short loops low in front.
        self.small_bowel = []
        front = self.aorta[1] - self.aorta_r
        for _ in range(int(rng.integers(8, 15))):
            start = np.array([u(-70, 70), u(-self.inner_ant + 25, front - 20), u(-80, self.pancreas_z - 15)])
            knots = start + np.cumsum(rng.normal(0, 18, size=(3, 3)), axis=0)
            curve, _ = catmull_rom(np.vstack([start, knots]), 4)
            content = rng.choice(["air", "fluid", "tissue"], p=[0.25, 0.45, 0.3])
            self.small_bowel.append((Tube(curve, u(9, 14)), str(content)))

    # ---- body wall -----------------------------------------------------------------
    def points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Points:
        """The :class:`Points` of body-frame coordinates (float32 mm arrays of one shape)."""
        rho = np.sqrt(x * x + y * y)
        rho += np.float32(1e-3)
        c, s = x / rho, y / rho
        # Scaled radius of the point on the (tapered) ellipse through the outline's axes.
        norm = x / (np.float32(self.a) * (1 + np.float32(self.taper[0] / 100) * z))
        norm *= norm
        depth_axis = np.where(y > 0, np.float32(self.b_post), np.float32(self.b_ant))
        depth_axis *= 1 + np.float32(self.taper[1] / 100) * z
        ratio = y / depth_axis
        norm += ratio * ratio
        np.sqrt(norm, out=norm)
        outline = np.ones_like(x)
        cn, sn = c, s
        for n in range(3):  # harmonics 2, 3, 4 by angle addition: no trigonometric calls
            cn, sn = cn * c - sn * s, sn * c + cn * s
            (ac, as_), (zc, zs) = self.ripple[n], self.ripple_z[n]
            outline += (np.float32(ac) + np.float32(zc / 100) * z) * cn
            outline += (np.float32(as_) + np.float32(zs / 100) * z) * sn
        np.maximum(norm, np.float32(1e-6), out=norm)
        outline /= norm
        outline -= 1
        outline *= rho
        return Points(x, y, z, outline, s)

    def fat_thickness(self, sine: np.ndarray) -> np.ndarray:
        """Subcutaneous fat (mm) along the ray with ``sine``: thicker in front, thinner behind."""
        return np.float32(self.fat) * (
            1 + np.float32(0.6) * np.maximum(-sine, 0) - np.float32(0.3) * np.maximum(sine, 0)
        )

    def cavity(self, p: Points) -> np.ndarray:
        """Inside the muscle wall (bool)."""
        return p.depth > np.float32(self.skin + self.muscle) + self.fat_thickness(p.sine)

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm (mm) above each (x, y)."""
        k = np.float32(0.5 / self.dome_radius)
        # Flatter in front, falling steeply behind into the posterior recesses of the lungs.
        dy = y - np.float32(self.dome_y)
        drop = dy * dy * np.where(dy > 0, k / np.float32(0.6), k / np.float32(1.5))
        right = np.float32(self.dome_r) - k * (x - np.float32(self.dome_x[0])) ** 2
        left = np.float32(self.dome_l) - k * (x - np.float32(self.dome_x[1])) ** 2
        return np.maximum(right, left) - drop

    def abdomen(self, p: Points) -> np.ndarray:
        """Inside the abdominal cavity: within the wall and below the diaphragm (bool)."""
        return self.cavity(p) & (p.z < self.diaphragm(p.x, p.y))

    # ---- layers ----------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The structures in painting order (later ones cover earlier ones)."""
        far = np.full(3, _FAR)
        spine = (np.array([-70.0, self.aorta[1] - 20, -_FAR]), np.array([70.0, self.b_post, _FAR]))
        layers = [
            Layer("body", -far, far, self._paint_body),
            Layer("thorax", np.array([-_FAR, -_FAR, self.dome_l - 150]), far, self._paint_thorax),
            Layer("back muscles", *spine, self._paint_back_muscles),
            Layer("stomach", *_box(self.stomach), self._paint_stomach),
            Layer("colon", *_box(self.colon), self._paint_colon),
            *(Layer("small bowel", *_box(t), self._bowel_painter(t, c)) for t, c in self.small_bowel),
            Layer("liver", *_union_box(*map(_box, self.liver)), self._paint_liver),
            *(Layer("liver vessel", *_box(v), self._vessel_painter(v)) for v in self.liver_vessels),
            Layer("gallbladder", *_box(self.gallbladder), self._paint_gallbladder),
            Layer("spleen", *_box(self.spleen), self._paint_spleen),
            Layer("pancreas", *_box(self.pancreas), self._paint_pancreas),
            *(Layer("kidney", *_box(k), self._kidney_painter(k, s)) for k, s in zip(self.kidneys, self.kidney_sides)),
            Layer("great vessels", *spine, self._paint_great_vessels),
            Layer("spine", *spine, self._paint_spine),
            Layer("ribs", np.array([-_FAR, -_FAR, self.rib_heads[0] - 150]), far, self._paint_ribs),
        ]
        return layers

    def _paint_body(self, hu, label, p: Points) -> None:
        fat = self.fat_thickness(p.sine)
        hu[p.depth > 0] = self.hu["skin"]
        hu[p.depth > self.skin] = self.hu["fat"]
        hu[p.depth > self.skin + fat] = self.hu["muscle"]
        hu[p.depth > self.skin + self.muscle + fat] = self.hu["visceral_fat"]

    def _paint_thorax(self, hu, label, p: Points) -> None:
        inside = self.cavity(p)
        above = p.z - self.diaphragm(p.x, p.y)
        hu[inside & (above > 0)] = self.hu["muscle"]  # the diaphragm itself
        lung = inside & (above > 5)
        hu[lung] = self.hu["lung"]
        hu[lung & (self.heart.level(*p.xyz) < 1)] = self.hu["blood"]

    def _paint_back_muscles(self, hu, label, p: Points) -> None:
        below_fat = p.depth > self.skin + self.fat_thickness(p.sine)
        (sx, sy), y_back = self.paraspinal_semi, (self.canal_y + self.inner_post) / 2 + 5
        for side in (-1, 1):
            # Erector spinae: one mass each side of the spinous process, filling the back.
            dx = (p.x - np.float32(side * (self.canal_r + sx - 2))) / np.float32(sx)
            dy = (p.y - np.float32(y_back)) / np.float32(sy)
            back = dx * dx + dy * dy < 1
            # Psoas: from the upper lumbar spine downwards, growing.
            radius = np.clip(np.float32(4) + (np.float32(self.psoas_top) - p.z) * np.float32(0.15), 0, 22)
            px = side * (self.vb_semi[0] - 4) + side * radius
            psoas = (p.x - px) ** 2 + (p.y - np.float32(self.vb_y + 3)) ** 2 < radius * radius
            hu[below_fat & (back | psoas)] = self.hu["muscle"]

    def _paint_stomach(self, hu, label, p: Points) -> None:
        level = self.stomach.level(*p.xyz)
        inside = (level < 1) & self.abdomen(p)
        hu[inside] = self.hu["bowel_wall"]
        lumen = inside & (level < (1 - 4 / self.stomach.semi.min()) ** 2)
        hu[lumen & (p.y < self.stomach_level)] = -1000
        hu[lumen & (p.y >= self.stomach_level)] = self.stomach_content

    def _paint_colon(self, hu, label, p: Points) -> None:
        distance = self.colon.distance(*p.xyz)
        inside = (distance < 0) & self.abdomen(p)
        hu[inside] = self.hu["bowel_wall"]
        lumen = inside & (distance < -3)
        (mottle,) = self.colon_air(*p[lumen].xyz)
        hu[lumen] = np.where(mottle > self.colon_air_cut, np.float32(-1000), np.float32(-120) + 80 * mottle)

    def _bowel_painter(self, tube: Tube, content: str) -> Painter:
        fill = {"air": -1000.0, "fluid": self.hu["fluid"], "tissue": self.hu["bowel_wall"] + 10}[content]

        def paint(hu, label, p: Points) -> None:
            distance = tube.distance(*p.xyz)
            inside = (distance < 0) & self.abdomen(p)
            hu[inside] = self.hu["bowel_wall"]
            hu[inside & (distance < -2.5)] = fill

        return paint

    def _organ(self, hu, label, inside, value: int, name: str, p: Points) -> None:
        (texture,) = self.texture[name](*p[inside].xyz)
        hu[inside] = np.float32(self.hu[name]) + texture
        label[inside] = value

    def _paint_liver(self, hu, label, p: Points) -> None:
        x0, z0, slope = self.liver_cut
        inside = (self.liver[0].level(*p.xyz) < 1) | (self.liver[1].level(*p.xyz) < 1)
        inside &= p.z > np.float32(z0) + np.float32(slope) * (p.x - np.float32(x0))
        inside &= self.abdomen(p)
        self._organ(hu, label, inside, LIVER, "liver", p)

    def _vessel_painter(self, vessel: Tube) -> Painter:
        def paint(hu, label, p: Points) -> None:
            hu[(label == LIVER) & (vessel.distance(*p.xyz) < 0)] = self.hu["vein"]

        return paint

    def _paint_gallbladder(self, hu, label, p: Points) -> None:
        level = self.gallbladder.level(*p.xyz)
        inside = (level < 1) & self.abdomen(p)
        hu[inside] = self.hu["bowel_wall"]
        hu[inside & (level < (1 - 2 / self.gallbladder.semi.min()) ** 2)] = self.hu["fluid"]
        label[inside] = 0

    def _paint_spleen(self, hu, label, p: Points) -> None:
        inside = (self.spleen.level(*p.xyz) < 1) & self.abdomen(p)
        self._organ(hu, label, inside, SPLEEN, "spleen", p)

    def _paint_pancreas(self, hu, label, p: Points) -> None:
        inside = (self.pancreas.distance(*p.xyz) < 0) & self.abdomen(p)
        # Lobules: fat between them lowers the CT number in patches.
        (lobules,) = self.pancreas_lobules(*p[inside].xyz)
        hu[inside] = np.float32(self.hu["pancreas"]) + lobules
        label[inside] = PANCREAS

    def _kidney_painter(self, kidney: Ellipsoid, side: int) -> Painter:
        cortex = (1 - 6.5 / kidney.semi.min()) ** 2

        def paint(hu, label, p: Points) -> None:
            u, v, w = kidney.local(*p.xyz)
            level = u * u + v * v + w * w
            inside = (level < 1) & self.cavity(p)
            self._organ(hu, label, inside, KIDNEY, "kidney", p)
            hu[inside & (level > cortex)] += np.float32(self.hu["cortex"] - self.hu["kidney"])
            # Renal sinus: fat in a notch on the medial side (local +x points to the midline
            # for the right kidney, -x for the left one), not labelled kidney.
            medial = -side * u
            sinus = inside & ((medial - 0.75) ** 2 / 0.3 + v * v / 0.12 + w * w / 0.2 < 1)
            hu[sinus] = self.hu["visceral_fat"]
            label[sinus] = 0

        return paint

    def _paint_great_vessels(self, hu, label, p: Points) -> None:
        sway = np.float32(3) * np.sin(p.z * np.float32(0.02))
        aorta = (p.x - np.float32(self.aorta[0]) - sway) ** 2 + (p.y - np.float32(self.aorta[1])) ** 2
        aorta = aorta < self.aorta_r**2
        ivc = ((p.x - np.float32(self.ivc[0])) / np.float32(self.ivc_semi[0])) ** 2 + (
            (p.y - np.float32(self.ivc[1])) / np.float32(self.ivc_semi[1])
        ) ** 2 < 1
        hu[ivc] = self.hu["vein"]
        hu[aorta] = self.hu["blood"]
        label[aorta | ivc] = 0

    def _paint_spine(self, hu, label, p: Points) -> None:
        x, y = p.x, p.y
        phase = np.mod(p.z - np.float32(self.vertebra_phase), np.float32(self.vertebra_period))
        disc = phase < self.disc
        body = (x / np.float32(self.vb_semi[0])) ** 2 + ((y - np.float32(self.vb_y)) / np.float32(self.vb_semi[1])) ** 2
        hu[body < 1] = self.hu["bone"]
        hu[(body < (1 - 3 / self.vb_semi.min()) ** 2) & ~disc] = self.hu["marrow"]
        hu[(body < 1) & disc] = self.hu["disc"]
        # Posterior elements (arch, pedicles, spinous and transverse processes) at vertebral levels.
        level = (phase > self.disc + 2) & (phase < self.vertebra_period - 3)
        dy = y - np.float32(self.canal_y)
        ring = x * x + dy * dy
        r = np.float32(self.canal_r)
        arch = (ring >= r * r) & (ring < (r + 6) ** 2) & (dy > -r * 0.6)
        pedicle = (np.abs(x) > r - 1) & (np.abs(x) < r + 6) & (y > self.vb_y) & (dy < 0)
        spinous = (np.abs(x) < 4) & (dy > r + 3) & (y < self.b_post - self.skin - 0.7 * self.fat - 15)
        spinous &= (phase > self.disc + 5) & (phase < self.disc + 17)
        transverse = (np.abs(x) > r + 4) & (np.abs(x) < r + 22) & (np.abs(dy) < 4) & (phase > self.disc + 8)
        bone = level & (arch | pedicle | spinous | transverse)
        hu[bone] = self.hu["bone"] * np.float32(0.7)
        canal = ring < r * r
        hu[canal] = self.hu["csf"]
        label[(body < 1) | bone | canal] = 0

    def _paint_ribs(self, hu, label, p: Points) -> None:
        fat = self.skin + self.fat_thickness(p.sine)
        # Ribs run in the muscle wall and, near the spine, dive in towards the vertebrae
        # (up to ~40 mm deeper); only voxels in that band are examined.
        band = (p.depth > fat - 2) & (p.depth < fat + self.muscle + 2 + 45 * np.clip((p.sine - 0.6) / 0.37, 0, 1))
        if not band.any():
            return
        q = p[band]
        angle = np.arccos(np.clip(q.sine, -1, 1))  # 0 straight behind, pi straight in front
        offset = q.depth - fat[band] - np.float32(self.muscle / 2)
        offset -= np.float32(60) * np.maximum(np.float32(0.9) - angle, 0)
        shift = np.where(q.x < 0, np.float32(self.rib_side_shift), np.float32(0))
        values = np.full(q.z.shape, np.nan, dtype=np.float32)
        radial = np.float32(min(5.0, self.muscle / 2 + 1))
        for head, slope, end in zip(self.rib_heads, self.rib_slope, self.rib_end):
            centre = np.float32(head) + shift - np.float32(slope) * (angle - np.float32(0.25))
            r2 = (offset / radial) ** 2 + ((q.z - centre) / np.float32(6)) ** 2
            rib = (r2 < 1) & (angle > 0.25) & (angle < end)
            values[rib] = np.where(
                angle[rib] > 2.3, np.float32(self.hu["cartilage"]),
                np.where(r2[rib] > 0.45, np.float32(self.hu["bone"]), np.float32(self.hu["marrow"])),
            )  # fmt: skip
        hit = ~np.isnan(values)
        block = hu[band]
        block[hit] = values[hit]
        hu[band] = block
        labels = label[band]
        labels[hit] = 0
        label[band] = labels
