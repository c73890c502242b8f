"""Procedural chest anatomy on the baseline grid ("body frame").

Everything is derived from a handful of per-patient numbers (sizes, dome heights, fissure
positions, heart pose) drawn from the seed; nothing is read from disk. The result is a
noise-free HU map plus exact lobe and tissue labels, which later stages deform, infect, blur
and make noisy.

Shapes follow textbook anatomy: lungs are bounded by a thoracic cavity that narrows to the
apices, diaphragm domes below (right higher than left), and the mediastinum medially (heart
bulging into the left lung: cardiac notch; aorta, vena cava, hila: concave mediastinal surfaces).
The oblique fissures run from about T4 posteriorly down to the diaphragm anteriorly, the
horizontal fissure cuts the right upper lobe off the middle lobe at about the 4th rib.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from covidtrack.phantom.grid import Grid
from covidtrack.phantom.truth import TISSUE_IDS
from covidtrack.phantom.tubes import Segment, grow_tree, polyline_segments, sample_segments, stamp

# HU of the tissues (before partial volume, blur and noise)
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -90.0
HU_MUSCLE = 40.0
HU_BLOOD = 40.0
HU_LIVER = 55.0
HU_ABDOMEN_LEFT = 35.0
HU_LUNG_ANTERIOR = -880.0  # non-dependent lung ...
HU_LUNG_POSTERIOR = -820.0  # ... is less dense than dependent (posterior) lung in a supine patient
HU_FISSURE = -650.0
HU_BONE_CORTEX = 900.0
HU_BONE_MARROW = 420.0
HU_DISC = 90.0
HU_CARTILAGE = 120.0
HU_TABLE = 120.0

T_OUT, T_FAT, T_SOFT, T_BONE = TISSUE_IDS["outside"], TISSUE_IDS["fat"], TISSUE_IDS["soft"], TISSUE_IDS["bone"]
T_LUNG, T_VESSEL, T_AIRWAY, T_TABLE = TISSUE_IDS["lung"], TISSUE_IDS["vessel"], TISSUE_IDS["airway"], TISSUE_IDS["table"]

# Extent the default anatomy needs (mm): body width and depth incl. table, chest height with margins
_NEED_X, _NEED_Y, _NEED_Z = 340.0, 330.0, 310.0
MIN_SCALE = 0.55


@dataclass(frozen=True)
class AnatomyParams:
    """Per-patient anatomy, all lengths in mm (anatomical coordinates, see :class:`Grid`)."""

    scale: float
    lung_height: float  # costophrenic recess to apex
    z_base: float  # lowest point of the lungs (posterior costophrenic recess)
    cavity_half_width: float  # thoracic cavity at its widest (base)
    cavity_half_depth: float
    cavity_y: float  # centre of the cavity (positive = posterior)
    fat_mm: float  # subcutaneous fat thickness
    dome_right: float  # dome heights above the recess, as a fraction of lung height
    dome_left: float
    heart_x: float
    heart_y: float
    heart_z: float
    heart_axes: tuple[float, float, float]  # long axis, short axis, height (semi-axes)
    heart_yaw_deg: float
    oblique_right: tuple[float, float]  # fissure height at 30 % depth / posteriorly (fraction of height)
    oblique_left: tuple[float, float]
    horizontal: float  # right horizontal fissure height (fraction of lung height)

    @property
    def spine_y(self) -> float:
        return self.cavity_y + 0.70 * self.cavity_half_depth


def sample_params(grid: Grid, rng: np.random.Generator) -> AnatomyParams:
    """Draw a patient that fits the field of view (smaller patients for small FOVs)."""
    ez, ey, ex = grid.extent_mm
    size = rng.uniform(0.93, 1.05)
    scale = min(size, ex / _NEED_X, ey / _NEED_Y, ez / _NEED_Z)
    if scale < MIN_SCALE:
        raise ValueError(
            f"field of view {ez:.0f} x {ey:.0f} x {ex:.0f} mm (z, y, x) is too small for a chest phantom; "
            f"use at least {_NEED_Z * MIN_SCALE:.0f} x {_NEED_Y * MIN_SCALE:.0f} x {_NEED_X * MIN_SCALE:.0f} mm "
            f"(shape x spacing), e.g. shape (72, 128, 128) at spacing (4.5, 2.7, 2.7)"
        )
    s = scale
    height = 268.0 * s * rng.uniform(0.95, 1.04)
    depth = 95.0 * s * rng.uniform(0.93, 1.05)
    width = 136.0 * s * rng.uniform(0.95, 1.03)
    cavity_y = -0.06 * depth
    z_base = (ez - height) * rng.uniform(0.42, 0.55)
    return AnatomyParams(
        scale=s,
        lung_height=height,
        z_base=z_base,
        cavity_half_width=width,
        cavity_half_depth=depth,
        cavity_y=cavity_y,
        # subcutaneous fat, as much as the field of view leaves room for (big patients get cut
        # at the FOV edge on real scanners too, but a clean outline is more useful here)
        fat_mm=float(np.clip(rng.uniform(6.0, 26.0) * s, 3.0, max(3.0, ex / 2 - 6.0 - width - 16.0 * s))),
        dome_right=rng.uniform(0.25, 0.29),
        dome_left=rng.uniform(0.21, 0.25),
        heart_x=0.20 * width * rng.uniform(0.8, 1.2),
        heart_y=cavity_y - 0.30 * depth,
        heart_z=z_base + height * rng.uniform(0.34, 0.38),
        heart_axes=(58.0 * s * rng.uniform(0.92, 1.1), 42.0 * s * rng.uniform(0.92, 1.1), 50.0 * s),
        heart_yaw_deg=rng.uniform(28.0, 42.0),
        oblique_right=(rng.uniform(0.24, 0.30), rng.uniform(0.66, 0.72)),
        oblique_left=(rng.uniform(0.25, 0.31), rng.uniform(0.69, 0.75)),
        horizontal=rng.uniform(0.52, 0.58),
    )


@dataclass(frozen=True, eq=False)
class Atlas:
    """Noise-free body-frame rendering: HU (float32), lobes (uint8), tissue (uint8)."""

    hu: np.ndarray
    lobes: np.ndarray
    tissue: np.ndarray
    params: AnatomyParams
    pleura_mm: np.ndarray  # distance to the lung surface (mm) on a coarse grid, 0 outside
    coarse_factor: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Shape functions (numpy broadcasting over anatomical mm)
# ---------------------------------------------------------------------------------------------
def _height_fraction(p: AnatomyParams, z: np.ndarray) -> np.ndarray:
    return (z - p.z_base) / p.lung_height


def _cavity(p: AnatomyParams, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-width, half-depth and y-centre (mm) of the thoracic cavity at heights ``z``.

    Widest at the base, narrowing towards the thoracic inlet; the apices sit a little posterior.
    The rounded apex of each lung is cut by :func:`_apex_cap`.
    """
    h = np.clip(_height_fraction(p, z), 0.0, 1.0)
    hh = np.clip((h - 0.15) / 0.85, 0.0, 1.0)  # widest over the lower half
    w = np.sqrt(1.0 - 0.85 * hh**2)  # thoracic inlet ~half as wide
    d = np.sqrt(1.0 - 0.55 * h**3)
    a = p.cavity_half_width * w
    b = p.cavity_half_depth * d
    yc = p.cavity_y + 0.25 * p.cavity_half_depth * h
    return a, b, yc


def _apex_cap(p: AnatomyParams, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Highest lung point (fraction of lung height) over (y, x): one dome per lung apex."""
    xa = 0.33 * p.cavity_half_width
    ya = p.cavity_y + 0.2 * p.cavity_half_depth
    return 1.0 - 1.4 * ((np.abs(x) - xa) / p.cavity_half_width) ** 2 - 0.3 * ((y - ya) / p.cavity_half_depth) ** 2


def _diaphragm(p: AnatomyParams, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm surface: two domes, right higher, recesses lowest."""
    out = np.full(np.broadcast_shapes(y.shape, x.shape), p.z_base, dtype=np.float32)
    for sign, frac in ((-1.0, p.dome_right), (1.0, p.dome_left)):
        xd = sign * 0.42 * p.cavity_half_width
        yd = p.cavity_y - 0.12 * p.cavity_half_depth
        r2 = ((x - xd) / (0.80 * p.cavity_half_width)) ** 2 + ((y - yd) / (1.0 * p.cavity_half_depth)) ** 2
        dome = frac * p.lung_height * np.clip(1.0 - r2, 0.0, None)  # parabolic: covers the base gradually
        # the anterior costophrenic sulcus is shallower than the posterior recess
        ant = 0.06 * p.lung_height * np.clip((p.cavity_y - y) / p.cavity_half_depth, 0.0, 1.0)
        side = (x < 0) if sign < 0 else (x >= 0)
        out = np.where(side, np.maximum(out, p.z_base + dome + ant), out)
    return out


def _heart(p: AnatomyParams, z: np.ndarray, y: np.ndarray, x: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Inside the heart ellipsoid (grown by ``margin`` mm), long axis pointing anterior-left."""
    phi = np.deg2rad(p.heart_yaw_deg)
    dx, dy = x - p.heart_x, y - p.heart_y
    u = dx * np.cos(phi) - dy * np.sin(phi)
    v = dx * np.sin(phi) + dy * np.cos(phi)
    a, b, c = (ax + margin for ax in p.heart_axes)
    # the lower half reaches down into the diaphragm: the heart rests on it, no lung beneath
    c = np.where(z < p.heart_z, 1.8 * c, c)
    return (u / a) ** 2 + (v / b) ** 2 + ((z - p.heart_z) / c) ** 2 < 1.0


def _fissure_height(p: AnatomyParams, heights: tuple[float, float], y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Oblique fissure height z(y, x) (mm) and its slope factor sqrt(1 + |grad z|^2).

    ``heights`` = (height at 30 % of the cavity depth, height at the back), as fractions of the
    lung height: a straight, steep plate from about T4 posteriorly down to the front of the
    diaphragm dome, curving under the diaphragm anteriorly so the middle lobe / lingula sit on
    the diaphragm in front of it. A gentle lateral undulation avoids a perfectly flat plane.
    """
    y0 = p.cavity_y - p.cavity_half_depth
    span = 2.0 * p.cavity_half_depth
    t = np.clip((y - y0) / span, 0.0, 1.0)
    h30, hi = heights
    front = t < 0.3
    tf = np.maximum(t, 1e-3) / 0.3
    h = np.where(front, h30 * tf**1.5, hi - (hi - h30) * (1.0 - t) / 0.7)
    dh_dt = np.where(front, h30 * 1.5 * np.sqrt(tf) / 0.3, (hi - h30) / 0.7)
    # higher laterally: on an axial slice the fissure runs from anterolateral to posteromedial
    lateral = 0.10 * (np.abs(x) / p.cavity_half_width - 0.5)
    h = h + lateral + 0.012 * np.sin(x / (25.0 * p.scale))
    dz_dy = p.lung_height * dh_dt / span
    dz_dx = p.lung_height * 0.10 / p.cavity_half_width
    return p.z_base + p.lung_height * h, np.sqrt(1.0 + dz_dy**2 + dz_dx**2)


# ---------------------------------------------------------------------------------------------
# Mediastinal tubes (centre lines in anatomical mm, (z, y, x))
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Landmarks:
    carina: tuple[float, float, float]
    hilum_right: tuple[float, float, float]
    hilum_left: tuple[float, float, float]
    bronchus_right: tuple[float, float, float]
    bronchus_left: tuple[float, float, float]
    vein_right: tuple[float, float, float]
    vein_left: tuple[float, float, float]


def _landmarks(p: AnatomyParams) -> _Landmarks:
    s, zb, hgt = p.scale, p.z_base, p.lung_height
    y_tr = p.spine_y - 42.0 * s
    z_car = zb + 0.62 * hgt
    return _Landmarks(
        carina=(z_car, y_tr, 0.0),
        hilum_right=(zb + 0.55 * hgt, p.cavity_y + 2.0 * s, -40.0 * s),
        hilum_left=(zb + 0.60 * hgt, p.cavity_y + 8.0 * s, 42.0 * s),
        bronchus_right=(zb + 0.54 * hgt, y_tr + 8.0 * s, -38.0 * s),
        bronchus_left=(zb + 0.55 * hgt, y_tr + 10.0 * s, 40.0 * s),
        vein_right=(p.heart_z + 0.06 * hgt, p.heart_y + 38.0 * s, -34.0 * s),
        vein_left=(p.heart_z + 0.08 * hgt, p.heart_y + 40.0 * s, 40.0 * s),
    )


def _mediastinal_tubes(p: AnatomyParams, top: float, lm: _Landmarks) -> dict[str, list[Segment]]:
    """Great vessels, trachea, main bronchi and oesophagus."""
    s, zb, hgt = p.scale, p.z_base, p.lung_height
    hz, hy, hx = p.heart_z, p.heart_y, p.heart_x
    y_sp = p.spine_y
    arch_z = zb + 0.74 * hgt
    aorta = polyline_segments(
        [
            (hz + 0.15 * hgt, hy + 18 * s, 8 * s),
            (arch_z - 12 * s, hy + 10 * s, 6 * s),
            (arch_z, hy + 35 * s, 12 * s),
            (arch_z - 8 * s, y_sp - 30 * s, 24 * s),
            (zb + 0.45 * hgt, y_sp - 24 * s, 24 * s),
            (-20.0, y_sp - 18 * s, 14 * s),
        ],
        [15 * s, 15 * s, 14 * s, 13 * s, 12 * s, 12 * s],
    )
    svc = polyline_segments([(hz + 0.10 * hgt, hy + 20 * s, -22 * s), (top + 20, hy + 20 * s, -26 * s)], [10 * s, 10 * s])
    pa_bif = (zb + 0.60 * hgt, hy + 42 * s, 6 * s)
    trunk = polyline_segments([(hz + 0.18 * hgt, hy - 5 * s, 18 * s), pa_bif], [14 * s, 13 * s])
    pa = polyline_segments([pa_bif, lm.hilum_right], [11 * s, 9 * s]) + polyline_segments([pa_bif, lm.hilum_left], [10 * s, 9 * s])
    veins = polyline_segments([(hz, hy + 30 * s, 6 * s), lm.vein_right], [8 * s, 7 * s]) + polyline_segments(
        [(hz, hy + 30 * s, 10 * s), lm.vein_left], [8 * s, 7 * s]
    )
    trachea = polyline_segments([(top + 20, lm.carina[1] - 6 * s, 0.0), lm.carina], [9 * s, 8.5 * s])
    bronchi = polyline_segments([lm.carina, lm.bronchus_right], [7 * s, 6 * s]) + polyline_segments(
        [lm.carina, lm.bronchus_left], [6 * s, 5.5 * s]
    )
    oesophagus = polyline_segments([(top + 20, lm.carina[1] + 18 * s, 4 * s), (zb + 0.2 * hgt, y_sp - 20 * s, 10 * s)], [7 * s, 7 * s])
    return {
        "blood": aorta + svc + trunk + pa + veins,
        "airway": trachea + bronchi,
        "oesophagus": oesophagus,
    }


def _ribs(p: AnatomyParams) -> tuple[list[Segment], list[Segment]]:
    """Twelve pairs of ribs hugging the cavity wall, sloping down anteriorly, and the costal
    cartilages of the upper ten joining them to the sternum. Returns (bone, cartilage)."""
    s, zb, hgt = p.scale, p.z_base, p.lung_height
    bone: list[Segment] = []
    cartilage: list[Segment] = []
    r_rib = 5.0 * s
    for i in range(12):
        z_back = zb + hgt * (1.0 - 0.085 * i) + 4 * s
        if z_back < -10:
            break
        end = 2.5 if i < 10 else 1.9  # floating ribs end early
        thetas = np.linspace(0.12, end, 16)  # 0 = posterior midline, pi = anterior midline
        pts = []
        for th in thetas:
            z = z_back - 0.33 * hgt * (th / 2.5) ** 1.4
            a, b, yc = (float(v[0]) for v in _cavity(p, np.array([min(max(z, zb + 0.05 * hgt), zb + 0.97 * hgt)])))
            pts.append((z, yc + (b + r_rib + 1.5 * s) * np.cos(th), (a + r_rib + 1.5 * s) * np.sin(th)))
        # cartilage: from the rib end, rising slightly, to the sternal edge
        z_end, y_end, x_end = pts[-1]
        y_front = p.cavity_y - p.cavity_half_depth - 7.0 * s
        z_stern = max(z_end + 0.02 * hgt, zb + 0.32 * hgt)
        cart = [(z_end, y_end, x_end), (0.5 * (z_end + z_stern), y_front + 4.0 * s, 0.5 * (x_end + 14 * s)), (z_stern, y_front, 14.0 * s)]
        for sign in (-1.0, 1.0):
            side = [(z, y, sign * x) for z, y, x in pts]
            bone += polyline_segments(side, [r_rib] * len(side))
            if i < 10:
                cartilage += polyline_segments([(z, y, sign * x) for z, y, x in cart], [4.0 * s] * 3)
    return bone, cartilage


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def render_atlas(grid: Grid, p: AnatomyParams, rng: np.random.Generator) -> Atlas:
    """Noise-free HU, lobe and tissue maps of the patient ``p`` on ``grid``."""
    Z, Y, X = grid.axes()
    nz, ny, nx = grid.shape
    top = grid.extent_mm[0]
    hu = np.full(grid.shape, HU_AIR, dtype=np.float32)
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    s = p.scale

    # --- table, body wall -------------------------------------------------------------------
    cav_a, cav_b, cav_yc = _cavity(p, Z)
    body_front = p.cavity_y - p.cavity_half_depth - 14.0 * s - p.fat_mm
    body_back = p.spine_y + 62.0 * s + p.fat_mm
    body_yc, body_b = (body_front + body_back) / 2, (body_back - body_front) / 2
    body_a = p.cavity_half_width + 16.0 * s + p.fat_mm
    # shoulders: the trunk narrows a little above the lung apices
    narrow = 1.0 - 0.12 * np.clip((_height_fraction(p, Z) - 1.0) / 0.15, 0.0, 1.0)
    e_body = np.abs(X / (body_a * narrow)) ** 2.4 + np.abs((Y - body_yc) / body_b) ** 2.4
    table_y = body_back + 10.0 * s + 0.0006 * X**2
    table = (Y > table_y) & (Y < table_y + 6.0 * s) & (np.abs(X) < 0.85 * body_a) & np.ones_like(Z, dtype=bool)
    hu[table] = HU_TABLE
    tissue[table] = T_TABLE
    body = np.broadcast_to(e_body < 1.0, grid.shape)
    hu[body] = HU_FAT
    tissue[body] = T_FAT
    fa, fb = body_a * narrow - p.fat_mm, body_b - p.fat_mm
    muscle = np.abs(X / fa) ** 2.4 + np.abs((Y - body_yc) / fb) ** 2.4 < 1.0
    muscle = np.broadcast_to(muscle, grid.shape)
    hu[muscle] = HU_MUSCLE
    tissue[muscle] = T_SOFT

    # --- thoracic cavity: mediastinal fat above the diaphragm, abdomen below ------------------
    a0 = np.where(Z < p.z_base, p.cavity_half_width, cav_a)
    b0 = np.where(Z < p.z_base, p.cavity_half_depth, cav_b)
    yc0 = np.where(Z < p.z_base, p.cavity_y, cav_yc)
    cavity = ((X / np.maximum(a0, 1e-3)) ** 2 + ((Y - yc0) / np.maximum(b0, 1e-3)) ** 2 < 1.0) & (
        Z < p.z_base + p.lung_height
    )
    dia = _diaphragm(p, Y, X)
    above = Z > dia
    medi = cavity & above
    hu[medi] = HU_MEDIASTINAL_FAT
    tissue[medi] = T_FAT
    abdomen = cavity & ~above
    hu[abdomen & (X < 25 * s)] = HU_LIVER
    hu[abdomen & (X >= 25 * s)] = HU_ABDOMEN_LEFT
    tissue[abdomen] = T_SOFT
    # gas in the stomach fundus under the left dome
    fundus_c = (p.z_base + (p.dome_left - 0.12) * p.lung_height, p.cavity_y - 0.25 * p.cavity_half_depth, 0.45 * p.cavity_half_width)
    gas = (((Z - fundus_c[0]) / (14 * s)) ** 2 + ((Y - fundus_c[1]) / (20 * s)) ** 2 + ((X - fundus_c[2]) / (20 * s)) ** 2 < 1.0) & abdomen
    hu[gas] = HU_AIR
    tissue[gas] = T_AIRWAY

    # --- lungs: cavity above the diaphragm minus the mediastinum ---------------------------------
    lm = _landmarks(p)
    tubes = _mediastinal_tubes(p, top, lm)
    excl = np.zeros(int(np.prod(grid.shape)), dtype=bool)
    margin = 2.5 * s  # pleura + mediastinal fat between lung and structures
    for segs in tubes.values():
        pts, rad = sample_segments(segs, min(grid.spacing))
        idx, _ = stamp(grid, pts, rad + margin)
        excl[idx] = True
    excl = excl.reshape(grid.shape)
    band = np.abs(X - 3.0 * s) < 14.0 * s
    spine_excl = (X / (24.0 * s)) ** 2 + ((Y - p.spine_y) / (22.0 * s)) ** 2 < 1.0
    heart_excl = _heart_mask(p, grid, margin=4.0 * s)
    cap = _height_fraction(p, Z) < _apex_cap(p, Y, X)
    lung = medi & cap & ~excl & ~band & ~spine_excl & ~heart_excl
    lung = _smooth_mask(lung, grid)

    # --- lobes and fissures ---------------------------------------------------------------------
    lobes = np.zeros(grid.shape, dtype=np.uint8)
    iz, iy, ix = np.nonzero(lung)
    zs, ys, xs = Z[iz, 0, 0], Y[0, iy, 0], X[0, 0, ix]
    right = xs < 0
    obl_z, obl_k = _fissure_height(p, p.oblique_right, ys, xs)
    obl_zl, obl_kl = _fissure_height(p, p.oblique_left, ys, xs)
    obl_z = np.where(right, obl_z, obl_zl)
    obl_k = np.where(right, obl_k, obl_kl)
    hor_z = p.z_base + p.lung_height * (p.horizontal - 0.04 * np.clip((p.cavity_y - ys) / p.cavity_half_depth, 0, 1)) + 3.0 * s * np.sin(xs / (30 * s))
    upper_part = zs > obl_z
    lab = np.where(right, np.where(upper_part, np.where(zs > hor_z, 1, 2), 3), np.where(upper_part, 4, 5))
    lobes[iz, iy, ix] = lab.astype(np.uint8)
    # parenchyma: denser posteriorly (gravity), plus fine texture
    yn = np.clip((ys - (p.cavity_y - p.cavity_half_depth)) / (2 * p.cavity_half_depth), 0, 1)
    par = HU_LUNG_ANTERIOR + (HU_LUNG_POSTERIOR - HU_LUNG_ANTERIOR) * yn
    # fissures: plates about one voxel thick, measured along the surface normal
    half = 0.55 * float(np.mean(grid.spacing))
    d_obl = np.abs(zs - obl_z) / obl_k
    d_hor = np.where(right & upper_part, np.abs(zs - hor_z), np.inf)
    fissure = (d_obl < half) | (d_hor < half)
    par = np.where(fissure, HU_FISSURE, par)
    hu[iz, iy, ix] = par
    tissue[iz, iy, ix] = T_LUNG

    # --- heart and mediastinal tubes -------------------------------------------------------------
    heart = _heart_mask(p, grid) & medi  # above the diaphragm only
    hu[heart] = HU_BLOOD
    tissue[heart] = T_SOFT
    _paint_tubes(hu, tissue, grid, tubes["blood"], HU_BLOOD, T_SOFT)
    _paint_tubes(hu, tissue, grid, tubes["oesophagus"], 35.0, T_SOFT)
    _paint_airways(hu, tissue, grid, tubes["airway"], wall_mm=2.0 * s)

    # --- pulmonary vessel trees and airways --------------------------------------------------------
    coarse_factor, pleura = _pleura_distance(lung, grid)
    _paint_lung_trees(hu, tissue, lobes, grid, p, lm, pleura, coarse_factor, rng)

    # --- bones ----------------------------------------------------------------------------------------
    _paint_spine(hu, tissue, grid, p, Z, Y, X)
    ribs, cartilage = _ribs(p)
    _paint_tubes(hu, tissue, grid, cartilage, HU_CARTILAGE, T_SOFT)
    _paint_tubes(hu, tissue, grid, ribs, HU_BONE_CORTEX, T_BONE, inner=(HU_BONE_MARROW, 2.0 * s))
    stern = (np.abs(X) < 14 * s) & (Y > p.cavity_y - p.cavity_half_depth - 13 * s) & (Y < p.cavity_y - p.cavity_half_depth - 2 * s)
    stern = stern & (Z > p.z_base + 0.30 * p.lung_height) & (Z < p.z_base + 0.95 * p.lung_height)
    hu[stern] = HU_BONE_MARROW + 80.0
    tissue[stern] = T_BONE
    _paint_shoulder_girdle(hu, tissue, grid, p, lung)
    return Atlas(hu=hu, lobes=lobes, tissue=tissue, params=p, pleura_mm=pleura, coarse_factor=coarse_factor)


def _smooth_mask(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Round off the corners where the cavity meets the mediastinum (about 3 mm)."""
    sigma = [2.0 / s for s in grid.spacing]
    box = _bbox(mask, pad=[int(np.ceil(2.5 * sg)) + 1 for sg in sigma])
    out = np.zeros_like(mask)
    if box is not None:
        out[box] = ndi.gaussian_filter(mask[box].astype(np.float32), sigma, truncate=2.5) > 0.5
    return out


def _bbox(mask: np.ndarray, pad: list[int]) -> tuple[slice, ...] | None:
    """Bounding box of a mask, grown by ``pad`` voxels per axis (None if empty)."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        if hit.size == 0:
            return None
        out.append(slice(max(hit[0] - pad[axis], 0), min(hit[-1] + pad[axis] + 1, mask.shape[axis])))
    return tuple(out)


def _heart_mask(p: AnatomyParams, grid: Grid, margin: float = 0.0) -> np.ndarray:
    """:func:`_heart` on the full grid, evaluated only in its bounding box."""
    Z, Y, X = grid.axes()
    r = 1.8 * max(p.heart_axes) + margin
    centre = grid.to_index(np.array([p.heart_z, p.heart_y, p.heart_x]))
    half = r / np.array(grid.spacing)
    lo = np.clip(np.floor(centre - half).astype(int), 0, grid.shape)
    hi = np.clip(np.ceil(centre + half).astype(int) + 1, 0, grid.shape)
    out = np.zeros(grid.shape, dtype=bool)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[sl] = _heart(p, Z[sl[0]], Y[:, sl[1]], X[:, :, sl[2]], margin)
    return out


def _pleura_distance(lung: np.ndarray, grid: Grid) -> tuple[tuple[int, int, int], np.ndarray]:
    """Distance (mm) from each lung voxel to the lung surface, on a grid of about 4 mm."""
    factor = tuple(max(1, int(round(4.0 / s))) for s in grid.spacing)
    coarse = lung[:: factor[0], :: factor[1], :: factor[2]]
    sampling = [s * f for s, f in zip(grid.spacing, factor)]
    return factor, ndi.distance_transform_edt(coarse, sampling=sampling).astype(np.float32)  # type: ignore[return-value]


def _paint_tubes(
    hu: np.ndarray,
    tissue: np.ndarray,
    grid: Grid,
    segs: list[Segment],
    value: float,
    tissue_id: int,
    inner: tuple[float, float] | None = None,
) -> None:
    pts, rad = sample_segments(segs, min(grid.spacing))
    idx, _ = stamp(grid, pts, rad)
    hu.reshape(-1)[idx] = value
    tissue.reshape(-1)[idx] = tissue_id
    if inner is not None:  # marrow inside the cortex
        idx, _ = stamp(grid, pts, np.maximum(rad - inner[1], 0.0))
        hu.reshape(-1)[idx] = inner[0]


def _paint_airways(hu: np.ndarray, tissue: np.ndarray, grid: Grid, segs: list[Segment], wall_mm: float) -> None:
    """Soft-tissue wall, then air lumen."""
    pts, rad = sample_segments(segs, min(grid.spacing))
    idx, _ = stamp(grid, pts, rad + wall_mm)
    keep = tissue.reshape(-1)[idx] != T_AIRWAY  # do not close lumens painted earlier
    hu.reshape(-1)[idx[keep]] = HU_MUSCLE
    idx, _ = stamp(grid, pts, rad)
    hu.reshape(-1)[idx] = HU_AIR
    tissue.reshape(-1)[idx] = T_AIRWAY


def _sample_targets(lobes: np.ndarray, side_lobes: tuple[int, ...], pleura: np.ndarray, factor: tuple[int, int, int], grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random points (mm) in one lung, at least 4 mm inside the pleura."""
    coarse_lobes = lobes[:: factor[0], :: factor[1], :: factor[2]]
    cand = np.argwhere(np.isin(coarse_lobes, side_lobes) & (pleura > 4.0))
    if len(cand) == 0:
        return np.zeros((0, 3))
    pick = cand[rng.choice(len(cand), size=min(n, len(cand)), replace=False)]
    jitter = rng.uniform(-0.5, 0.5, size=pick.shape) * np.array(factor)
    return grid.to_mm(pick * np.array(factor) + jitter)


def _paint_lung_trees(
    hu: np.ndarray,
    tissue: np.ndarray,
    lobes: np.ndarray,
    grid: Grid,
    p: AnatomyParams,
    lm: _Landmarks,
    pleura: np.ndarray,
    factor: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Arteries (from the hila), veins (to the left atrium) and airways (from the main bronchi)."""
    s = p.scale
    vessel_segs: list[Segment] = []
    airway_segs: list[Segment] = []
    n_targets = int(700 * s**2)
    for side_lobes, hilum, vein, bronchus in (
        ((1, 2, 3), lm.hilum_right, lm.vein_right, lm.bronchus_right),
        ((4, 5), lm.hilum_left, lm.vein_left, lm.bronchus_left),
    ):
        art_t = _sample_targets(lobes, side_lobes, pleura, factor, grid, n_targets, rng)
        vein_t = _sample_targets(lobes, side_lobes, pleura, factor, grid, n_targets, rng)
        vessel_segs += grow_tree(np.array(hilum), art_t, rng, r_leaf=0.45 * s, r_max=8.0 * s)
        vessel_segs += grow_tree(np.array(vein), vein_t, rng, r_leaf=0.45 * s, r_max=7.0 * s)
        airway_segs += grow_tree(np.array(bronchus), art_t[: max(2, n_targets // 3)], rng, r_leaf=0.5 * s, r_max=5.5 * s, min_radius=1.2 * s)
    flat_hu, flat_t, flat_lobe = hu.reshape(-1), tissue.reshape(-1), lobes.reshape(-1)
    pts, rad = sample_segments(vessel_segs, min(grid.spacing))
    idx, frac = stamp(grid, pts, rad)
    in_lung = flat_lobe[idx] > 0
    # partial volume: a vessel thinner than a voxel raises the voxel only part of the way
    new = flat_hu[idx] + frac * (HU_BLOOD - flat_hu[idx])
    flat_hu[idx] = np.where(in_lung, np.maximum(flat_hu[idx], new), flat_hu[idx])
    flat_t[idx[in_lung & (frac >= 0.5)]] = T_VESSEL
    pts, rad = sample_segments(airway_segs, min(grid.spacing))
    wall = 0.25 * rad + 0.4 * s
    idx, _ = stamp(grid, pts, rad + wall)
    idx = idx[flat_lobe[idx] > 0]
    flat_hu[idx] = np.maximum(flat_hu[idx], -150.0)
    idx, frac = stamp(grid, pts, rad)
    idx = idx[(flat_lobe[idx] > 0) & (frac >= 1.0)]
    flat_hu[idx] = HU_AIR
    flat_t[idx] = T_AIRWAY


def _paint_shoulder_girdle(hu: np.ndarray, tissue: np.ndarray, grid: Grid, p: AnatomyParams, lung: np.ndarray) -> None:
    """Scapulae (thin plates on the posterolateral ribs) and clavicles (sternum to shoulder)."""
    s, zb, hgt = p.scale, p.z_base, p.lung_height
    Z, Y, X = grid.axes()
    k0 = max(0, int(np.floor((zb + 0.52 * hgt) / grid.spacing[0])))
    k1 = min(grid.shape[0], int(np.ceil((zb + 1.0 * hgt) / grid.spacing[0])) + 1)
    if k1 > k0:
        z = Z[k0:k1]
        a, b, yc = _cavity(p, z)
        dy = Y - yc
        theta = np.arctan2(np.abs(X), dy)  # 0 = straight back
        ell_in = (X / (a + 13.0 * s)) ** 2 + (dy / (b + 13.0 * s)) ** 2 > 1.0
        ell_out = (X / (a + 17.0 * s)) ** 2 + (dy / (b + 17.0 * s)) ** 2 < 1.0
        # the blade narrows towards its lower angle
        hfrac = (z - zb) / hgt
        half_width = 0.30 + 0.25 * np.clip((hfrac - 0.52) / 0.3, 0.0, 1.0)
        blade = ell_in & ell_out & (np.abs(theta - 0.8) < half_width) & ~lung[k0:k1]
        sub_hu, sub_t = hu[k0:k1], tissue[k0:k1]
        sub_hu[blade] = 650.0
        sub_t[blade] = T_BONE
    front = p.cavity_y - p.cavity_half_depth
    for sign in (-1.0, 1.0):
        clav = polyline_segments(
            [
                (zb + 0.96 * hgt, front - 8 * s, sign * 16 * s),
                (zb + 1.02 * hgt, front - 4 * s, sign * 70 * s),
                (zb + 1.04 * hgt, front + 20 * s, sign * 125 * s),
            ],
            [6.0 * s, 5.5 * s, 5.5 * s],
        )
        pts, rad = sample_segments(clav, min(grid.spacing))
        idx, _ = stamp(grid, pts, rad)
        idx = idx[~lung.reshape(-1)[idx]]  # bones never cut into the lung truth
        hu.reshape(-1)[idx] = HU_BONE_CORTEX
        tissue.reshape(-1)[idx] = T_BONE
        idx, _ = stamp(grid, pts, rad - 2.0 * s)
        idx = idx[~lung.reshape(-1)[idx]]
        hu.reshape(-1)[idx] = HU_BONE_MARROW


def _paint_spine(hu: np.ndarray, tissue: np.ndarray, grid: Grid, p: AnatomyParams, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> None:
    """Vertebral bodies with discs, the canal, laminae and spinous processes (all z)."""
    s = p.scale
    ys = p.spine_y
    body = (X / (19 * s)) ** 2 + ((Y - ys) / (16 * s)) ** 2 < 1.0
    cortex = body & ~((X / (16 * s)) ** 2 + ((Y - ys) / (13 * s)) ** 2 < 1.0)
    canal_y = ys + 27 * s
    canal = (X / (8 * s)) ** 2 + ((Y - canal_y) / (8 * s)) ** 2 < 1.0
    arch = ((X / (15 * s)) ** 2 + ((Y - canal_y) / (14 * s)) ** 2 < 1.0) & ~canal & (Y > ys + 12 * s)
    spinous = (np.abs(X) < 4.5 * s) & (Y > canal_y) & (Y < canal_y + 34 * s)
    period = 27.0 * s
    disc = (np.mod(Z - p.z_base, period) < 6.0 * s)[:, :1, :1]
    bone_xy = body | arch | spinous
    sel = np.broadcast_to(bone_xy, grid.shape)
    hu[sel] = HU_BONE_MARROW
    tissue[sel] = T_BONE
    hu[np.broadcast_to(cortex | arch | spinous, grid.shape)] = HU_BONE_CORTEX
    discs = np.broadcast_to(body, grid.shape) & np.broadcast_to(disc, grid.shape)
    hu[discs] = HU_DISC
    tissue[discs] = T_SOFT
    canal_b = np.broadcast_to(canal, grid.shape)
    hu[canal_b] = 15.0
    tissue[canal_b] = T_SOFT
