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
import math
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from lightning_fl.config import PHASES, SiteConfig, SyntheticConfig
from lightning_fl.labels import LabelSpace, LabelSpaceError

GENERATOR_VERSION = 2  # bump whenever the phantoms change, so a cached federation is not reused
MANIFEST = "synthetic.yaml"  # written beside the datalists: what the federation was generated from

# Organs every phantom draws; a label space must name them all.
ORGANS = ("liver", "spleen", "pancreas", "kidney")

PSF_SIGMA_VOXELS = 0.7  # scanner point-spread function, applied before the noise
DEFORMATION_RMS_MM = (5.0, 10.0)  # per-case range of the smooth warp's RMS displacement
DEFORMATION_CELL_MM = 50.0  # control-point spacing of the warp (its smoothness)
ORGAN_SCALE = (0.85, 1.15)  # per-case, per-organ overall size factor
ORGAN_STRETCH = 0.1  # and a per-axis stretch of ± this much on top: organs vary in shape
ORGAN_JITTER_MM = 12.0  # per-case, per-organ position jitter (each axis, uniform ±)
PANCREAS_HEIGHT_RATIO = 1.4  # craniocaudal over anteroposterior calibre of the gland
GALLBLADDER_PROBABILITY = 0.8  # the rest: contracted or removed (a fluid-filled neighbour of the liver)
TEXTURE_HU = 5.0  # standard deviation of the smooth soft-tissue heterogeneity
TEXTURE_CELL_MM = 8.0
BOWEL_CELL_MM = 30.0  # scale of the random bowel-loop field

# Per-case HU draws, before the scanner's offset and contrast scaling. Portal venous phase: the
# usual ranges of contrast-enhanced abdominal CT (normal liver above 90 HU: Moeller, Pickhardt et
# al., ARRS 2024, abstract 4710; renal cortex enhancing by about 200 HU: PubMed 17367973). Unenhanced:
# liver 58.8 ± 10.8 HU in 3,357 adults (Boyce, Pickhardt et al., 2010), spleen 1-18 HU below the
# liver (Park et al., Radiology 2011;258:760-6; so drawn relative to the liver, in _draw_hu),
# pancreas 46.9 HU (37 controls, ejmcm.com article 23496), renal parenchyma 29.6 ± 3.0 HU
# (PubMed 21388763), aortic blood 39-50 HU (interquartile range, Research Square rs-1420003), fat
# -123 to -89 HU (PubMed 37296765); muscle 40-60 HU in both phases (a textbook value, no
# healthy-population source found). Without contrast the four organs lie within about 30 HU of each
# other and of muscle, where the portal venous phase separates them by up to 150 HU.
HU_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "portal_venous": {
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
    },
    "unenhanced": {
        "fat": (-110.0, -90.0),
        "muscle": (40.0, 60.0),
        "liver": (50.0, 68.0),
        "pancreas": (40.0, 52.0),
        "kidney": (26.0, 34.0),  # no corticomedullary difference without contrast
        "aorta": (39.0, 50.0),
        "ivc": (36.0, 48.0),
        "portal_vein": (36.0, 48.0),
        "gut_wall": (30.0, 45.0),
        "fluid": (0.0, 20.0),
        "bowel": (20.0, 45.0),
        "cortical_bone": (700.0, 1000.0),
        "cancellous_bone": (200.0, 350.0),
        "posterior_elements": (500.0, 800.0),
        "rib": (450.0, 750.0),
        "disc": (70.0, 100.0),
        "csf": (0.0, 15.0),
    },
}
UNENHANCED_SPLEEN_BELOW_LIVER_HU = (1.0, 18.0)
AIR_HU = -1000.0
# The medulla is this much darker than the cortex in the portal venous (nephrographic) phase.
KIDNEY_MEDULLA_DROP_HU = {"portal_venous": (15.0, 35.0), "unenhanced": (0.0, 0.0)}

_BSPLINE_VARIANCE = 151.0 / 315.0  # mean over a period of sum_k B3(t - k)^2, for unit-variance fields


# ----------------------------------------------------------------------------------------------
# Grid, fields and canvas


@dataclass(frozen=True)
class _Grid:
    """The voxel grid of one scan: RAS+ axes, centred on the world origin."""

    spacing: np.ndarray  # (3,) mm
    shape: tuple[int, int, int]

    @classmethod
    def for_scan(cls, spacing_mm: Sequence[float], fov_mm: Sequence[float]) -> _Grid:
        """The grid that covers the field of view `fov_mm` (x, y, z) at `spacing_mm`."""
        spacing, fov = (np.asarray([float(v) for v in values]) for values in (spacing_mm, fov_mm))
        if spacing.shape != (3,) or np.any(spacing <= 0):
            raise ValueError(f"spacing_mm must be three positive numbers, got {list(spacing_mm)}")
        if fov.shape != (3,) or np.any(fov <= 0):
            raise ValueError(f"fov_mm must be three positive numbers, got {list(fov_mm)}")
        shape = tuple(max(1, int(round(f / s))) for f, s in zip(fov, spacing))
        return cls(spacing, shape)  # type: ignore[arg-type]

    @property
    def fov(self) -> np.ndarray:
        return np.asarray(self.shape) * self.spacing

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
        """A nominal position (mm, for a 272 × 206 mm body centred at y = -5, with 20 mm of fat and
        10 mm of muscle wall) in this body: organs follow the abdominal cavity, not the skin."""
        wall = self.fat_mm + self.muscle_mm
        return np.array(
            [x * (self.half_width - wall) / 106.0, self.centre_y + (y + 5.0) * (self.half_depth - wall) / 73.0, z]
        )


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

    def region(self, centre: np.ndarray, half: float | np.ndarray) -> tuple[slice, slice, slice]:
        """Voxels whose warped coordinates can fall in the world box centre ± half."""
        return self.grid.box(centre - half - self.reach, centre + half + self.reach)

    def coords(self, sl: tuple[slice, ...], centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(w[sl] - np.float32(c) for w, c in zip(self.world, centre))  # type: ignore[return-value]

    def paint(
        self,
        sl: tuple[slice, ...],
        mask: np.ndarray,
        hu: float | np.ndarray,
        label: int = 0,
        enhanced: bool = False,
    ) -> None:
        """Overwrite image and label under `mask`; contrast scales enhancement above water."""
        scale = self.contrast_scale if enhanced else 1.0
        self.image[sl][mask] = (hu[mask] if isinstance(hu, np.ndarray) else hu) * scale
        self.label[sl][mask] = label


# ----------------------------------------------------------------------------------------------
# Shape primitives (vectorised implicit functions; <= 1 means inside)


def _pose(rng: np.random.Generator, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-case position jitter and size of one organ: an overall size factor times a per-axis
    stretch (x, y, z), so organs vary in shape as well as in size."""
    scale = rng.uniform(*ORGAN_SCALE) * rng.uniform(1 - ORGAN_STRETCH, 1 + ORGAN_STRETCH, 3)
    return centre + rng.uniform(-ORGAN_JITTER_MM, ORGAN_JITTER_MM, 3), scale


def _frame(axis: Sequence[float], towards: Sequence[float]) -> np.ndarray:
    """Orthonormal columns (u, w, v): u along `axis`, w the part of `towards` orthogonal to u."""
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    w = np.asarray(towards, float) - np.dot(towards, u) * u
    w /= np.linalg.norm(w)
    return np.stack([u, w, np.cross(u, w)], axis=1)


def _local(p: tuple[np.ndarray, ...], rot: np.ndarray, scale: float | np.ndarray) -> tuple[np.ndarray, ...]:
    """Coordinates relative to a centre, divided by the organ's per-axis (world) scale, then
    expressed in the frame `rot`."""
    scale = np.broadcast_to(np.asarray(scale, dtype=float), (3,))
    return tuple(sum(np.float32(rot[i, j] / scale[i]) * p[i] for i in range(3)) for j in range(3))


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


def _paint_body(c: _Canvas, rng: np.random.Generator, hu: dict[str, float], scanner) -> _Body:
    """Elliptic trunk: subcutaneous fat, a muscle wall, and the fat-filled abdominal cavity; the
    site's population sets the habitus (trunk size and subcutaneous fat)."""
    size = rng.uniform(*scanner.body_scale)
    body = _Body(
        half_width=136.0 * size * rng.uniform(0.95, 1.05),
        half_depth=103.0 * size * rng.uniform(0.95, 1.05),
        centre_y=-5.0,
        fat_mm=rng.uniform(*scanner.fat_mm),
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
    points = np.array(
        [body.at(*p) for p in [(20, 42, 15), (46, 28, 8), (56, 8, -10), (48, -6, -28), (24, 4, -38), (0, 14, -36)]]
    )
    centre, scale = _pose(rng, points.mean(axis=0))
    points = centre + scale * (points - points.mean(axis=0))
    radius = 11.0 * float(scale.mean())
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
    x, y, z = (v / np.float32(s) for v, s in zip(c.coords(sl, centre), scale))
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
    x, y, z = (v / np.float32(s) for v, s in zip(c.coords(sl, centre), scale))
    u = np.clip(x / np.float32(half[0]), -1, 1)
    right = (u + 1) / 2  # 0 at the left tip, 1 at the right border
    left = np.maximum(-u, 0)
    thick_y = half[1] * (0.25 + 0.75 * right**1.3)
    thick_z = half[2] * (0.45 + 0.55 * right)
    q = u**2 + ((y - 60 * left) / thick_y) ** 2 + ((z - 15 * left) / thick_z) ** 2
    c.paint(sl, (q <= 1) & (np.abs(x) <= half[0]) & c.cavity[sl], hu["liver"], label, enhanced=True)


def _paint_gallbladder(c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float]) -> None:
    """A fluid-filled pear under the right lobe's inferior surface, in its fossa (it displaces liver):
    a hypodense neighbour that liver lesions must be told from. Absent in some cases."""
    if rng.random() >= GALLBLADDER_PROBABILITY:
        return
    centre, scale = _pose(rng, body.at(45, 38, 8))
    rot = _frame(axis=(0.2, 0.6, 1.0), towards=(1.0, 0.0, 0.0))  # long axis: fundus anterior-inferior
    semi = np.array([40.0, 15.0, 15.0]) * rng.uniform(0.7, 1.1)
    sl = c.region(centre, semi.max() * scale)
    u, w, v = _local(c.coords(sl, centre), rot, scale)
    c.paint(sl, (_ellipsoid((u, w, v), semi) <= 1) & c.cavity[sl], hu["fluid"])


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
    radii = radii * float(scale.mean()) * rng.uniform(0.9, 1.1, len(radii))
    sl = c.region(centre, np.ptp(points, axis=0) / 2 + radii.max() * np.array([1, 1, PANCREAS_HEIGHT_RATIO]))
    x, y, z = c.coords(sl, np.zeros(3))
    squash = np.array([1.0, 1.0, 1.0 / PANCREAS_HEIGHT_RATIO], dtype=np.float32)
    dist = _tube((x, y, centre[2] + (z - centre[2]) * squash[2]), centre + (points - centre) * squash, radii)
    c.paint(sl, (dist <= 1) & c.cavity[sl], hu["pancreas"], label, enhanced=True)
    return points, radii


def _paint_kidneys(
    c: _Canvas, rng: np.random.Generator, body: _Body, hu: dict[str, float], label: int, phase: str
) -> None:
    """Paraspinal beans, the right one lower; long axis craniocaudal with the upper pole tilted
    medially and posteriorly, hilum facing anteromedially; with contrast, cortex brighter than medulla."""
    shared_z = rng.uniform(-ORGAN_JITTER_MM, ORGAN_JITTER_MM)
    medulla = hu["kidney"] - rng.uniform(*KIDNEY_MEDULLA_DROP_HU[phase])
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
    sl = c.region(aorta, np.array([aorta_radius, aorta_radius, c.grid.fov[2]]))
    x, y, _ = c.coords(sl, aorta)
    c.paint(sl, x**2 + y**2 <= aorta_radius**2, hu["aorta"], enhanced=True)
    ivc = body.at(22, 4, 0)
    sl = c.region(ivc + [6.0, 12.0, 0.0], np.array([20.0, 25.0, c.grid.fov[2]]))
    x, y, z = c.coords(sl, ivc)
    rise = np.maximum(z - 30, 0)
    c.paint(sl, ((x - 0.1 * rise) / 13) ** 2 + ((y - 0.25 * rise) / 9) ** 2 <= 1, hu["ivc"], enhanced=True)


def _paint_muscles(c: _Canvas, spine_y: float, hu: dict[str, float]) -> None:
    """Paraspinal muscles behind the spine; psoas beside it, growing toward the pelvis."""
    for side in (-1.0, 1.0):
        centre = np.array([28.0 * side, spine_y - 45.0, 0.0])
        sl = c.region(centre, np.array([22.0, 20.0, c.grid.fov[2]]))
        x, y, _ = c.coords(sl, centre)
        c.paint(sl, (x / 22) ** 2 + (y / 20) ** 2 <= 1, hu["muscle"])
        centre = np.array([40.0 * side, spine_y, 0.0])
        sl = c.region(centre, np.array([25.0, 30.0, c.grid.fov[2]]))
        x, y, z = c.coords(sl, centre)
        radius = 17.0 * np.clip((70.0 - z) / 140.0, 0, 1) ** 0.7
        c.paint(sl, (x - side * (radius - 16)) ** 2 + (y - 0.1 * np.maximum(-z, 0)) ** 2 <= radius**2, hu["muscle"])


def _paint_ribs(c: _Canvas, body: _Body, hu: dict[str, float]) -> None:
    """Lower ribs in the upper-abdominal wall, descending as they wrap from the back forward."""
    top = np.array([0.0, body.centre_y, 0.0])
    sl = c.region(
        np.array([0.0, 0.0, 50.0]), np.array([c.grid.fov[0], c.grid.fov[1], 90.0])
    )  # rib levels reach z ≈ -35
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
    sl = c.region(centre + [0.0, -20.0, 0.0], np.array([48.0, 50.0, c.grid.fov[2]]))
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
    transverse = (
        (np.abs(y - canal_y - 4) < 5)
        & (np.abs(x) > 12)
        & (np.abs(x) < 45)
        & (level > disc_h + 8)
        & (level < disc_h + 17)
    )
    c.paint(sl, arch | spinous | transverse, hu["posterior_elements"])
    c.paint(sl, r <= 9, hu["csf"])


@dataclass(frozen=True)
class LesionModel:
    """How one organ's lesions are drawn, after the dataset the site stands for (sources beside
    LESIONS). Diameters are log-normal (the shape of published lesion-size distributions),
    clipped to the range the dataset reports."""

    count_weights: tuple[float, ...]  # relative frequency of 1, 2, 3, ... lesions in an organ that has any
    diameter_median_mm: float
    diameter_sigma: float  # standard deviation of log(diameter)
    diameter_range_mm: tuple[float, float]
    exophytic_probability: float  # centred on the organ's surface, bulging into the surrounding fat
    bulges: bool  # may extend past the organ's outline into fat (mass effect), as pancreatic masses do
    necrosis_min_mm: float  # lesions at least this large may have a necrotic (fluid-density) core ...
    necrosis_probability: float  # ... with this probability
    cystic_probability: float  # fluid-density lesions throughout (cystic pancreatic neoplasms)
    hu: dict[str, tuple[float, float]]  # solid tissue, per phase
    textured: bool  # heterogeneous enhancement: a smooth texture over the HU range, not one value


@dataclass(frozen=True)
class Lesion:
    """One lesion to paint."""

    diameter_mm: float
    exophytic: bool
    necrotic: bool
    cystic: bool


NECROSIS_HU = (5.0, 25.0)  # necrotic interiors: near water in every phase
CYST_HU = (0.0, 20.0)

# Sources. KiTS19: computed here from the public training set (neheller/kits19, data/kits.json and
# the 210 segmentations; Heller et al., arXiv:1904.00445, 2019): radiographic tumour size median
# 4.0 cm, IQR 2.5-5.6, range 1.2-16.2 cm; one tumour in 201 of 210 patients, two in 7, three or more
# in 2; pathological necrosis in 43 of 187 (23 %); 68 % clear-cell carcinoma (heterogeneous
# enhancement). The clinical data do not record whether a tumour is exophytic: half are taken to
# be (an assumption). MSD Task07 (Simpson et al., arXiv:1902.09063): IPMN, PNET and PDAC, one mass
# per case, tumour volume median 6 cm³ (a 22.5 mm sphere), range 0.4-732 cm³ over the 281 training
# cases (as summarised by openmedlab/Awesome-Medical-Dataset, resources); hypoattenuating PDAC
# 30 ± 9 mm across, 40 ± 23 HU below the parenchyma in the portal venous phase (PubMed 17961951).
# The share of cystic lesions (IPMN) is an assumption. LiTS / MSD Task03 (Bilic et al., Medical
# Image Analysis 84:102680, 2023): primary and secondary tumours, one or many per liver, mostly
# hypodense, lesions in 118 of 131 training volumes (90 %; the same summary). LiTS publishes no per-lesion size
# table that we could read: the liver's count and size distribution below are assumptions that
# span the reported "from under 1 cm to over 10 cm", several lesions in many livers. Diameters are
# capped where a larger lesion would engulf the phantom's organ (kidney 12 cm, pancreas 6 cm).
# log-normal sigma from an IQR: log(Q3 / Q1) / 1.349.
LESIONS: dict[str, LesionModel] = {
    "liver": LesionModel(
        count_weights=(0.35, 0.2, 0.13, 0.1, 0.08, 0.06, 0.05, 0.03),
        diameter_median_mm=25.0,
        diameter_sigma=0.7,
        diameter_range_mm=(5.0, 120.0),
        exophytic_probability=0.0,
        bulges=False,
        necrosis_min_mm=30.0,
        necrosis_probability=0.5,
        cystic_probability=0.0,
        hu={"portal_venous": (40.0, 80.0), "unenhanced": (25.0, 45.0)},
        textured=False,
    ),
    "kidney": LesionModel(
        count_weights=(201, 7, 2),
        diameter_median_mm=40.0,
        diameter_sigma=math.log(5.6 / 2.5) / 1.349,
        diameter_range_mm=(12.0, 120.0),
        # necrosis in 23 % of all tumours, placed in the larger half (≥ the 4 cm median): 0.23 / 0.5
        exophytic_probability=0.5,
        bulges=True,
        necrosis_min_mm=40.0,
        necrosis_probability=0.46,
        cystic_probability=0.0,
        hu={"portal_venous": (80.0, 140.0), "unenhanced": (25.0, 45.0)},
        textured=True,
    ),
    "pancreas": LesionModel(
        count_weights=(1.0,),
        diameter_median_mm=22.5,
        diameter_sigma=0.4,
        diameter_range_mm=(9.0, 60.0),
        exophytic_probability=0.0,
        bulges=True,
        necrosis_min_mm=math.inf,
        necrosis_probability=0.0,
        cystic_probability=0.25,
        hu={"portal_venous": (50.0, 70.0), "unenhanced": (30.0, 45.0)},
        textured=False,
    ),
}
# Share of a dataset's cases that show its organ's tumour: every KiTS19 and MSD Task07 case (both
# are tumour cohorts), 90 % of LiTS volumes.
TUMOR_PREVALENCE = {"liver": 0.9, "kidney": 1.0, "pancreas": 1.0}


def draw_lesions(rng: np.random.Generator, organ: str) -> list[Lesion]:
    """The lesions of one affected organ: how many, how large, and of which kind."""
    model = LESIONS[organ]
    weights = np.asarray(model.count_weights)
    count = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
    lesions = []
    for _ in range(count):
        diameter = float(
            np.clip(
                model.diameter_median_mm * np.exp(model.diameter_sigma * rng.standard_normal()),
                *model.diameter_range_mm,
            )
        )
        cystic = bool(rng.random() < model.cystic_probability)
        lesions.append(
            Lesion(
                diameter_mm=diameter,
                exophytic=bool(rng.random() < model.exophytic_probability),
                necrotic=not cystic
                and diameter >= model.necrosis_min_mm
                and bool(rng.random() < model.necrosis_probability),
                cystic=cystic,
            )
        )
    return lesions


def _paint_tumours(
    c: _Canvas, rng: np.random.Generator, labels: LabelSpace, probability: Mapping[str, float], phase: str
) -> None:
    """Lesions in each organ that has a tumour class, with the organ's probability: lobulated
    ellipsoids centred in the organ (on its surface for exophytic ones), clipped to the organ, or
    for masses that bulge, to the organ and the fat around it, so a lesion never leaves its organ
    nor overwrites another structure."""
    for organ in ORGANS:
        classes = [labels.index(t) for t, o in labels.tumor_of.items() if o == organ]
        if not classes or organ not in LESIONS or rng.random() >= probability.get(organ, 0.0):
            continue
        organ_mask = c.label == labels.index(organ)
        if not organ_mask.any():
            continue
        box = ndimage.find_objects(organ_mask.view(np.uint8))[0]
        depth = ndimage.distance_transform_edt(np.pad(organ_mask[box], 1), sampling=c.grid.spacing)[1:-1, 1:-1, 1:-1]
        model = LESIONS[organ]
        # the organ's fatty surroundings, before any lesion: where masses that bulge may grow
        fat = c.cavity & (c.label == 0) & (c.image < -50) if model.bulges or model.exophytic_probability else None
        for lesion in draw_lesions(rng, organ):
            beyond = fat if model.bulges or lesion.exophytic else None
            _paint_lesion(c, rng, lesion, model, organ_mask, beyond, box, depth, int(rng.choice(classes)), phase)


def _paint_lesion(
    c: _Canvas,
    rng: np.random.Generator,
    lesion: Lesion,
    model: LesionModel,
    organ_mask: np.ndarray,
    beyond: np.ndarray | None,
    box: tuple[slice, ...],
    depth: np.ndarray,
    label: int,
    phase: str,
) -> None:
    """One lesion, within the organ and, where `beyond` is given, the voxels past it it may fill."""
    radius = lesion.diameter_mm / 2
    # Exophytic: centre within 30 % of the radius (or a voxel) of the surface, so about half the mass lies outside.
    if lesion.exophytic:
        inside = (depth > 0) & (depth <= max(0.3 * radius, float(c.grid.spacing.max())))
    else:
        inside = depth >= min(0.6 * radius, 0.8 * float(depth.max()))
    seed = np.unravel_index(rng.choice(np.flatnonzero(inside)), depth.shape)
    index = np.array([b.start + i for b, i in zip(box, seed)])
    reach = np.ceil(1.6 * radius / c.grid.spacing).astype(int)
    sl = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(index, reach))
    p = [c.grid.axis(a)[sl[a]] - c.grid.axis(a)[index[a]] for a in range(3)]
    grid = (p[0][:, None, None], p[1][None, :, None], p[2][None, None, :])
    rotation = Rotation.random(rng=rng).as_matrix()
    local = _local(grid, rotation, 1.0)
    semi = radius * rng.uniform(0.75, 1.0, 3)
    mask = _ellipsoid(local, semi) <= 1
    for _ in range(rng.integers(0, 3)):  # lobulation: up to two smaller lobes on the surface
        offset = rng.standard_normal(3)
        offset *= 0.55 * radius / np.linalg.norm(offset)
        mask |= _ellipsoid(tuple(x - np.float32(o) for x, o in zip(local, offset)), semi * rng.uniform(0.45, 0.7)) <= 1
    mask &= organ_mask[sl] if beyond is None else organ_mask[sl] | beyond[sl]
    pieces, count = ndimage.label(mask)
    if count > 1:  # clipping can cut a lobe off: keep what stays joined to the organ
        touching = np.unique(pieces[ndimage.binary_dilation(organ_mask[sl]) & mask])
        mask = np.isin(pieces, touching[touching > 0])
    if not mask.any():
        return
    if lesion.cystic:
        hu: float | np.ndarray = float(rng.uniform(*CYST_HU))
    else:
        hu = _lesion_hu(rng, model.hu[phase], model.textured, mask)
        if lesion.necrotic:
            core = (_ellipsoid(local, semi * rng.uniform(0.35, 0.6)) <= 1) & mask
            hu = np.where(core, np.float32(rng.uniform(*NECROSIS_HU)), hu).astype(np.float32)
    c.paint(sl, mask, hu, label, enhanced=not lesion.cystic)


def _lesion_hu(
    rng: np.random.Generator, hu_range: tuple[float, float], textured: bool, inside: np.ndarray
) -> float | np.ndarray:
    """One value per lesion, or for heterogeneous lesions a smooth texture stretched over the range."""
    lo, hi = hu_range
    if not textured:
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
    rng: np.random.Generator, scanner, labels: LabelSpace, tumor_probability: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scan: (image HU int16 [X,Y,Z], full label uint8 [X,Y,Z] in `labels`' space, RAS+ affine).

    Uses the scanner's protocol and population (spacing, field of view, phase, calibration,
    contrast, noise, habitus; not its case counts). Every organ is drawn; `tumor_probability` gives,
    per organ, the chance that it has lesions (see `tumor_probabilities`); tumour classes of other
    organs than those in LESIONS never appear."""
    organ_label = _organ_indices(labels)
    if scanner.phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got '{scanner.phase}'")
    grid = _Grid.for_scan(scanner.spacing_mm, scanner.fov_mm)
    c = _Canvas(grid, rng, scanner.contrast_scale)
    hu = _draw_hu(rng, scanner.phase)
    body = _paint_body(c, rng, hu, scanner)
    _paint_bowel(c, rng, body, hu)
    _paint_duodenum(c, rng, body, hu)
    _paint_stomach(c, rng, body, hu)
    _paint_liver(c, rng, body, hu, organ_label["liver"])
    _paint_gallbladder(c, rng, body, hu)
    _paint_spleen(c, rng, body, hu, organ_label["spleen"])
    pancreas = _paint_pancreas(c, rng, body, hu, organ_label["pancreas"])
    _paint_kidneys(c, rng, body, hu, organ_label["kidney"], scanner.phase)
    _paint_veins(c, rng, hu, pancreas)
    _paint_great_vessels(c, rng, body, hu)
    spine_y = float(body.at(0, -27, 0)[1])
    _paint_muscles(c, spine_y, hu)
    _paint_ribs(c, body, hu)
    _paint_spine(c, rng, spine_y, hu)
    _paint_tumours(c, rng, labels, tumor_probability, scanner.phase)
    return _acquire(c, rng, scanner), c.label, grid.affine


def _draw_hu(rng: np.random.Generator, phase: str) -> dict[str, float]:
    """One case's tissue HU in its contrast phase."""
    hu = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in HU_RANGES[phase].items()}
    if phase == "unenhanced":
        hu["spleen"] = hu["liver"] - float(rng.uniform(*UNENHANCED_SPLEEN_BELOW_LIVER_HU))
    return hu


def tumor_probabilities(site_classes: Sequence[str], labels: LabelSpace, incidental: float) -> dict[str, float]:
    """Per organ, the chance that a case of this site shows its tumours: the prevalence of the
    dataset the site stands for where it labels the organ's tumour, else `incidental`."""
    labelled = {labels.tumor_of[c] for c in site_classes if c in labels.tumor_of}
    return {organ: TUMOR_PREVALENCE[organ] if organ in labelled else incidental for organ in LESIONS}


def draw_case(
    synthetic: SyntheticConfig, site: SiteConfig, index: int, labels: LabelSpace
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Case `index` of `site` (numbered across its splits, as in its file names) exactly as
    `write_federation` draws it: (image, full label, affine). The site's label file is the site's
    annotation map of this full label, so analyses can recover every voxel's true class."""
    tumours = tumor_probabilities(site.classes, labels, synthetic.incidental_tumor_probability)
    return make_phantom(_case_rng(synthetic.seed, site.name, index), _scanner_of(synthetic, site), labels, tumours)


def manifest_text(synthetic, sites, labels: LabelSpace) -> str:
    """The generator version and every setting a federation depends on, as YAML."""
    return OmegaConf.to_yaml(
        {
            "generator_version": GENERATOR_VERSION,
            "labels": {"classes": list(labels.classes), "tumors": dict(labels.tumor_of)},
            "sites": [OmegaConf.to_container(OmegaConf.create(site)) for site in sites],
            "synthetic": OmegaConf.to_container(OmegaConf.create(synthetic)),
        }
    )


def _is_running(pid: str) -> bool:
    """Whether the process `pid` (a decimal string) is alive on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_federation(out_dir: Path, synthetic, sites, labels: LabelSpace, progress: bool = False) -> None:
    """Write every site's images, labels and datalist under `out_dir`, atomically: the federation is
    built in a hidden sibling folder and renamed into place only when complete."""
    out_dir = Path(out_dir)
    _organ_indices(labels)
    for key in ("name", "datalist"):
        values = [str(getattr(site, key)) for site in sites]
        if len(set(values)) != len(values):
            raise ValueError(f"synthetic sites need distinct {key}s, got {values}")
    plan = [
        (site, _scanner_of(synthetic, site), labels.annotation_lut(site.classes, f"site '{site.name}'"))
        for site in sites
    ]
    if out_dir.exists():
        raise FileExistsError(f"synthetic data folder already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a generation that was killed
        if not _is_running(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cases = [case for site, scanner, lut in plan for case in _write_datalist(tmp, site, scanner, lut)]
        jobs = [(tmp, case, synthetic, labels) for case in cases]
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
    """One phantom to generate: where it goes, which site draws it and what that site annotates."""

    site: SiteConfig
    index: int
    image: str
    label: str
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
            cases.append(_Case(site, index, entry["image"], entry["label"], lut))
    datalist = root / site.datalist
    datalist.parent.mkdir(parents=True, exist_ok=True)
    datalist.write_text(json.dumps({"name": site.name, "classes": list(site.classes), **splits}, indent=2) + "\n")
    return cases


def _write_case(job: tuple[Path, _Case, SyntheticConfig, LabelSpace]) -> None:
    root, case, synthetic, labels = job
    image, label, affine = draw_case(synthetic, case.site, case.index, labels)
    _save_nifti(root / case.image, image, affine)
    _save_nifti(root / case.label, case.lut[label], affine)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
