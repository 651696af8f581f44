"""Artefacts the simulator puts into images, with the models that define them.

The parameters live in small dataclasses so that the camera stage's dynamic masking can use the
same physics (see ``docs/sim.md``):

* :class:`GhostModel` - optical ghosts: a bright star at focal-plane position ``p`` puts a
  uniform annulus (doughnut) centred at ``-centre_scale * p`` with outer radius
  ``r_field (a0 + a1 rho)`` (``rho = |p| / r_field``) and inner radius ``inner_ratio`` times
  that; it carries ``flux_fraction[filter]`` of the star's flux.
* :class:`GlintModel` - glints: a star brighter than instrumental magnitude ``-16.8`` lying
  outside a chip but within ``reach`` pixels of its edge throws a streak from the nearest edge
  point straight into the chip, length ``1901 (-16.8 - m_inst)`` pixels (IPP rule,
  ``m_inst = -2.5 log10(counts / s)``), Gaussian cross-section of sigma ``sigma`` px, carrying
  ``flux_fraction`` of the star's flux, fading linearly along its length.
* :class:`SpikeModel` - diffraction spikes along the focal-plane axes: surface brightness
  ``F k / (d + d0)^2`` along each of the four spikes (``d`` distance from the star), Gaussian
  width ``sigma``.
* crosstalk - :func:`crosstalk_rules`: within an OTA the signal of cell ``xyIJ`` leaks into
  cell ``xyI(J xor 1)`` (the cell sharing its video channel pair) with coefficient ``coeff``,
  at the same cell pixel coordinates.
* cosmic rays - :func:`add_cosmic_rays`: straight tracks through a 75 um thick detector.
* saturation and bleeding - :func:`bleed_columns`: charge above the full well spills up and
  down the column, within the cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GhostModel", "GlintModel", "SpikeModel", "CosmicRayModel", "crosstalk_rules",
    "add_cosmic_rays", "bleed_columns", "render_ghost", "render_glint", "render_spikes",
    "glint_segments",
]


@dataclass
class GhostModel:
    """Optical ghost of a bright star (see module docstring).

    Attributes
    ----------
    centre_scale : float
        Ghost centre = ``-centre_scale * p`` (focal-plane pixels).
    a0, a1 : float
        Outer radius = ``r_field * (a0 + a1 * rho)``.
    inner_ratio : float
        Inner radius / outer radius.
    edge : float
        Width of the soft edge as a fraction of the outer radius.
    flux_fraction : dict
        Fraction of the star's flux in the ghost, per filter.
    """

    centre_scale: float = 1.0
    a0: float = 0.02
    a1: float = 0.05
    inner_ratio: float = 0.5
    edge: float = 0.05
    flux_fraction: dict = field(default_factory=lambda: {"g": 0.006, "r": 0.005, "i": 0.004,
                                                          "z": 0.004, "y": 0.004, "w": 0.005})

    def geometry(self, X, Y, field_radius: float):
        """Ghost centre and radii (focal-plane pixels) for stars at (X, Y)."""
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        rho = np.hypot(X, Y) / field_radius
        r_out = field_radius * (self.a0 + self.a1 * rho)
        return -self.centre_scale * X, -self.centre_scale * Y, self.inner_ratio * r_out, r_out

    def surface_brightness(self, flux, band: str, r_in, r_out):
        """Mean surface brightness (e- per pixel) inside the annulus."""
        return np.asarray(flux) * self.flux_fraction[band] / (np.pi * (np.asarray(r_out) ** 2
                                                                        - np.asarray(r_in) ** 2))


@dataclass
class GlintModel:
    """Glint streaks (see module docstring)."""

    mag_zero: float = -16.8
    length_per_mag: float = 1901.0
    reach: float = 200.0
    sigma: float = 15.0
    mask_width: float = 80.0
    flux_fraction: float = 2e-3

    def length(self, m_inst):
        """Streak length (pixels) for instrumental magnitudes (<= 0 means no glint)."""
        return self.length_per_mag * (self.mag_zero - np.asarray(m_inst, dtype=np.float64))


@dataclass
class SpikeModel:
    """Diffraction spikes (see module docstring)."""

    k: float = 0.003
    d0: float = 6.0
    sigma: float = 1.0
    max_length: float = 2000.0

    def length(self, flux, threshold: float):
        """Distance (pixels) at which a spike falls below ``threshold`` e-/pixel (peak of the
        cross-section)."""
        peak = self.k * np.asarray(flux, dtype=np.float64) / (np.sqrt(2 * np.pi) * self.sigma)
        return np.clip(np.sqrt(np.maximum(peak / max(threshold, 1e-9), 0.0)) - self.d0, 0.0, self.max_length)


@dataclass
class CosmicRayModel:
    """Cosmic-ray hits.

    Attributes
    ----------
    rate : float
        Hits per cm^2 per second.
    thickness_um : float
        Depth of the sensitive silicon (micron).
    e_per_um : float
        Most probable charge deposited per micron of track (e-).
    spread : float
        Log-normal sigma of the charge (Landau-like fluctuations).
    """

    rate: float = 0.1
    thickness_um: float = 75.0
    e_per_um: float = 80.0
    spread: float = 0.35


def crosstalk_rules(camera, *, coeff: float = 5e-4) -> list[tuple[str, str, float]]:
    """Crosstalk rules of a camera: ``(source cell, victim cell, coefficient)``.

    Within each OTA cell ``xyIJ`` leaks into ``xyI(J xor 1)`` (pairs of cells sharing a video
    channel), the victim receiving ``coeff`` times the source's signal (ADU) at the same cell
    pixel coordinates. Cameras with an odd number of cell rows leave the last row without a pair.
    """
    rules = []
    for i in range(camera.ncell_x):
        for j in range(camera.ncell_y):
            k = j ^ 1
            if k < camera.ncell_y:
                rules.append((f"xy{i}{j}", f"xy{i}{k}", float(coeff)))
    return rules


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, *, exptime: float, pixel_size_um: float,
                    model: CosmicRayModel, live: np.ndarray | None = None):
    """Add cosmic-ray tracks (e-) to ``image`` in place.

    Each hit is a straight track through the sensitive thickness at an isotropic incidence
    (projected length ``thickness tan(zenith)``), depositing ``e_per_um`` per micron of path
    with log-normal (Landau-like) fluctuations, spread over the pixels it crosses by bilinear
    sharing of closely spaced samples (a little charge diffusion).

    Parameters
    ----------
    image : ndarray
        Chip image (e-), modified in place.
    rng : Generator
    exptime : float
        Seconds of exposure to cosmic rays (the dark time).
    pixel_size_um : float
        Pixel pitch (micron).
    model : CosmicRayModel
    live : ndarray, optional
        Bool mask of detector pixels (hits elsewhere are dropped).

    Returns
    -------
    index : ndarray
        Flat indices of the pixels hit.
    charge : ndarray
        Charge added to each of them (e-).
    table : ndarray
        One row per hit: x, y (start), x2, y2 (end), charge (e-).
    """
    ny, nx = image.shape
    area_cm2 = nx * ny * (pixel_size_um * 1e-4) ** 2
    n = rng.poisson(model.rate * area_cm2 * max(exptime, 0.0))
    tab = np.zeros(n, dtype=[("x", "f4"), ("y", "f4"), ("x2", "f4"), ("y2", "f4"), ("charge", "f4")])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), tab
    # isotropic flux through a plane: cos(zenith) distributed as sqrt(uniform)
    cosz = np.sqrt(rng.uniform(0.02, 1.0, n))
    tanz = np.sqrt(1 - cosz ** 2) / cosz
    depth_px = model.thickness_um / pixel_size_um
    length = np.minimum(depth_px * tanz, 60.0)
    phi = rng.uniform(0, 2 * np.pi, n)
    x0 = rng.uniform(-0.5, nx - 0.5, n)
    y0 = rng.uniform(-0.5, ny - 0.5, n)
    x1 = x0 + length * np.cos(phi)
    y1 = y0 + length * np.sin(phi)
    path_um = model.thickness_um / cosz
    charge = model.e_per_um * path_um * rng.lognormal(0.0, model.spread, n)
    tab["x"], tab["y"], tab["x2"], tab["y2"], tab["charge"] = x0, y0, x1, y1, charge
    nsamp = np.maximum(2, np.ceil(4 * length).astype(int) + 1)
    idx = np.repeat(np.arange(n), nsamp)
    first = np.repeat(np.cumsum(nsamp) - nsamp, nsamp)
    frac = (np.arange(idx.size) - first) / np.maximum(nsamp[idx] - 1, 1)
    xs = x0[idx] + frac * (x1 - x0)[idx]
    ys = y0[idx] + frac * (y1 - y0)[idx]
    w = (charge / nsamp)[idx]
    # bilinear sharing = a little charge diffusion
    xf, yf = np.floor(xs), np.floor(ys)
    ax, ay = xs - xf, ys - yf
    xi, yi = xf.astype(np.int64), yf.astype(np.int64)
    flat_idx, vals = [], []
    for dxi, dyi, wt in ((0, 0, (1 - ax) * (1 - ay)), (1, 0, ax * (1 - ay)), (0, 1, (1 - ax) * ay),
                         (1, 1, ax * ay)):
        xx, yy = xi + dxi, yi + dyi
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        flat_idx.append(yy[ok] * nx + xx[ok])
        vals.append((w * wt)[ok])
    flat_idx = np.concatenate(flat_idx)
    vals = np.concatenate(vals)
    uniq, inv = np.unique(flat_idx, return_inverse=True)
    dep = np.bincount(inv, weights=vals).astype(np.float32)
    if live is not None:
        keep = live.flat[uniq]
        uniq, dep = uniq[keep], dep[keep]
    image.flat[uniq] += dep
    return uniq, dep, tab


def bleed_columns(cell: np.ndarray, full_well: float) -> tuple[np.ndarray, np.ndarray]:
    """Spill charge above the full well up and down each column (in place).

    The excess of every run of over-full pixels is shared equally between the two directions and
    fills the neighbouring pixels up to the full well; charge reaching the cell edge is lost.
    Runs that meet merge and are processed again.

    Parameters
    ----------
    cell : ndarray
        One cell's charge (e-), ``(ny, nx)``, columns along axis 0 (y); modified in place.
    full_well : float
        Pixel capacity (e-).

    Returns
    -------
    saturated : ndarray
        Bool, pixels that were over-full before bleeding.
    bled : ndarray
        Bool, pixels filled to the full well by spilled charge.
    """
    saturated = cell > full_well
    bled = np.zeros(cell.shape, bool)
    nsat = saturated.sum(axis=0)
    # columns entirely over full: nothing to spill into, they just clip
    full = nsat == cell.shape[0]
    if full.any():
        cell[:, full] = full_well
    cols = np.flatnonzero((nsat > 0) & ~full)
    if cols.size == 0:
        return saturated, bled
    # small spills (isolated over-full pixels) resolve in a few vectorised relaxation steps:
    # each over-full pixel gives half its excess to each vertical neighbour
    sub = cell[:, cols].astype(np.float64)
    got = np.zeros(sub.shape, bool)
    for _ in range(4):
        exc = np.maximum(sub - full_well, 0.0)
        if not exc.any():
            break
        sub -= exc
        half = 0.5 * exc
        sub[:-1] += half[1:]
        sub[1:] += half[:-1]
        got[:-1] |= half[1:] > 0
        got[1:] |= half[:-1] > 0
    cell[:, cols] = sub
    bled[:, cols] = got
    cols = cols[(sub > full_well).any(axis=0)]
    ny = cell.shape[0]
    for c in cols:
        v = cell[:, c].astype(np.float64)
        for _ in range(8):
            over = v > full_well
            if not over.any():
                break
            edges = np.diff(np.concatenate([[0], over.astype(np.int8), [0]]))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            for s0, e0 in zip(starts, ends):
                excess = float(np.sum(v[s0:e0] - full_well))
                v[s0:e0] = full_well
                half = excess / 2.0
                # downwards (decreasing y)
                if s0 > 0:
                    room = full_well - v[s0 - 1::-1]
                    room = np.maximum(room, 0.0)
                    cum = np.cumsum(room)
                    k = int(np.searchsorted(cum, half))
                    fill = v[s0 - 1::-1]
                    fill[:k] = full_well
                    if k < fill.size:
                        fill[k] += half - (cum[k - 1] if k > 0 else 0.0)
                    v[s0 - 1::-1] = fill
                    bled[max(s0 - k - 1, 0):s0, c] |= True
                if e0 < ny:
                    room = np.maximum(full_well - v[e0:], 0.0)
                    cum = np.cumsum(room)
                    k = int(np.searchsorted(cum, half))
                    fill = v[e0:]
                    fill[:k] = full_well
                    if k < fill.size:
                        fill[k] += half - (cum[k - 1] if k > 0 else 0.0)
                    v[e0:] = fill
                    bled[e0:min(e0 + k + 1, ny), c] |= True
        cell[:, c] = v
    bled &= ~saturated
    return saturated, bled


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def render_ghost(image: np.ndarray, xc: float, yc: float, r_in: float, r_out: float, sb: float,
                 edge: float) -> tuple[slice, slice, np.ndarray] | None:
    """Add a uniform annulus of surface brightness ``sb`` (e-/px) centred at chip pixel
    (xc, yc) with soft edges of width ``edge`` (px). Returns the box and the added values."""
    ny, nx = image.shape
    R = r_out + edge
    x0, x1 = max(int(np.floor(xc - R)), 0), min(int(np.ceil(xc + R)) + 1, nx)
    y0, y1 = max(int(np.floor(yc - R)), 0), min(int(np.ceil(yc + R)) + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r = np.hypot(xx - xc, yy - yc)
    prof = _smoothstep((r_out + edge / 2 - r) / edge) * _smoothstep((r - r_in + edge / 2) / edge)
    add = (sb * prof).astype(np.float32)
    image[y0:y1, x0:x1] += add
    return slice(y0, y1), slice(x0, x1), add


def glint_segments(camera, chip: str, X, Y, m_inst, *, model: GlintModel):
    """Glints thrown onto ``chip`` by stars at focal-plane positions (X, Y).

    Returns a list of ``(k, x_start, y_start, ux, uy, length)`` in chip pixels: the star index,
    the streak's start on the chip edge, its unit direction into the chip and its length.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    L = model.length(m_inst)
    cand = np.flatnonzero(L > 0)
    out = []
    if cand.size == 0:
        return out
    x, y = camera.focal_to_chip(chip, X[cand], Y[cand])
    nx, ny = camera.chip_nx, camera.chip_ny
    lo_x, hi_x, lo_y, hi_y = -0.5, nx - 0.5, -0.5, ny - 0.5
    for k, xi, yi in zip(cand, x, y):
        inside_x = lo_x <= xi <= hi_x
        inside_y = lo_y <= yi <= hi_y
        if inside_x and inside_y:
            continue
        # the star must face one edge: outside in exactly one coordinate
        if inside_y and xi < lo_x and lo_x - xi <= model.reach:
            out.append((int(k), lo_x, yi, 1.0, 0.0, float(L[k])))
        elif inside_y and xi > hi_x and xi - hi_x <= model.reach:
            out.append((int(k), hi_x, yi, -1.0, 0.0, float(L[k])))
        elif inside_x and yi < lo_y and lo_y - yi <= model.reach:
            out.append((int(k), xi, lo_y, 0.0, 1.0, float(L[k])))
        elif inside_x and yi > hi_y and yi - hi_y <= model.reach:
            out.append((int(k), xi, hi_y, 0.0, -1.0, float(L[k])))
    return out


def render_glint(image: np.ndarray, xs: float, ys: float, ux: float, uy: float, length: float,
                 flux: float, model: GlintModel):
    """Add a glint streak; returns (box slices, added values) or None."""
    ny, nx = image.shape
    half = 4 * model.sigma
    xe, ye = xs + ux * length, ys + uy * length
    x0 = max(int(np.floor(min(xs, xe) - half)), 0)
    x1 = min(int(np.ceil(max(xs, xe) + half)) + 1, nx)
    y0 = max(int(np.floor(min(ys, ye) - half)), 0)
    y1 = min(int(np.ceil(max(ys, ye) + half)) + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    along = (xx - xs) * ux + (yy - ys) * uy
    across = -(xx - xs) * uy + (yy - ys) * ux
    total = model.flux_fraction * flux
    # linear fade: surface density along the streak 2 (1 - t) / L per unit length
    t = along / length
    dens = np.where((t >= 0) & (t <= 1), 2.0 * (1 - t) / length, 0.0)
    prof = np.exp(-0.5 * (across / model.sigma) ** 2) / (np.sqrt(2 * np.pi) * model.sigma)
    add = (total * dens * prof).astype(np.float32)
    image[y0:y1, x0:x1] += add
    return slice(y0, y1), slice(x0, x1), add


def render_spikes(image: np.ndarray, xc: float, yc: float, flux: float, length: float, model: SpikeModel):
    """Add four diffraction spikes along +-x and +-y of the chip; returns list of (box, values)."""
    ny, nx = image.shape
    out = []
    if length <= 0:
        return out
    half = int(np.ceil(4 * model.sigma))
    amp = model.k * flux / (np.sqrt(2 * np.pi) * model.sigma)
    for ux, uy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        xe, ye = xc + ux * (length + model.d0), yc + uy * (length + model.d0)
        x0 = max(int(np.floor(min(xc, xe) - half)), 0)
        x1 = min(int(np.ceil(max(xc, xe) + half)) + 1, nx)
        y0 = max(int(np.floor(min(yc, ye) - half)), 0)
        y1 = min(int(np.ceil(max(yc, ye) + half)) + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        along = (xx - xc) * ux + (yy - yc) * uy
        across = -(xx - xc) * uy + (yy - yc) * ux
        d = np.maximum(along, 0.0)
        # start beyond the core (the PSF dominates there) and stop at the length
        inside = (along > 2.0 * model.d0) & (along <= length + model.d0)
        add = np.where(inside, amp / (d + model.d0) ** 2 * np.exp(-0.5 * (across / model.sigma) ** 2), 0.0)
        add = add.astype(np.float32)
        image[y0:y1, x0:x1] += add
        out.append((slice(y0, y1), slice(x0, x1), add))
    return out
