"""A synthetic federation of contrast-enhanced abdominal CT phantoms, written exactly like real data.

Every phantom contains every organ, but each site labels only its own classes (the partial-label
setting ConDistFL addresses), and each site's scanner differs in voxel size, calibration, contrast
timing and noise, so the federation carries the label and domain shifts of real multi-site data.

Anatomy is built from implicit shapes evaluated on a smoothly warped world grid (RAS+ mm: +x to
the patient's right, +y anterior, +z superior) and painted in a fixed priority order, so
structures never overlap: a later structure overwrites an earlier one in the image and the label.
HU values follow portal-venous-phase CT. Everything is drawn from one numpy Generator per case.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from lightning_fl.labels import LabelSpace, LabelSpaceError

GENERATOR_VERSION = 1  # bump whenever the phantoms change, so a cached federation is not reused
MANIFEST = "synthetic.yaml"  # written beside the datalists: what the federation was generated from

# Organs every phantom draws; a label space must name them all.
ORGANS = ("liver", "spleen", "pancreas", "kidney")

FOV_MM = (300.0, 240.0, 220.0)  # x (left-right), y (posterior-anterior), z (inferior-superior)
PSF_SIGMA_VOXELS = 0.7  # scanner point-spread function, applied before the noise
DEFORMATION_RMS_MM = (5.0, 10.0)  # per-case range of the smooth warp's RMS displacement
DEFORMATION_CELL_MM = 50.0  # control-point spacing of the warp (its smoothness)
ORGAN_SCALE = (0.9, 1.1)  # per-case, per-organ isotropic size factor
ORGAN_JITTER_MM = 8.0  # per-case, per-organ position jitter (each axis, uniform ±)
PANCREAS_HEIGHT_RATIO = 1.4  # craniocaudal over anteroposterior calibre of the gland
TUMOR_DIAMETER_MM = (8.0, 35.0)
TUMORS_PER_ORGAN = (1, 3)  # inclusive range when an organ gets tumours
TEXTURE_HU = 5.0  # standard deviation of the smooth soft-tissue heterogeneity
TEXTURE_CELL_MM = 8.0
BOWEL_CELL_MM = 30.0  # scale of the random bowel-loop field

# Per-case HU draws (portal venous phase, before the scanner's offset and contrast scaling).
HU_RANGES: dict[str, tuple[float, float]] = {
    "fat": (-110.0, -90.0),
    "muscle": (40.0, 60.0),
    "liver": (100.0, 120.0),
    "spleen": (110.0, 130.0),
    "pancreas": (90.0, 110.0),
    "kidney": (150.0, 200.0),  # cortex
    "aorta": (150.0, 250.0),
    "ivc": (120.0, 160.0),
    "portal_vein": (150.0, 190.0),
    "gut_wall": (30.0, 50.0),
    "fluid": (0.0, 30.0),
    "bowel": (30.0, 60.0),
    "cortical_bone": (700.0, 1000.0),
    "cancellous_bone": (250.0, 400.0),
    "posterior_elements": (500.0, 800.0),
    "rib": (450.0, 750.0),
    "disc": (70.0, 100.0),
    "csf": (0.0, 20.0),
}
AIR_HU = -1000.0
KIDNEY_MEDULLA_DROP_HU = (15.0, 35.0)  # medulla is this much darker than the cortex
# Lesion HU by host organ; kidney lesions are a textured mixture spanning their whole range.
TUMOR_HU: dict[str, tuple[float, float]] = {
    "liver": (40.0, 80.0),
    "spleen": (40.0, 80.0),
    "pancreas": (50.0, 70.0),
    "kidney": (80.0, 140.0),
}
TEXTURED_TUMORS = frozenset({"kidney"})

_BSPLINE_VARIANCE = 151.0 / 315.0  # mean over a period of sum_k B3(t - k)^2, for unit-variance fields


# ----------------------------------------------------------------------------------------------
# Grid, fields and canvas


@dataclass(frozen=True)
class _Grid:
    """The voxel grid of one scan: RAS+ axes, centred on the world origin."""

    spacing: np.ndarray  # (3,) mm
    shape: tuple[int, int, int]

    @classmethod
    def for_spacing(cls, spacing_mm: Sequence[float]) -> "_Grid":
        spacing = np.asarray([float(s) for s in spacing_mm])
        if spacing.shape != (3,) or np.any(spacing <= 0):
            raise ValueError(f"spacing_mm must be three positive numbers, got {list(spacing_mm)}")
        shape = tuple(max(1, int(round(f / s))) for f, s in zip(FOV_MM, spacing))
        return cls(spacing, shape)  # type: ignore[arg-type]

    @property
    def origin(self) -> np.ndarray:
        return -(np.asarray(self.shape) - 1) / 2 * self.spacing

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def axis(self, a: int) -> np.ndarray:
        return (self.origin[a] + np.arange(self.shape[a]) * self.spacing[a]).astype(np.float32)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the world box [lo, hi] (clipped)."""
        first = np.ceil((np.asarray(lo) - self.origin) / self.spacing).astype(int)
        last = np.floor((np.asarray(hi) - self.origin) / self.spacing).astype(int) + 1
        return tuple(  # type: ignore[return-value]
            slice(int(np.clip(a, 0, n)), int(np.clip(max(a, b), 0, n))) for a, b, n in zip(first, last, self.shape)
        )


def _cubic_bspline(u: np.ndarray) -> np.ndarray:
    a = np.abs(u)
    return np.where(a < 1, 2 / 3 - a**2 + a**3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _smooth_fields(rng: np.random.Generator, grid: _Grid, cell_mm: float, count: int) -> np.ndarray:
    """`count` smooth random fields of unit variance: white noise on a coarse control grid,
    interpolated with separable cubic B-splines (three small matrix products, no full-size filter)."""
    mats = []
    for a in range(3):
        t = grid.axis(a).astype(np.float64)
        knots = np.arange(t[0] - 2 * cell_mm, t[-1] + 2 * cell_mm + 1e-6, cell_mm)
        mats.append(_cubic_bspline((t[:, None] - knots[None, :]) / cell_mm).astype(np.float32))
    coarse = rng.standard_normal((count, *(m.shape[1] for m in mats))).astype(np.float32)
    coarse /= np.float32(np.sqrt(_BSPLINE_VARIANCE**3))
    fields = coarse @ mats[2].T  # (count, kx, ky, Z)
    fields = np.einsum("nabz,yb->nayz", fields, mats[1], optimize=True)  # (count, kx, Y, Z)
    fields = np.tensordot(mats[0], fields, axes=([1], [1]))  # (X, count, Y, Z)
    return np.ascontiguousarray(np.moveaxis(fields, 1, 0))


@dataclass(frozen=True)
class _Body:
    """Per-case habitus: body outline and the factors that place organs relative to it."""

    half_width: float
    half_depth: float
    centre_y: float
    fat_mm: float
    muscle_mm: float

    def at(self, x: float, y: float, z: float) -> np.ndarray:
        """A nominal position (mm, for a 272 × 206 mm body centred at y = -5) in this body."""
        return np.array([x * self.half_width / 136.0, self.centre_y + (y + 5.0) * self.half_depth / 103.0, z])


class _Canvas:
    """Noiseless image and full label, painted in priority order on warped world coordinates."""

    def __init__(self, grid: _Grid, rng: np.random.Generator, contrast_scale: float) -> None:
        self.grid = grid
        self.contrast_scale = float(contrast_scale)
        rms = rng.uniform(*DEFORMATION_RMS_MM)
        warp = _smooth_fields(rng, grid, DEFORMATION_CELL_MM, 3) * np.float32(rms / np.sqrt(3))
        self.reach = np.abs(warp).reshape(3, -1).max(axis=1)  # how far a shape can move, per axis
        axes = [grid.axis(a) for a in range(3)]
        self.world = (
            warp[0] + axes[0][:, None, None],
            warp[1] + axes[1][None, :, None],
            warp[2] + axes[2][None, None, :],
        )
        self.image = np.full(grid.shape, AIR_HU, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.cavity = np.zeros(grid.shape, dtype=bool)

    def region(self, centre: np.ndarray, half: Union[float, np.ndarray]) -> tuple[slice, slice, slice]:
        """Voxels whose warped coordinates can fall in the world box centre ± half."""
        return self.grid.box(centre - half - self.reach, centre + half + self.reach)

    def coords(self, sl: tuple[slice, ...], centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(w[sl] - np.float32(c) for w, c in zip(self.world, centre))  # type: ignore[return-value]

    def paint(
        self,
        sl: tuple[slice, ...],
        mask: np.ndarray,
        hu: Union[float, np.ndarray],
        label: int = 0,
        enhanced: bool = False,
    ) -> None:
        """Overwrite image and label under `mask`; contrast scales enhancement above water."""
        scale = self.contrast_scale if enhanced else 1.0
        self.image[sl][mask] = (hu[mask] if isinstance(hu, np.ndarray) else hu) * scale
        self.label[sl][mask] = label


# ----------------------------------------------------------------------------------------------
# Shape primitives (vectorised implicit functions; <= 1 means inside)


def _pose(rng: np.random.Generator, centre: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-case position jitter and size of one organ."""
    return centre + rng.uniform(-ORGAN_JITTER_MM, ORGAN_JITTER_MM, 3), float(rng.uniform(*ORGAN_SCALE))


def _frame(axis: Sequence[float], towards: Sequence[float]) -> np.ndarray:
    """Orthonormal columns (u, w, v): u along `axis`, w the part of `towards` orthogonal to u."""
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    w = np.asarray(towards, float) - np.dot(towards, u) * u
    w /= np.linalg.norm(w)
    return np.stack([u, w, np.cross(u, w)], axis=1)


def _local(p: tuple[np.ndarray, ...], rot: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """Coordinates relative to a centre expressed in the frame `rot`, divided by the organ scale."""
    return tuple(sum(np.float32(rot[i, j] / scale) * p[i] for i in range(3)) for j in range(3))


def _ellipsoid(p: tuple[np.ndarray, ...], semi: Sequence[float]) -> np.ndarray:
    return sum((c / np.float32(s)) ** 2 for c, s in zip(p, semi))


def _tube(p: tuple[np.ndarray, ...], points: np.ndarray, radii: np.ndarray, samples: int = 4) -> np.ndarray:
    """Distance to a smooth curve through `points` over the local radius (<= 1 inside)."""
    t = np.arange(len(points))
    fine = np.linspace(0, len(points) - 1, samples * (len(points) - 1) + 1)
    curve = CubicSpline(t, points)(fine).astype(np.float32)
    rad = np.interp(fine, t, radii).astype(np.float32)
    best = np.full(p[0].shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(curve[:-1], curve[1:], rad[:-1], rad[1:]):
        ab = b - a
        s = np.clip(sum((p[i] - a[i]) * ab[i] for i in range(3)) / np.dot(ab, ab), 0, 1)
        d2 = sum((p[i] - a[i] - s * ab[i]) ** 2 for i in range(3))
        np.minimum(best, d2 / (ra + s * (rb - ra)) ** 2, out=best)
    return best


# ----------------------------------------------------------------------------------------------
# Anatomy, in painting (priority) order


def _paint_body(c: _Canvas, rng: np.random.Generator, hu: dict[str, float]) -> _Body:
    """Elliptic trunk: subcutaneous fat, a muscle wall, and the fat-filled abdominal cavity."""
    body = _Body(
        half_width=136.0 * rng.uniform(0.92, 1.0),
        half_depth=103.0 * rng.uniform(0.92, 1.0),
        centre_y=-5.0,
        fat_mm=rng.uniform(15.0, 25.0),
        muscle_mm=rng.uniform(8.0, 12.0),
    )
    full = (slice(None),) * 3
    x2 = c.world[0] ** 2
    y2 = (c.world[1] - np.float32(body.centre_y)) ** 2
    for inset, tissue in ((0.0, "fat"), (body.fat_mm, "muscle"), (body.fat_mm + body.muscle_mm, "fat")):
        inside = x2 / np.float32((body.half_width - inset) ** 2) + y2 / np.float32((body.half_depth - inset) ** 2) <= 1
        c.paint(full, inside, hu[tissue])
    c.cavity = inside  # the innermost ellipse
    return body


def _paint_bowel(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float]) -> None:
    """Small-bowel and colon loops in the lower and anterior cavity: thick random curves (where two
    smooth random fields are both near zero), with gas bubbles, between mesenteric fat."""
    f1, f2, gas = _smooth_fields(rng, c.grid, BOWEL_CELL_MM, 3)
    y = c.world[1] - np.float32(body.at(0, 30, 0)[1])
    z = c.world[2]
    region = c.cavity & ((z < 15) | ((y > 0) & (z < 55)))
    loops = region & (np.abs(f1) < 0.8) & (np.abs(f2) < 0.8)
    full = (slice(None),) * 3
    c.paint(full, loops, hu["bowel"])
    c.paint(full, loops & (gas > 1.3), AIR_HU)


def _paint_duodenum(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float]) -> None:
    """C-loop around the pancreatic head: wall with fluid contents."""
    points = np.array([body.at(*p) for p in [(20, 42, 15), (46, 28, 8), (56, 8, -10), (48, -6, -28), (24, 4, -38), (0, 14, -36)]])
    centre, scale = _pose(rng, points.mean(axis=0))
    points = centre + scale * (points - points.mean(axis=0))
    radius = 11.0 * scale
    sl = c.region(centre, np.ptp(points, axis=0) / 2 + radius)
    dist = _tube(c.coords(sl, np.zeros(3)), points, np.full(len(points), radius))
    cavity = c.cavity[sl]
    c.paint(sl, (dist <= 1) & cavity, hu["gut_wall"])
    c.paint(sl, (dist <= 0.55) & cavity, hu["fluid"])


def _paint_stomach(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float]) -> None:
    """Left upper quadrant: wall, fluid, and an anterior (non-dependent, patient supine) air pocket."""
    centre, scale = _pose(rng, body.at(-45, 10, 55))
    semi = np.array([36.0, 28.0, 45.0])
    sl = c.region(centre, semi * scale)
    x, y, z = (v / np.float32(scale) for v in c.coords(sl, centre))
    cavity = c.cavity[sl]
    c.paint(sl, (_ellipsoid((x, y, z), semi) <= 1) & cavity, hu["gut_wall"])
    lumen = (_ellipsoid((x, y, z), semi - 5.0) <= 1) & cavity
    c.paint(sl, lumen, hu["fluid"])
    c.paint(sl, lumen & (y > semi[1] * rng.uniform(0.2, 0.5)), AIR_HU)


def _paint_liver(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float], label: int) -> None:
    """Right upper quadrant up to the dome: a wedge whose left lobe thins, rises and moves anterior."""
    centre, scale = _pose(rng, body.at(25, 5, 50))
    half = np.array([95.0, 80.0, 80.0])
    sl = c.region(centre + np.array([0.0, 30.0, 8.0]) * scale, (half + [0.0, 30.0, 8.0]) * scale)
    x, y, z = (v / np.float32(scale) for v in c.coords(sl, centre))
    u = np.clip(x / np.float32(half[0]), -1, 1)
    right = (u + 1) / 2  # 0 at the left tip, 1 at the right border
    left = np.maximum(-u, 0)
    thick_y = half[1] * (0.25 + 0.75 * right**1.3)
    thick_z = half[2] * (0.45 + 0.55 * right)
    q = u**2 + ((y - 60 * left) / thick_y) ** 2 + ((z - 15 * left) / thick_z) ** 2
    c.paint(sl, (q <= 1) & (np.abs(x) <= half[0]) & c.cavity[sl], hu["liver"], label, enhanced=True)


def _paint_spleen(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float], label: int) -> None:
    """Left posterior upper quadrant: a crescent, long axis along the ribs, hilum facing medially."""
    centre, scale = _pose(rng, body.at(-82, -30, 45))
    rot = _frame(axis=(0.0, -0.5, 1.0), towards=(0.0, 1.0, 0.0))  # u: to the upper pole; v: lateral
    semi = (55.0, 30.0, 22.0)
    sl = c.region(centre, 60.0 * scale)
    u, w, v = _local(c.coords(sl, centre), rot, scale)
    medial = -v  # rot's v = u × w points to the patient's left (lateral) for this frame
    bent = medial - 0.005 * (u**2 + w**2)  # tips curve medially: concave hilum
    c.paint(sl, (_ellipsoid((u, w, bent), semi) <= 1) & c.cavity[sl], hu["spleen"], label, enhanced=True)


def _pancreas_curve(body: _Body) -> tuple[np.ndarray, np.ndarray]:
    """Head (right, lower, by the duodenum) → neck → body (anterior to the aorta) → tail (spleen hilum)."""
    points = np.array([body.at(*p) for p in [(36, 10, -12), (22, 26, -2), (0, 30, 5), (-34, 20, 15), (-62, -6, 26)]])
    return points, np.array([16.0, 13.0, 12.5, 12.0, 11.5])


def _paint_pancreas(
    c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float], label: int
) -> tuple[np.ndarray, np.ndarray]:
    """An elongated tube of varying calibre across the midline, taller (craniocaudal) than deep like
    the real gland; returns its posed curve (for the splenic vein)."""
    points, radii = _pancreas_curve(body)
    centre, scale = _pose(rng, points.mean(axis=0))
    points = centre + scale * (points - points.mean(axis=0))
    radii = radii * scale * rng.uniform(0.9, 1.1, len(radii))
    sl = c.region(centre, np.ptp(points, axis=0) / 2 + radii.max() * np.array([1, 1, PANCREAS_HEIGHT_RATIO]))
    x, y, z = c.coords(sl, np.zeros(3))
    squash = np.array([1.0, 1.0, 1.0 / PANCREAS_HEIGHT_RATIO], dtype=np.float32)
    dist = _tube((x, y, centre[2] + (z - centre[2]) * squash[2]), centre + (points - centre) * squash, radii)
    c.paint(sl, (dist <= 1) & c.cavity[sl], hu["pancreas"], label, enhanced=True)
    return points, radii


def _paint_kidneys(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float], label: int) -> None:
    """Paraspinal beans, the right one lower; long axis craniocaudal with the upper pole tilted
    medially and posteriorly, hilum facing anteromedially; cortex brighter than medulla."""
    shared_z = rng.uniform(-ORGAN_JITTER_MM, ORGAN_JITTER_MM)
    medulla = hu["kidney"] - rng.uniform(*KIDNEY_MEDULLA_DROP_HU)
    for side, z in ((-1.0, -5.0), (1.0, -22.0)):  # left (−x), right (+x)
        centre, scale = _pose(rng, body.at(70 * side, -40, z))
        # The pair moves together craniocaudally, so the right kidney stays the lower one.
        centre[2] = z + shared_z + rng.uniform(-3.0, 3.0)
        rot = _frame(axis=(-0.25 * side, -0.15, 1.0), towards=(-side, 0.7, 0.0))  # w: to the hilum
        semi = (55.0, 27.0, 22.0)
        sl = c.region(centre, 60.0 * scale)
        u, w, v = _local(c.coords(sl, centre), rot, scale)
        w = w - 0.004 * u**2  # poles curve toward the hilum side
        notch = _ellipsoid((u, w - 25.0, v), (22.0, 14.0, 12.0)) <= 1
        q = _ellipsoid((u, w, v), semi)
        cavity = c.cavity[sl]
        c.paint(sl, (q <= 1) & ~notch & cavity, hu["kidney"], label, enhanced=True)
        c.paint(sl, (q <= 0.4) & ~notch & cavity, medulla, label, enhanced=True)


def _paint_veins(
    c: _Canvas, rng: np.random.Generator, hu: dict[str, float], pancreas: tuple[np.ndarray, np.ndarray]
) -> None:
    """Splenic vein along the back of the pancreas, joining the portal vein to the liver hilum."""
    points, radii = pancreas
    splenic = points[1:] - np.stack([np.zeros_like(radii[1:]), radii[1:] + 2.5, np.zeros_like(radii[1:])], axis=1)
    portal = np.array([splenic[0], splenic[0] + [12.0, -2.0, 18.0], splenic[0] + [22.0, -4.0, 38.0]])
    for path, radius in ((splenic, 4.5), (portal, 7.0)):
        centre = path.mean(axis=0)
        sl = c.region(centre, np.ptp(path, axis=0) / 2 + radius)
        dist = _tube(c.coords(sl, np.zeros(3)), path, np.full(len(path), radius * rng.uniform(0.85, 1.15)))
        c.paint(sl, (dist <= 1) & c.cavity[sl], hu["portal_vein"], enhanced=True)


def _paint_great_vessels(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float]) -> None:
    """Aorta left-anterior of the spine; IVC right-anterior, turning anteriorly into the liver."""
    aorta_radius = rng.uniform(9.0, 12.0)
    aorta = body.at(-14, 4, 0)
    sl = c.region(aorta, np.array([aorta_radius, aorta_radius, FOV_MM[2]]))
    x, y, _ = c.coords(sl, aorta)
    c.paint(sl, x**2 + y**2 <= aorta_radius**2, hu["aorta"], enhanced=True)
    ivc = body.at(22, 4, 0)
    sl = c.region(ivc + [6.0, 12.0, 0.0], np.array([20.0, 25.0, FOV_MM[2]]))
    x, y, z = c.coords(sl, ivc)
    rise = np.maximum(z - 30, 0)
    c.paint(sl, ((x - 0.1 * rise) / 13) ** 2 + ((y - 0.25 * rise) / 9) ** 2 <= 1, hu["ivc"], enhanced=True)


def _paint_muscles(c: _Canvas, spine_y: float, hu: dict[str, float]) -> None:
    """Paraspinal muscles behind the spine; psoas beside it, growing toward the pelvis."""
    for side in (-1.0, 1.0):
        centre = np.array([28.0 * side, spine_y - 45.0, 0.0])
        sl = c.region(centre, np.array([22.0, 20.0, FOV_MM[2]]))
        x, y, _ = c.coords(sl, centre)
        c.paint(sl, (x / 22) ** 2 + (y / 20) ** 2 <= 1, hu["muscle"])
        centre = np.array([40.0 * side, spine_y, 0.0])
        sl = c.region(centre, np.array([25.0, 30.0, FOV_MM[2]]))
        x, y, z = c.coords(sl, centre)
        radius = 17.0 * np.clip((70.0 - z) / 140.0, 0, 1) ** 0.7
        c.paint(sl, (x - side * (radius - 16)) ** 2 + (y - 0.1 * np.maximum(-z, 0)) ** 2 <= radius**2, hu["muscle"])


def _paint_ribs(c: _Canvas, body: _Body, hu: dict[str, float]) -> None:
    """Lower ribs in the upper-abdominal wall, descending as they wrap from the back forward."""
    top = np.array([0.0, body.centre_y, 0.0])
    sl = c.region(np.array([0.0, 0.0, 50.0]), np.array([FOV_MM[0], FOV_MM[1], 90.0]))  # rib levels reach z ≈ -35
    x, y, z = c.coords(sl, top)
    angle = np.abs(np.arctan2(x, -y))  # 0 at the back, pi at the front
    mid = body.fat_mm + body.muscle_mm / 2
    inner, outer = ((x / (body.half_width - i)) ** 2 + (y / (body.half_depth - i)) ** 2 for i in (mid + 3.5, mid - 3.5))
    shell = (inner > 1) & (outer <= 1) & (angle > 0.35) & (angle < 2.2)
    level = z + 35.0 * angle / np.pi
    ribs = shell & (np.abs((level - 5.0) % 30.0 - 15.0) < 4.5) & (level < 110.0) & (level > -10.0)
    c.paint(sl, ribs, hu["rib"])


def _paint_spine(c: _Canvas, rng: np.random.Generator, spine_y: float, hu: dict[str, float]) -> None:
    """Vertebrae (cortical rim, cancellous core), discs, canal, posterior arch and processes."""
    centre = np.array([0.0, spine_y, 0.0])
    semi = np.array([22.0, 17.0]) * rng.uniform(0.95, 1.05)
    period = rng.uniform(32.0, 36.0)
    disc_h = rng.uniform(7.0, 9.0)
    sl = c.region(centre + [0.0, -20.0, 0.0], np.array([48.0, 50.0, FOV_MM[2]]))
    x, y, z = c.coords(sl, centre)
    level = (z - rng.uniform(0, period)) % np.float32(period)
    disc = level < disc_h
    q = (x / semi[0]) ** 2 + (y / semi[1]) ** 2
    body = (q <= 1) & ~disc
    rim = (q > (1 - 3.0 / semi.min()) ** 2) | (level < disc_h + 2.5) | (level > period - 2.5)
    c.paint(sl, (q <= 1) & disc, hu["disc"])
    c.paint(sl, body, hu["cancellous_bone"])
    c.paint(sl, body & rim, hu["cortical_bone"])
    canal_y = -semi[1] - 10.0
    r = np.sqrt(x**2 + (y - canal_y) ** 2)
    mid = (level > disc_h + 3) & (level < period - 2)
    arch = (r <= 16) & (r > 9) & ~disc
    spinous = (np.abs(x) < 4) & (y < canal_y - 12) & (y > canal_y - 38) & mid
    transverse = (np.abs(y - canal_y - 4) < 5) & (np.abs(x) > 12) & (np.abs(x) < 45) & (level > disc_h + 8) & (level < disc_h + 17)
    c.paint(sl, arch | spinous | transverse, hu["posterior_elements"])
    c.paint(sl, r <= 9, hu["csf"])


def _paint_tumours(
    c: _Canvas, rng: np.random.Generator, labels: LabelSpace, tumor_probability: float
) -> None:
    """1–3 lesions per organ that has a tumour class (with probability `tumor_probability`), each an
    ellipsoid inside a sphere whose centre is at least radius + one voxel deep in the organ, so a
    lesion and its one-voxel shell always lie inside the organ."""
    for organ in ORGANS:
        classes = [labels.index(t) for t, o in labels.tumor_of.items() if o == organ]
        if not classes or rng.random() >= tumor_probability:
            continue
        organ_mask = c.label == labels.index(organ)
        if not organ_mask.any():
            continue
        box = ndimage.find_objects(organ_mask.view(np.uint8))[0]
        depth = ndimage.distance_transform_edt(np.pad(organ_mask[box], 1), sampling=c.grid.spacing)[1:-1, 1:-1, 1:-1]
        margin = float(c.grid.spacing.max())
        for _ in range(rng.integers(TUMORS_PER_ORGAN[0], TUMORS_PER_ORGAN[1] + 1)):
            radius = min(rng.uniform(*TUMOR_DIAMETER_MM) / 2, float(depth.max()) - margin - 1e-3)
            if radius < TUMOR_DIAMETER_MM[0] / 2:
                break
            seed = np.unravel_index(rng.choice(np.flatnonzero(depth > radius + margin)), depth.shape)
            index = np.array([b.start + s for b, s in zip(box, seed)])
            reach = np.ceil(radius / c.grid.spacing).astype(int)
            sl = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(index, reach))
            p = [c.grid.axis(a)[sl[a]] - c.grid.axis(a)[index[a]] for a in range(3)]
            grid = (p[0][:, None, None], p[1][None, :, None], p[2][None, None, :])
            local = _local(grid, Rotation.random(rng=rng).as_matrix(), 1.0)
            inside = (_ellipsoid(local, radius * rng.uniform(0.75, 1.0, 3)) <= 1) & organ_mask[sl]
            c.paint(sl, inside, _tumour_hu(rng, organ, inside), int(rng.choice(classes)), enhanced=True)


def _tumour_hu(rng: np.random.Generator, organ: str, inside: np.ndarray) -> Union[float, np.ndarray]:
    """One value per lesion, or for heterogeneous lesions a smooth texture stretched over the range."""
    lo, hi = TUMOR_HU[organ]
    if organ not in TEXTURED_TUMORS:
        return float(rng.uniform(lo, hi))
    texture = ndimage.gaussian_filter(rng.standard_normal(inside.shape).astype(np.float32), 1.0)
    t_lo, t_hi = texture[inside].min(), texture[inside].max()
    return lo + (hi - lo) * (texture - t_lo) / max(float(t_hi - t_lo), 1e-6)


def _acquire(c: _Canvas, rng: np.random.Generator, scanner) -> np.ndarray:
    """Scanner: soft-tissue heterogeneity, PSF blur, Gaussian noise, calibration offset, int16."""
    texture = _smooth_fields(rng, c.grid, TEXTURE_CELL_MM, 1)[0]
    soft = (c.image > -500) & (c.image < 300)
    image = c.image + np.float32(TEXTURE_HU) * texture * soft
    image = ndimage.gaussian_filter(image, PSF_SIGMA_VOXELS)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(scanner.noise_hu)
    image += np.float32(scanner.hu_offset)
    info = np.iinfo(np.int16)
    return np.clip(np.rint(image), info.min, info.max).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Public API


def make_phantom(
    rng: np.random.Generator, scanner, labels: LabelSpace, tumor_probability: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scan: (image HU int16 [X,Y,Z], full label uint8 [X,Y,Z] in `labels`' space, RAS+ affine).

    Uses the scanner's spacing_mm, hu_offset, contrast_scale and noise_hu (not its case counts). Every
    organ is drawn; tumour classes of other organs than ORGANS never appear."""
    organ_label = _organ_indices(labels)
    grid = _Grid.for_spacing(scanner.spacing_mm)
    c = _Canvas(grid, rng, scanner.contrast_scale)
    hu = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in HU_RANGES.items()}
    body = _paint_body(c, rng, hu)
    _paint_bowel(c, rng, body, hu)
    _paint_duodenum(c, rng, body, hu)
    _paint_stomach(c, rng, body, hu)
    _paint_liver(c, rng, body, hu, organ_label["liver"])
    _paint_spleen(c, rng, body, hu, organ_label["spleen"])
    pancreas = _paint_pancreas(c, rng, body, hu, organ_label["pancreas"])
    _paint_kidneys(c, rng, body, hu, organ_label["kidney"])
    _paint_veins(c, rng, hu, pancreas)
    _paint_great_vessels(c, rng, body, hu)
    spine_y = float(body.at(0, -27, 0)[1])
    _paint_muscles(c, spine_y, hu)
    _paint_ribs(c, body, hu)
    _paint_spine(c, rng, spine_y, hu)
    _paint_tumours(c, rng, labels, tumor_probability)
    return _acquire(c, rng, scanner), c.label, grid.affine


def manifest_text(synthetic, sites, labels: LabelSpace) -> str:
    """The generator version and every setting a federation depends on, as YAML."""
    return OmegaConf.to_yaml({
        "generator_version": GENERATOR_VERSION,
        "labels": {"classes": list(labels.classes), "tumors": dict(labels.tumor_of)},
        "sites": [OmegaConf.to_container(OmegaConf.create(site)) for site in sites],
        "synthetic": OmegaConf.to_container(OmegaConf.create(synthetic)),
    })


def write_federation(out_dir: Path, synthetic, sites, labels: LabelSpace, progress: bool = False) -> None:
    """Write every site's images, labels and datalist under `out_dir`, atomically: the federation is
    built in a hidden sibling folder and renamed into place only when complete."""
    out_dir = Path(out_dir)
    _organ_indices(labels)
    for key in ("name", "datalist"):
        values = [str(getattr(site, key)) for site in sites]
        if len(set(values)) != len(values):
            raise ValueError(f"synthetic sites need distinct {key}s, got {values}")
    plan = [(site, _scanner_of(synthetic, site), labels.annotation_lut(site.classes, f"site '{site.name}'")) for site in sites]
    if out_dir.exists():
        raise FileExistsError(f"synthetic data folder already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cases = [case for site, scanner, lut in plan for case in _write_datalist(tmp, site, scanner, lut)]
        jobs = [(tmp, case, synthetic.seed, synthetic.tumor_probability, labels) for case in cases]
        workers = min(os.cpu_count() or 1, len(jobs))
        bar_off = None if progress else True  # tqdm's None: a bar on terminals only
        with tqdm(total=len(jobs), desc="synthetic federation", unit="case", disable=bar_off) as bar:
            if workers <= 1:
                for job in jobs:
                    _write_case(job)
                    bar.update()
            else:  # cases are independent (one generator each): a process per core, spawned, not forked
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    for _ in pool.map(_write_case, jobs):
                        bar.update()
        (tmp / MANIFEST).write_text(manifest_text(synthetic, sites, labels))
        if out_dir.exists():
            raise FileExistsError(f"synthetic data folder appeared while generating: {out_dir}")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Writing


def _organ_indices(labels: LabelSpace) -> dict[str, int]:
    missing = [o for o in ORGANS if o not in labels.classes]
    if missing:
        raise LabelSpaceError(
            f"synthetic phantoms draw {list(ORGANS)}, but labels.classes {list(labels.classes)} lacks {missing}"
        )
    return {o: labels.index(o) for o in ORGANS}


def _scanner_of(synthetic, site):
    """The site's scanner, with its name and datalist checked to stay inside the output folder."""
    if site.name not in synthetic.scanners:
        raise ValueError(f"data.synthetic.scanners has no entry for site '{site.name}'")
    if not site.name or Path(site.name).name != site.name or site.name in (".", ".."):
        raise ValueError(f"site name '{site.name}' cannot be used as a folder name")
    datalist = Path(site.datalist)
    if datalist.is_absolute() or ".." in datalist.parts:
        raise ValueError(f"site '{site.name}': datalist '{site.datalist}' must be a path inside the data folder")
    scanner = synthetic.scanners[site.name]
    if min(scanner.train, scanner.validation, scanner.test) < 0:
        raise ValueError(f"data.synthetic.scanners.{site.name}: case counts must be ≥ 0")
    return scanner


def _case_rng(seed: int, site_name: str, case: int) -> np.random.Generator:
    """Independent of generation order and of Python's salted hash()."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(site_name.encode("utf-8")), case]))


@dataclass(frozen=True)
class _Case:
    """One phantom to generate: where it goes, how it is drawn and what its site annotates."""

    site: str
    index: int
    image: str
    label: str
    scanner: object
    lut: np.ndarray


def _write_datalist(root: Path, site, scanner, lut: np.ndarray) -> list[_Case]:
    """Write the site's datalist and folders; return its cases, numbered across the splits."""
    for sub in ("images", "labels"):
        (root / site.name / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, str]]] = {}
    cases: list[_Case] = []
    for split, count in (("training", scanner.train), ("validation", scanner.validation), ("testing", scanner.test)):
        splits[split] = []
        for _ in range(count):
            index = len(cases)
            entry = {kind: f"{site.name}/{kind}s/{site.name}_{index:03d}.nii.gz" for kind in ("image", "label")}
            splits[split].append(entry)
            cases.append(_Case(site.name, index, entry["image"], entry["label"], scanner, lut))
    datalist = root / site.datalist
    datalist.parent.mkdir(parents=True, exist_ok=True)
    datalist.write_text(json.dumps({"name": site.name, "classes": list(site.classes), **splits}, indent=2) + "\n")
    return cases


def _write_case(job: tuple[Path, _Case, int, float, LabelSpace]) -> None:
    root, case, seed, tumor_probability, labels = job
    image, label, affine = make_phantom(_case_rng(seed, case.site, case.index), case.scanner, labels, tumor_probability)
    _save_nifti(root / case.image, image, affine)
    _save_nifti(root / case.label, case.lut[label], affine)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
