"""One science exposure of the simulated survey, chip by chip, with its truth.

:func:`exposure_context` prepares what every chip of an exposure shares (the true focal-plane
model, the PSF, the sources in the field with their focal-plane positions and fluxes at the
time of the exposure, the stars that make artefacts and their crosstalk images);
:func:`simulate_chip` renders one chip: sky with gradient and fringes, stars, galaxies,
transients and moving objects through the PSF, the bright-star artefacts (diffraction spikes,
optical ghosts, glints) placed by the camera's dynamic-mask rule table -- the geometry the
camera stage masks with (:func:`ps1mpi.algorithms.dynamic_masks.artifacts_for_chip`) -- with the
brightness of :class:`ps1mpi.sim.artefacts.ArtefactLight`, then the detector
(:func:`ps1mpi.sim.instrument.expose_chip`, whose cell-to-cell crosstalk is the table's
chip-independent part; the table's other couplings are drawn as images of the bright stars),
and returns the raw cells, their headers and the truth (source table, truth mask, artefact
table, true WCS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.dynamic_masks import (KIND_BITS, BrightStars, DynamicMaskRules,
                                             artifacts_for_chip, crosstalk_targets, default_rules)
from ps1mpi.geometry.focalplane import Distortion, FocalPlaneModel
from ps1mpi.sim import psf as P
from ps1mpi.sim.artefacts import (ArtefactLight, artefact_sources, crosstalk_image, crosstalk_rules,
                                  placement_rules, render_artifact)
from ps1mpi.sim.instrument import FILTER_ID, Instrument, expose_chip
from ps1mpi.sim.sky import (Sky, offset_point, angular_sep_deg, mjd_to_year, mover_positions_at,
                            propagate, REF_EPOCH, star_mags_at, transient_mags_at)

__all__ = ["SRC_DTYPE", "TRUTH_DTYPE", "ARTEFACT_DTYPE", "KIND_NAMES", "ExposureContext", "ChipResult",
           "exposure_context", "simulate_chip", "raw_primary_header", "mjd_to_iso"]

KIND_STAR, KIND_GALAXY, KIND_TRANSIENT, KIND_MOVER = 0, 1, 2, 3
KIND_NAMES = {KIND_STAR: "star", KIND_GALAXY: "galaxy", KIND_TRANSIENT: "transient", KIND_MOVER: "mover"}

SRC_DTYPE = np.dtype([
    ("id", "i8"), ("kind", "i1"), ("ra", "f8"), ("dec", "f8"), ("X", "f8"), ("Y", "f8"),
    ("mag", "f4"), ("flux", "f4"), ("sersic_n", "f4"), ("r_e", "f4"), ("q", "f4"), ("pa", "f4"),
    ("trail_X", "f4"), ("trail_Y", "f4"),
])

#: Columns of the per-chip truth source table (units in docs/sim.md).
TRUTH_DTYPE = np.dtype([
    ("ID", "i8"), ("KIND", "i1"), ("RA", "f8"), ("DEC", "f8"), ("X", "f8"), ("Y", "f8"),
    ("CELL", "S4"), ("MAG", "f4"), ("FLUX", "f4"), ("FLUX_STAMP", "f4"), ("PEAK", "f4"),
    ("FLAT", "f4"), ("PSF_FWHM", "f4"), ("PSF_CORE_FWHM", "f4"), ("PSF_E1", "f4"), ("PSF_E2", "f4"),
    ("SERSIC_N", "f4"), ("R_E", "f4"), ("AXIS_RATIO", "f4"), ("THETA", "f4"),
    ("TRAIL_X", "f4"), ("TRAIL_Y", "f4"), ("SATURATED", "u1"), ("MASKBITS", "u2"),
])

#: Columns of the per-chip artefact table: the placed shapes (``Artifact`` of
#: :mod:`ps1mpi.algorithms.dynamic_masks`, units in docs/sim.md) and the light drawn.
ARTEFACT_DTYPE = np.dtype([
    ("TYPE", "S10"), ("SOURCE_ID", "i8"), ("X", "f4"), ("Y", "f4"), ("A", "f4"), ("B", "f4"),
    ("THETA", "f4"), ("A_IN", "f4"), ("B_IN", "f4"), ("MAG", "f4"), ("FLUX", "f4"), ("SB", "f4"),
])


def mjd_to_iso(mjd: float) -> str:
    """MJD (UTC) -> ISO-8601 string ``YYYY-MM-DDThh:mm:ss.sss``."""
    import datetime as _dt
    t = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


@dataclass
class ExposureContext:
    """What the chips of one exposure share."""

    row: np.void
    inst: Instrument
    model: FocalPlaneModel
    psf: P.ExposurePSF
    band: str
    sources: np.ndarray
    bright: np.ndarray
    rules: DynamicMaskRules | None = None
    light: ArtefactLight = field(default_factory=ArtefactLight)
    mask_nsigma: float = 0.5
    camera_code: str = "t"
    #: instrumental magnitude of every source, -2.5 log10(flux / e-) (inf when flux <= 0)
    m_inst: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: indices into ``sources`` of the stars making each kind of artefact
    artefact_sources: dict = field(default_factory=dict)
    #: crosstalk images of the ``crosstalk`` stars: ``crosstalk_targets`` output with ``source``
    #: indexing ``sources`` and the source's chip and chip position (``src_chip``, ``src_x``,
    #: ``src_y``)
    crosstalk: dict = field(default_factory=dict)
    #: whether the instrument's cell-to-cell crosstalk is the table's chip-independent part
    instrument_crosstalk: bool = True

    @property
    def placement(self) -> DynamicMaskRules:
        """The rules the artefacts are placed with (magnitude limits opened)."""
        return placement_rules(self.rules or default_rules(self.inst.camera))

    @property
    def exptime(self) -> float:
        return float(self.row["exptime"])

    @property
    def sky_e(self) -> float:
        return float(self.row["sky_e"])

    @property
    def sky_sigma(self) -> float:
        """Per-pixel noise of the sky at the field centre (e-)."""
        rn = self.inst.camera.read_noise * self.inst.camera.gain
        return math.sqrt(self.sky_e + rn * rn)


@dataclass
class ChipResult:
    """One simulated chip: raw data and truth."""

    chip: str
    cells: dict[str, np.ndarray]
    header: dict
    cell_headers: dict[str, dict]
    truth: np.ndarray
    truth_mask: np.ndarray
    artefacts: np.ndarray
    cosmic_rays: np.ndarray
    truth_header: dict
    wcs_header: object


def exposure_context(row: np.void, *, inst: Instrument, sky: Sky, distortion: Distortion,
                     camera_code: str = "t", mask_nsigma: float = 0.5,
                     rules: DynamicMaskRules | None = None,
                     light: ArtefactLight | None = None) -> ExposureContext:
    """Prepare the shared state of one exposure (plan row ``row``, see :mod:`ps1mpi.sim.plan`).

    ``rules`` (default: the camera's table, :func:`~ps1mpi.algorithms.dynamic_masks.default_rules`)
    place the bright-star artefacts, ``light`` (default :class:`ArtefactLight`) sets their
    brightness; ``mask_nsigma`` is the truth-mask threshold in sky sigmas.
    """
    cam = inst.camera
    band = row["band"].decode() if isinstance(row["band"], bytes) else str(row["band"])
    model = FocalPlaneModel(ra=float(row["ra"]), dec=float(row["dec"]), pa=float(row["pa"]),
                            scale=cam.pixel_scale, distortion=distortion)
    psf = P.ExposurePSF(seeing=float(row["seeing"]), beta=float(row["psf_beta"]), e1=float(row["psf_e1"]),
                        e2=float(row["psf_e2"]), astig=float(row["psf_astig"]),
                        fwhm_radial=float(row["psf_fwhm_radial"]), wing_frac=float(row["psf_wing_frac"]),
                        wing_scale=float(row["psf_wing_scale"]), wing_beta=float(row["psf_wing_beta"]),
                        field_radius=inst.field_radius, pixel_scale=cam.pixel_scale)
    exptime = float(row["exptime"])
    mjd_mid = float(row["mjd"]) + 0.5 * exptime / 86400.0
    zp = float(row["zp"])
    reach_deg = (inst.field_radius * 1.15 + 400.0) * cam.pixel_scale / 3600.0
    parts = []

    def _add(kind, ids, ra, dec, mag, **extra):
        sel = angular_sep_deg(ra, dec, model.ra, model.dec) < reach_deg
        sel &= np.isfinite(mag)
        k = int(sel.sum())
        a = np.zeros(k, SRC_DTYPE)
        a["id"], a["kind"], a["ra"], a["dec"], a["mag"] = ids[sel], kind, ra[sel], dec[sel], mag[sel]
        for key, val in extra.items():
            a[key] = np.asarray(val)[sel]
        parts.append(a)

    st = sky.stars
    ra_s, dec_s = propagate(st["ra"], st["dec"], st["pmra"], st["pmdec"], mjd_to_year(mjd_mid) - REF_EPOCH)
    _add(KIND_STAR, st["id"], ra_s, dec_s, star_mags_at(st, band, mjd_mid))
    gl = sky.galaxies
    _add(KIND_GALAXY, gl["id"], gl["ra"], gl["dec"], gl[band].astype(np.float64),
         sersic_n=gl["sersic_n"], r_e=gl["r_e"], q=gl["q"], pa=gl["pa"])
    if sky.transients.size:
        tr = sky.transients
        _add(KIND_TRANSIENT, tr["id"], tr["ra"], tr["dec"], transient_mags_at(tr, band, mjd_mid))
    if sky.movers.size:
        mv = sky.movers
        ra_m, dec_m = mover_positions_at(mv, mjd_mid)
        ra0, dec0 = mover_positions_at(mv, mjd_mid - 0.5 * exptime / 86400.0)
        ra1, dec1 = mover_positions_at(mv, mjd_mid + 0.5 * exptime / 86400.0)
        recent = np.abs(mjd_mid - mv["mjd0"]) < 1.0
        mag = np.where(recent, mv[band].astype(np.float64), np.inf)
        X0, Y0 = model.sky_to_focal(ra0, dec0)
        X1, Y1 = model.sky_to_focal(ra1, dec1)
        _add(KIND_MOVER, mv["id"], ra_m, dec_m, mag, trail_X=X1 - X0, trail_Y=Y1 - Y0)
    src = np.concatenate(parts)
    for a in range(0, src.size, 100_000):        # in pieces: the inverse distortion's temporaries
        sl = slice(a, a + 100_000)
        src["X"][sl], src["Y"][sl] = model.sky_to_focal(src["ra"][sl], src["dec"][sl])
    src["flux"] = exptime * 10 ** (-0.4 * (src["mag"] - zp))
    # stars making artefacts anywhere in and around the field: placed by the camera's rule
    # table, chosen by the physics (artefact light reaching a tenth of the mask threshold)
    sig = math.sqrt(float(row["sky_e"]) + (cam.read_noise * cam.gain) ** 2)
    thr = mask_nsigma * sig
    rules = rules if rules is not None else default_rules(cam)
    ctx = ExposureContext(row=row, inst=inst, model=model, psf=psf, band=band, sources=src,
                          bright=np.zeros(0, int), rules=rules,
                          light=light if light is not None else ArtefactLight(),
                          mask_nsigma=mask_nsigma, camera_code=camera_code)
    f = src["flux"].astype(np.float64)
    with np.errstate(divide="ignore"):
        ctx.m_inst = np.where(f > 0, -2.5 * np.log10(np.maximum(f, 1e-300)), np.inf)
    stars = np.flatnonzero((src["kind"] == KIND_STAR) & (f > 0))
    chosen = artefact_sources(rules, ctx.light, src["X"][stars], src["Y"][stars], f[stars],
                              band=band, threshold=thr)
    ctx.artefact_sources = {k: stars[v] for k, v in chosen.items()}
    ctx.bright = np.unique(np.concatenate([np.zeros(0, int)] + list(ctx.artefact_sources.values())))
    # crosstalk: the instrument couples cells by the table's chip-independent rules; the other
    # rules are drawn here as images of the bright stars
    ctx.instrument_crosstalk = (sorted(crosstalk_rules(cam, rules=rules))
                                == sorted(inst.crosstalk))
    xt = ctx.artefact_sources["crosstalk"]
    if xt.size and rules.crosstalk.rules:
        bs = BrightStars(src["X"][xt], src["Y"][xt], ctx.m_inst[xt]).locate(cam)
        ctx.crosstalk = crosstalk_targets(bs, camera=cam, model=rules.crosstalk,
                                          detection_limit_mag=np.inf)
        loc = ctx.crosstalk["source"]
        ctx.crosstalk["source"] = xt[loc]           # index into the sources
        ctx.crosstalk["src_chip"] = np.asarray(bs.chip)[loc].astype(str)
        ctx.crosstalk["src_x"] = np.asarray(bs.x)[loc]
        ctx.crosstalk["src_y"] = np.asarray(bs.y)[loc]
    return ctx


def raw_primary_header(ctx: ExposureContext, chip: str) -> dict:
    """Primary keywords of a raw chip file of this exposure (see docs/raw-format.md)."""
    row = ctx.row
    cam = ctx.inst.camera
    return {
        "EXPNAME": row["expname"].decode(),
        "TELESCOP": "PS1",
        "INSTRUME": cam.name,
        "CAMERA": cam.name,
        "DETECTOR": cam.chip(chip).name,
        "OBSTYPE": "OBJECT",
        "OBJECT": f"pointing{int(row['pointing'])}",
        "FILTERID": FILTER_ID[ctx.band],
        "FILTER": ctx.band,
        "RA": (float(row["ra_hdr"]), "commanded boresight RA (deg, ICRS)"),
        "DEC": (float(row["dec_hdr"]), "commanded boresight Dec (deg, ICRS)"),
        "POSANGLE": (float(row["pa_hdr"]), "PA of focal-plane +Y, N through E (deg)"),
        "MJD-OBS": (float(row["mjd"]), "MJD (UTC) at exposure start (d)"),
        "DATE-OBS": (mjd_to_iso(float(row["mjd"])), "UTC at exposure start"),
        "EXPTIME": (float(row["exptime"]), "exposure time (s)"),
        "DARKTIME": (float(row["exptime"]), "dark time (s)"),
        "AIRMASS": (float(row["airmass"]), "airmass at exposure start"),
        "SIMULATD": (True, "made by ps1mpi sim"),
    }


def _cell_headers(ctx: ExposureContext, chip: str) -> tuple[dict, dict, dict, dict]:
    el = ctx.inst.electronics(chip)
    return ({c: e.gain for c, e in el.items()}, {c: e.read_noise for c, e in el.items()},
            {c: e.saturate for c, e in el.items()}, {c: e.maxlin for c, e in el.items()})


def _chip_angles(ctx: ExposureContext, chip: str, ra, dec, pa_deg) -> np.ndarray:
    """Angle (rad, from +x towards +y in chip pixels) of sky position angles ``pa_deg``."""
    cam = ctx.inst.camera
    a = np.radians(np.asarray(pa_deg, dtype=np.float64))
    ra1, dec1 = offset_point(ra, dec, np.sin(a) * 1.0, np.cos(a) * 1.0)
    x0, y0 = ctx.model.sky_to_pixel(cam, chip, ra, dec)
    x1, y1 = ctx.model.sky_to_pixel(cam, chip, ra1, dec1)
    return np.arctan2(y1 - y0, x1 - x0)


def _crosstalk_images(ctx: ExposureContext, chip: str, cells: dict[str, np.ndarray],
                      truth_mask: np.ndarray, thr_e: float) -> list[tuple]:
    """Crosstalk images on ``chip`` of the exposure's bright stars (``ctx.crosstalk``): table
    rows for all of them; those of the couplings the instrument does not apply (tied to a chip
    column or between chips) are added to the raw ``cells`` (ADU, in place) as the source's
    read-out image (saturated at its full well) times the coupling, and marked CROSSTALK in the
    truth mask where they exceed ``thr_e`` (e-) over the gain."""
    ct = ctx.crosstalk
    if not ct or ct["source"].size == 0:
        return []
    cam = ctx.inst.camera
    src = ctx.sources
    rules = (ctx.rules or default_rules(cam)).crosstalk.rules
    drawn_here = np.array([not (ctx.instrument_crosstalk and r.chip_independent) for r in rules])
    thr_adu = thr_e / cam.gain
    y0d, y1d, x0d, x1d = cam.datasec
    extra: dict[str, np.ndarray] = {}
    rows = []
    for j in np.flatnonzero(ct["chip"] == chip):
        k = int(ct["source"][j])
        flux = float(src["flux"][k])
        ratio = float(ct["flux_ratio"][j])
        rows.append(("CROSSTALK", src["id"][k], ct["x"][j], ct["y"][j], 0.0, 0.0, 0.0, 0.0, 0.0,
                     ct["mag"][j], ratio * flux, np.nan))
        if not drawn_here[int(ct["rule"][j])]:
            continue
        src_chip = str(ct["src_chip"][j])
        src_cell = str(cam.cell_at(ct["src_x"][j], ct["src_y"][j]))
        if not src_cell or src_cell in ctx.inst.dead_cells(src_chip):
            continue
        el = ctx.inst.electronics(src_chip)[src_cell]
        lay = cam.chip(src_chip)
        fw, e1f, e2f = ctx.psf.at_focal(np.array([src["X"][k]]), np.array([src["Y"][k]]))
        e1, e2 = P.shape_to_chip(e1f, e2f, lay.xparity, lay.yparity)
        r = int(P.stamp_radius(np.array([flux * ratio]), fw, psf=ctx.psf,
                               threshold=0.1 * thr_e)[0])
        stamps, ix, iy = P.render_point_stamps(np.array([ct["x"][j]]), np.array([ct["y"][j]]),
                                               fw, e1, e2, psf=ctx.psf, radius=r)
        img = crosstalk_image(stamps[0], flux, ratio, full_well=el.full_well, gain=el.gain)
        cell = str(ct["cell"][j])
        cx0, cy0 = cam.cell_origin(cell)
        # stamp pixels that fall inside the target cell
        xa, ya = int(ix[0]) - r - cx0, int(iy[0]) - r - cy0
        sx0, sy0 = max(xa, 0), max(ya, 0)
        sx1, sy1 = min(xa + 2 * r + 1, cam.cell_nx), min(ya + 2 * r + 1, cam.cell_ny)
        if sx0 >= sx1 or sy0 >= sy1:
            continue
        acc = extra.setdefault(cell, np.zeros((cam.cell_ny, cam.cell_nx), np.float32))
        acc[sy0:sy1, sx0:sx1] += img[sy0 - ya:sy1 - ya, sx0 - xa:sx1 - xa]
    for cell, acc in extra.items():
        raw = cells[cell].astype(np.float32)
        raw[y0d:y1d, x0d:x1d] += acc
        np.rint(raw, out=raw)
        np.clip(raw, 0.0, 65535.0, out=raw)
        cells[cell] = raw.astype(np.uint16)
        cx0, cy0 = cam.cell_origin(cell)
        sub = truth_mask[cy0:cy0 + cam.cell_ny, cx0:cx0 + cam.cell_nx]
        sub[acc > thr_adu] |= maskbits.CROSSTALK
    return rows


def simulate_chip(ctx: ExposureContext, chip: str, *, rng: np.random.Generator) -> ChipResult:
    """Render one chip of the exposure and expose it (see module docstring)."""
    inst = ctx.inst
    cam = inst.camera
    chip = cam.chip(chip).name
    lay = cam.chip(chip)
    ny, nx = cam.chip_ny, cam.chip_nx
    psf = ctx.psf
    R = inst.field_radius
    sig = inst.chip(chip)
    # ---- sky with a gradient (rank-2 outer product) and fringes
    X, _ = cam.chip_to_focal(chip, np.arange(nx, dtype=np.float64), np.zeros(1))
    _, Y = cam.chip_to_focal(chip, np.zeros(1), np.arange(ny, dtype=np.float64))
    gx, gy = float(ctx.row["sky_grad_x"]), float(ctx.row["sky_grad_y"])
    left = np.stack([np.ones(ny), gy * Y / R], axis=1).astype(np.float32)
    right = np.stack([ctx.sky_e * (1.0 + gx * X / R), ctx.sky_e * np.ones(nx)], axis=0).astype(np.float32)
    light = left @ right
    ff = float(ctx.row["fringe_factor"])
    fringe = inst.fringe_pattern(chip, ctx.band)
    if fringe is not None:
        light *= 1.0 + np.float32(ff) * fringe
    del fringe
    thr_e = ctx.mask_nsigma * ctx.sky_sigma
    # ---- sources near the chip
    src = ctx.sources
    x, y = cam.focal_to_chip(chip, src["X"], src["Y"])
    margin = 330.0
    near = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
    idx = np.flatnonzero(near)
    s = src[idx]
    xs, ys = x[idx], y[idx]
    fw, e1f, e2f = psf.at_focal(s["X"], s["Y"])
    e1, e2 = P.shape_to_chip(e1f, e2f, lay.xparity, lay.yparity)
    flux = s["flux"].astype(np.float64)
    frac = np.zeros(idx.size)
    peak = np.zeros(idx.size)
    theta = np.zeros(idx.size)
    thr_stamp = 0.02 * math.sqrt(ctx.sky_e)
    # point sources (stars, transients) and trailed movers
    pts = np.flatnonzero(s["kind"] != KIND_GALAXY)
    if pts.size:
        tx = s["trail_X"][pts] * lay.xparity
        ty = s["trail_Y"][pts] * lay.yparity
        nsub = np.clip(np.ceil(np.hypot(tx, ty) / 0.5).astype(int), 1, 64)
        rep = np.repeat(np.arange(pts.size), nsub)
        first = np.repeat(np.cumsum(nsub) - nsub, nsub)
        off = (np.arange(rep.size) - first + 0.5) / nsub[rep] - 0.5
        px = xs[pts][rep] + off * tx[rep]
        py = ys[pts][rep] + off * ty[rep]
        pf = flux[pts][rep] / nsub[rep]
        rad = P.stamp_radius(flux[pts], fw[pts], psf=psf, threshold=thr_stamp)[rep]
        for r_ in np.unique(rad):
            sel = np.flatnonzero(rad == r_)
            inb = (px[sel] > -r_) & (px[sel] < nx - 1 + r_) & (py[sel] > -r_) & (py[sel] < ny - 1 + r_)
            sel = sel[inb]
            if sel.size == 0:
                continue
            k = pts[rep[sel]]
            fsum, fmax = P.render_points_into(light, px[sel], py[sel], pf[sel], fw[k], e1[k], e2[k], psf=psf,
                                              radius=int(r_))
            np.add.at(frac, k, fsum / nsub[rep[sel]])
            np.maximum.at(peak, k, fmax * pf[sel])
    # galaxies
    gal = np.flatnonzero(s["kind"] == KIND_GALAXY)
    if gal.size:
        re_px = s["r_e"][gal] / cam.pixel_scale
        theta[gal] = _chip_angles(ctx, chip, s["ra"][gal], s["dec"][gal], s["pa"][gal])
        rad = P.galaxy_radius(s["sersic_n"][gal], re_px, fw[gal], psf=psf)
        # sub-pixel sampling where the profile varies within a pixel (small or cuspy galaxies)
        over = np.where(re_px < np.where(s["sersic_n"][gal] >= 2.0, 4.0, 2.0), 3, 1)
        for r_, o_ in sorted(set(zip(rad.tolist(), over.tolist()))):
            sel = np.flatnonzero((rad == r_) & (over == o_))
            g = gal[sel]
            inb = (xs[g] > -r_) & (xs[g] < nx - 1 + r_) & (ys[g] > -r_) & (ys[g] < ny - 1 + r_)
            g, sel = g[inb], sel[inb]
            if g.size == 0:
                continue
            stamps, ix, iy, _ = P.render_galaxy_stamps(xs[g], ys[g], s["sersic_n"][g], re_px[sel], s["q"][g],
                                                       theta[g], fw[g], e1[g], e2[g], psf=psf, radius=int(r_),
                                                       oversample=int(o_))
            P.add_stamps(light, stamps, ix, iy, flux[g])
            frac[g] = stamps.sum(axis=(1, 2))
            peak[g] = stamps.max(axis=(1, 2)) * flux[g]
    # ---- artefacts of bright stars: placed with the camera's rule table (the geometry the
    # camera stage masks with), brightness from ctx.light; light above the threshold -> truth
    art: list[tuple] = []
    art_mask = np.zeros((ny, nx), np.uint16)
    place = ctx.placement
    for kind in ("starcore", "spike", "ghost", "glint"):
        who = ctx.artefact_sources.get(kind, np.zeros(0, int))
        if who.size == 0:
            continue
        bs = BrightStars(src["X"][who], src["Y"][who], ctx.m_inst[who])
        for a in artifacts_for_chip(chip, (ny, nx), bs, camera=cam,
                                    rules=replace(place, enabled=(kind,)), filter=ctx.band):
            ks = who[a.source]
            a_flux, a_peak = 0.0, 0.0
            for sy, sx, add in render_artifact(light, a, float(src["flux"][ks]), light=ctx.light,
                                               band=ctx.band):
                art_mask[sy, sx][add > thr_e] |= KIND_BITS[kind]
                a_flux += float(add.sum(dtype=np.float64))
                a_peak = max(a_peak, float(add.max()))
            art.append((kind.upper(), src["id"][ks], a.x, a.y, a.a, a.b, math.degrees(a.theta),
                        a.a_in, a.b_in, a.mag, a_flux, a_peak if kind != "starcore" else np.nan))
    # ---- the detector (its crosstalk: the table's chip-independent couplings)
    res = expose_chip(inst, chip, light, exptime=ctx.exptime, dark_time=ctx.exptime, rng=rng,
                      mask_threshold=thr_e / cam.gain, crosstalk=ctx.instrument_crosstalk)
    del light
    truth_mask = res.mask
    truth_mask |= art_mask
    del art_mask
    art += _crosstalk_images(ctx, chip, res.cells, truth_mask, thr_e)
    truth_mask[~sig.live] = maskbits.GAP
    # ---- truth table: sources whose centre lies on the chip
    on = (xs >= -0.5) & (xs < nx - 0.5) & (ys >= -0.5) & (ys < ny - 0.5)
    t = np.zeros(int(on.sum()), TRUTH_DTYPE)
    o = np.flatnonzero(on)
    so = s[o]
    t["ID"], t["KIND"], t["RA"], t["DEC"] = so["id"], so["kind"], so["ra"], so["dec"]
    t["X"], t["Y"] = xs[o], ys[o]
    t["CELL"] = np.char.encode(cam.cell_at(xs[o], ys[o]))
    t["MAG"], t["FLUX"] = so["mag"], flux[o]
    t["FLUX_STAMP"] = flux[o] * frac[o]
    t["PEAK"] = peak[o]
    ixo = np.clip(np.rint(xs[o]).astype(int), 0, nx - 1)
    iyo = np.clip(np.rint(ys[o]).astype(int), 0, ny - 1)
    t["FLAT"] = sig.flat[iyo, ixo]
    t["PSF_CORE_FWHM"] = fw[o] * cam.pixel_scale
    t["PSF_FWHM"] = psf.composite_fwhm_px(fw[o]) * cam.pixel_scale
    t["PSF_E1"], t["PSF_E2"] = e1[o], e2[o]
    isg = so["kind"] == KIND_GALAXY
    t["SERSIC_N"] = np.where(isg, so["sersic_n"], 0.0)
    t["R_E"] = np.where(isg, so["r_e"], 0.0)
    t["AXIS_RATIO"] = np.where(isg, so["q"], 1.0)
    t["THETA"] = np.where(isg, np.degrees(theta[o]), 0.0)
    t["TRAIL_X"] = so["trail_X"] * lay.xparity
    t["TRAIL_Y"] = so["trail_Y"] * lay.yparity
    fw_e = np.array([sig.cells[c.decode()].full_well if c else np.inf for c in t["CELL"]])
    t["SATURATED"] = (t["PEAK"] * t["FLAT"] + ctx.sky_e) > fw_e
    mb = np.zeros(o.size, np.uint16)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            mb |= truth_mask[np.clip(iyo + dy, 0, ny - 1), np.clip(ixo + dx, 0, nx - 1)]
    t["MASKBITS"] = mb
    # cosmic rays into the artefact table too
    artefacts = np.zeros(len(art), ARTEFACT_DTYPE)
    for k, a in enumerate(art):
        artefacts[k] = a
    header = raw_primary_header(ctx, chip)
    gain, rdn, sat, maxlin = _cell_headers(ctx, chip)
    wcs = ctx.model.chip_wcs(cam, chip)
    row = ctx.row
    truth_header = {
        "EXPNAME": row["expname"].decode(), "CHIP": chip, "CAMERA": cam.name, "FILTER": ctx.band,
        "MJD-OBS": float(row["mjd"]), "EXPTIME": float(row["exptime"]), "AIRMASS": float(row["airmass"]),
        "ZP": (float(row["zp"]), "mag giving 1 e-/s on a unit-response detector"),
        "SKY_E": (ctx.sky_e, "sky at the field centre (e-/pixel, unit response)"),
        "SKYGRADX": float(row["sky_grad_x"]), "SKYGRADY": float(row["sky_grad_y"]),
        "BORE_RA": float(row["ra"]), "BORE_DEC": float(row["dec"]), "BORE_PA": float(row["pa"]),
        "HDR_RA": float(row["ra_hdr"]), "HDR_DEC": float(row["dec_hdr"]), "HDR_PA": float(row["pa_hdr"]),
        "SEEING": (psf.seeing, "FWHM of the PSF at the field centre (arcsec)"),
        "PSFCORE": (psf.core_fwhm, "FWHM of the Moffat core at the field centre (arcsec)"),
        "PSFBETA": psf.beta, "PSFE1": psf.e1, "PSFE2": psf.e2, "PSFASTIG": psf.astig,
        "PSFFWRAD": psf.fwhm_radial, "PSFWFRAC": psf.wing_frac, "PSFWSCAL": psf.wing_scale,
        "PSFWBETA": psf.wing_beta, "FIELDRAD": (R, "field radius, rho = 1 (focal-plane px)"),
        "FRINGEF": (float(row["fringe_factor"]), "fringe amplitude factor of the exposure"),
        "XPARITY": lay.xparity, "YPARITY": lay.yparity,
        "MASKNSIG": (ctx.mask_nsigma, "artefact mask threshold (sky sigma)"),
    }
    return ChipResult(chip=chip, cells=res.cells, header=header,
                      cell_headers={"gain": gain, "read_noise": rdn, "saturation": sat, "maxlin": maxlin},
                      truth=t, truth_mask=truth_mask, artefacts=artefacts, cosmic_rays=res.cosmic_rays,
                      truth_header=truth_header, wcs_header=wcs.to_header(relax=True))
