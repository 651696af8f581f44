"""Artefacts the simulator puts into images.

Bright-star artefacts are *placed* by the camera's dynamic-mask rule table
(``ps1mpi/data/cameras/<camera>_masks.toml``, :func:`ps1mpi.algorithms.dynamic_masks.default_rules`)
through the same geometry the camera stage masks with
(:func:`~ps1mpi.algorithms.dynamic_masks.artifacts_for_chip`,
:func:`~ps1mpi.algorithms.dynamic_masks.crosstalk_targets`); this module decides only how bright
they are (:class:`ArtefactLight`) and draws every light profile *inside* its shape, so whatever
the truth mask marks lies inside the predicted footprint (see ``docs/sim.md``):

* ghosts -- a uniform elliptical annulus carrying ``ghost_flux_fraction[filter]`` of the star's
  flux, soft edges ``ghost_edge`` px wide inside the annulus;
* glints -- a flat-topped streak of surface brightness ``glint_sb`` times the star's flux per
  px^2, ramps over ``glint_edge`` of the width at both sides, fading to zero over the last
  ``glint_taper`` of its length;
* diffraction spikes -- line density ``spike_k F / (d + spike_d0)^2`` (``d`` from the star,
  starting beyond ``spike_d0``) with a ``cos^2`` cross-section filling the rule's width, fading to
  zero over the last ``spike_taper`` of the rule's length;
* saturated-star cores -- no light of their own (the star saturates and bleeds by itself); the
  truth records the rule's circle;
* crosstalk -- electronic: :func:`crosstalk_rules` turns the table's chip-independent
  intra-chip couplings into the instrument's cell-to-cell coefficients (the whole cell's signal
  leaks); couplings specific to a chip or between chips are drawn by
  :mod:`ps1mpi.sim.exposure` as images of the bright stars (:func:`crosstalk_image`).

The rules' magnitude limits are *not* used to decide which stars make artefacts: every star
whose artefact could reach ``visible_fraction`` of the mask threshold gets one
(:func:`artefact_sources`, :func:`placement_rules`), so the benchmark
``ps1mpi bench camera-accuracy`` tests the limits against the physics.

Also here: cosmic rays (:func:`add_cosmic_rays`, straight tracks through a 75 um thick
detector) and saturation bleeding (:func:`bleed_columns`, charge above the full well spills up
and down the column, within the cell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from ps1mpi.algorithms.dynamic_masks import (Artifact, DynamicMaskRules, default_rules,
                                             ghost_geometry)

__all__ = [
    "ArtefactLight", "CosmicRayModel", "artefact_sources", "placement_rules", "render_artifact",
    "crosstalk_rules", "crosstalk_image", "add_cosmic_rays", "bleed_columns",
]


@dataclass(frozen=True)
class ArtefactLight:
    """How bright the simulated bright-star artefacts are (where and how big: the rules).

    Attributes
    ----------
    ghost_flux_fraction : dict
        Fraction of the star's flux in its ghost, per filter.
    ghost_edge : float
        Width of the soft edges of the ghost annulus, inside it (px).
    glint_sb : float
        Glint surface brightness as a fraction of the star's total flux per px^2.
    glint_edge : float
        Width of each side ramp of the glint cross-section, as a fraction of its width.
    glint_taper : float
        Fraction of the glint's length over which it fades to zero at its far end.
    spike_k : float
        Spike line density ``spike_k F / (d + spike_d0)^2`` (e- per px of length; ``F`` the
        star's flux in e-, ``d`` px from the star).
    spike_d0 : float
        Softening of the spike profile, and where it starts (px from the star).
    spike_taper : float
        Fraction of the spike's length over which it fades to zero at its end.
    visible_fraction : float
        Stars whose artefact's brightest light exceeds this fraction of the mask threshold get
        one (fainter ones are left out as invisible).
    crosstalk_core : float
        A crosstalk image is recorded (and drawn for chip-specific couplings) when its flux
        exceeds this many times the mask threshold (e-): the light of a PSF core at 0.5 sky
        sigma.
    """

    ghost_flux_fraction: Mapping[str, float] = field(default_factory=lambda: {
        "g": 0.006, "r": 0.005, "i": 0.004, "z": 0.004, "y": 0.004, "w": 0.005})
    ghost_edge: float = 3.0
    glint_sb: float = 5.0e-8
    glint_edge: float = 0.05
    glint_taper: float = 0.2
    spike_k: float = 0.01
    spike_d0: float = 6.0
    spike_taper: float = 0.2
    visible_fraction: float = 0.1
    crosstalk_core: float = 20.0

    def ghost_sb(self, flux: np.ndarray, band: str, a_in: np.ndarray, b_in: np.ndarray,
                 a_out: np.ndarray, b_out: np.ndarray) -> np.ndarray:
        """Surface brightness (e-/px) of ghosts of stars of ``flux`` (e-) with these semi-axes
        (px); 0 for empty annuli."""
        area = np.pi * (np.asarray(a_out) * b_out - np.asarray(a_in) * b_in)
        with np.errstate(divide="ignore", invalid="ignore"):
            sb = np.asarray(flux, dtype=float) * self.ghost_flux_fraction[band] / area
        return np.where(area > 0, sb, 0.0)

    def spike_peak(self, flux: np.ndarray, width: np.ndarray) -> np.ndarray:
        """Brightest spike surface brightness (e-/px), where the spike starts."""
        return 2.0 * self.spike_k * np.asarray(flux, dtype=float) / (
            np.maximum(np.asarray(width, dtype=float), 1e-9) * (2.0 * self.spike_d0) ** 2)


def placement_rules(rules: DynamicMaskRules) -> DynamicMaskRules:
    """The rules with the ghost and glint magnitude limits opened: the simulator places the
    artefacts of every star its physics makes visible (:func:`artefact_sources` chooses them),
    with the rules' geometry."""
    inf = {b: math.inf for b in ("g", "r", "i", "z", "y", "w")}
    return replace(rules, ghost=replace(rules.ghost, max_mag=inf),
                   glint=replace(rules.glint, max_mag=inf),
                   enabled=("ghost", "glint", "starcore", "spike", "crosstalk"))


def artefact_sources(rules: DynamicMaskRules, light: ArtefactLight, X: np.ndarray,
                     Y: np.ndarray, flux: np.ndarray, *, band: str, threshold: float
                     ) -> dict[str, np.ndarray]:
    """Which stars make which artefacts.

    Parameters
    ----------
    rules : DynamicMaskRules
        The camera's table (geometry).
    light : ArtefactLight
        Brightness of the artefacts.
    X, Y : ndarray
        Focal-plane positions of the stars (px from the optical axis).
    flux : ndarray
        Their flux in the exposure (e-).
    band : str
        Filter.
    threshold : float
        Truth-mask threshold (e- per px): 0.5 sky sigma.

    Returns
    -------
    dict
        Indices into the inputs for ``starcore`` and ``spike`` (brighter than the star-core
        limit; the spike length law decides the rest), ``ghost`` (ghost surface brightness
        above ``visible_fraction * threshold``), ``glint`` (glint surface brightness above it
        and a positive length) and ``crosstalk`` (image flux above ``crosstalk_core *
        threshold`` through the strongest coupling).
    """
    X = np.asarray(X, dtype=float)
    Y = np.asarray(Y, dtype=float)
    F = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(F > 0, -2.5 * np.log10(np.maximum(F, 1e-300)), np.inf)
    vis = light.visible_fraction * float(threshold)
    out: dict[str, np.ndarray] = {}
    out["starcore"] = out["spike"] = np.flatnonzero(m < rules.starcore.max_mag)
    # ghosts: the annulus axes depend on the source radius only; the smallest annulus over the
    # field bounds the surface brightness, so only stars that could pass are looked at closely
    rr = np.linspace(0.0, float(np.hypot(X, Y).max()) if X.size else 0.0, 257)
    g0 = ghost_geometry(rr, np.zeros_like(rr), rules.ghost)
    a_min = max(float(np.min(np.pi * (g0["a_out"] * g0["b_out"] - g0["a_in"] * g0["b_in"]))), 0.0)
    cand = np.flatnonzero(F * light.ghost_flux_fraction[band] > vis * a_min)
    g = ghost_geometry(X[cand], Y[cand], rules.ghost)
    sb = light.ghost_sb(F[cand], band, g["a_in"], g["b_in"], g["a_out"], g["b_out"])
    out["ghost"] = cand[sb > vis]
    out["glint"] = np.flatnonzero((light.glint_sb * F > vis) & (m < rules.glint.length_zero))
    if rules.crosstalk.rules:
        coupling = 10.0 ** (-0.4 * min(r.magdiff for r in rules.crosstalk.rules))
        out["crosstalk"] = np.flatnonzero(coupling * F > light.crosstalk_core * float(threshold))
    else:
        out["crosstalk"] = np.zeros(0, int)
    return out


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _grid(shape: tuple[int, int], bbox: tuple[float, float, float, float]
          ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Pixel-centre grid of a bounding box clipped to an image."""
    ny, nx = shape
    x0, x1, y0, y1 = bbox
    i0, i1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), nx - 1)
    j0, j1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), ny - 1)
    if i1 < i0 or j1 < j0:
        return None
    xx = np.arange(i0, i1 + 1, dtype=float)[None, :]
    yy = np.arange(j0, j1 + 1, dtype=float)[:, None]
    return slice(j0, j1 + 1), slice(i0, i1 + 1), xx, yy


def _boundary_radius(phi: np.ndarray, a: float, b: float) -> np.ndarray:
    """Distance from an ellipse's centre to its edge in the direction ``phi`` (its frame)."""
    return 1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2)


def _box_pieces(shape: tuple[int, int], a: Artifact, step: float = 256.0):
    """A box artefact cut along its length into pieces of at most ``step`` px (so a long
    diagonal box never makes a grid of its whole bounding box): yields
    ``(sy, sx, u, v, in_piece)``."""
    n = max(1, int(math.ceil(a.a / step)))
    for k in range(n):
        u0, u1 = a.a * k / n, a.a * (k + 1) / n
        piece = replace(a, x=a.x + u0 * math.cos(a.theta), y=a.y + u0 * math.sin(a.theta),
                        a=u1 - u0)
        g = _grid(shape, piece.bbox())
        if g is None:
            continue
        sy, sx, xx, yy = g
        u, v = a.frame(xx, yy)
        sel = (u >= u0) & ((u < u1) | ((k == n - 1) & (u <= u1))) & (np.abs(v) <= 0.5 * a.b)
        if sel.any():
            yield sy, sx, u, v, sel


def render_artifact(image: np.ndarray, art: Artifact, flux: float, *, light: ArtefactLight,
                    band: str) -> list[tuple[slice, slice, np.ndarray]]:
    """Add the light of one placed artefact to ``image`` (e-, in place).

    Parameters
    ----------
    image : ndarray
        Chip image (e- on a unit-response detector), ``(ny, nx)``.
    art : Artifact
        The artefact in this chip's frame (from
        :func:`~ps1mpi.algorithms.dynamic_masks.artifacts_for_chip`).
    flux : float
        Flux of its source star in the exposure (e-).
    light : ArtefactLight
        Brightness parameters.
    band : str
        Filter.

    Returns
    -------
    list of (slice, slice, ndarray)
        The boxes touched and the values added there (e-); nothing for star cores and
        crosstalk (electronic, see :func:`crosstalk_image`). All light lies at pixel centres
        inside the artefact's shape (:meth:`Artifact.inside`).
    """
    out: list[tuple[slice, slice, np.ndarray]] = []
    F = float(flux)
    if art.kind == "ghost":
        if art.a <= 0 or art.b <= 0:
            return out
        sb = float(light.ghost_sb(F, band, art.a_in, art.b_in, art.a, art.b))
        g = _grid(image.shape, art.bbox())
        if g is None or sb <= 0:
            return out
        sy, sx, xx, yy = g
        u, v = art.frame(xx, yy)
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        prof = _smoothstep((_boundary_radius(phi, art.a, art.b) - rho) / light.ghost_edge)
        if art.a_in > 0 and art.b_in > 0:
            prof *= _smoothstep((rho - _boundary_radius(phi, art.a_in, art.b_in))
                                / light.ghost_edge)
        add = (sb * prof).astype(np.float32)
        image[sy, sx] += add
        out.append((sy, sx, add))
    elif art.kind == "glint":
        sb = light.glint_sb * F
        ramp = max(light.glint_edge * art.b, 1e-6)
        taper = max(light.glint_taper * art.a, 1e-6)
        for sy, sx, u, v, sel in _box_pieces(image.shape, art):
            prof = _smoothstep((0.5 * art.b - np.abs(v)) / ramp) * _smoothstep((art.a - u) / taper)
            add = np.where(sel, sb * prof, 0.0).astype(np.float32)
            image[sy, sx] += add
            out.append((sy, sx, add))
    elif art.kind == "spike":
        d0 = light.spike_d0
        taper = max(light.spike_taper * art.a, 1e-6)
        for sy, sx, u, v, sel in _box_pieces(image.shape, art):
            dens = light.spike_k * F / (np.maximum(u, 0.0) + d0) ** 2 * _smoothstep((art.a - u) / taper)
            across = (2.0 / art.b) * np.cos(np.pi * v / art.b) ** 2
            add = np.where(sel & (u >= d0), dens * across, 0.0).astype(np.float32)
            image[sy, sx] += add
            out.append((sy, sx, add))
    return out


def crosstalk_rules(camera: Any, *, coeff: float | None = None,
                    rules: DynamicMaskRules | None = None) -> list[tuple[str, str, float]]:
    """The instrument's crosstalk: ``(source cell, victim cell, coefficient)``.

    The chip-independent intra-chip couplings of the camera's rule table (``rules``, default
    :func:`~ps1mpi.algorithms.dynamic_masks.default_rules` of the camera): the victim receives
    ``10 ** (-0.4 magdiff)`` times the source cell's signal (ADU) at the same cell pixel
    coordinates. Couplings tied to a chip column or reaching another chip are not cell-to-cell
    coefficients of every chip; :mod:`ps1mpi.sim.exposure` draws them (:func:`crosstalk_image`).

    Parameters
    ----------
    camera : Camera
        Camera geometry.
    coeff : float, optional
        The coefficient the caller expects (the :class:`~ps1mpi.sim.instrument.Instrument`
        passes its ``crosstalk_coeff``): every coupling must equal it.
    rules : DynamicMaskRules, optional
        The rule table.

    Raises
    ------
    ValueError
        When ``coeff`` disagrees with the table.
    """
    rules = rules or default_rules(camera)
    out = []
    for r in rules.crosstalk.rules:
        if not r.chip_independent:
            continue
        c = float(f"{10.0 ** (-0.4 * r.magdiff):.12g}")
        if coeff is not None and not math.isclose(c, coeff, rel_tol=1e-6):
            raise ValueError(f"crosstalk coefficient {coeff!r} disagrees with the "
                             f"{getattr(camera, 'name', camera)} rule table "
                             f"(magdiff {r.magdiff} = {c:.6g}): the couplings come from "
                             "<camera>_masks.toml")
        for i in range(camera.ncell_x):
            for j in range(camera.ncell_y):
                if (r.src_cell_col >= 0 and i != r.src_cell_col) or \
                        (r.src_cell_row >= 0 and j != r.src_cell_row):
                    continue
                ti, tj = i + r.dcell_col, j + r.dcell_row
                if 0 <= ti < camera.ncell_x and 0 <= tj < camera.ncell_y and (ti, tj) != (i, j):
                    out.append((f"xy{i}{j}", f"xy{ti}{tj}", c))
    return out


def crosstalk_image(stamp: np.ndarray, flux: float, ratio: float, *, full_well: float,
                    gain: float) -> np.ndarray:
    """ADU that a star's readout puts into a victim cell through a coupling ``ratio``.

    Parameters
    ----------
    stamp : ndarray
        The star's pixel-integrated unit-flux PSF stamp as read out in its own cell.
    flux : float
        Its flux (e-).
    ratio : float
        Coupling (victim ADU per source ADU).
    full_well : float
        Source pixel capacity (e-): saturated pixels couple their full well.
    gain : float
        Source cell gain (e-/ADU).

    Returns
    -------
    ndarray
        The image (ADU), same shape as ``stamp``.
    """
    return (np.minimum(np.asarray(stamp, dtype=float) * float(flux), full_well) / gain
            * ratio).astype(np.float32)


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


