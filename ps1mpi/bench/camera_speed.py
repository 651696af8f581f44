"""Camera speed: seconds to calibrate one full GPC1 exposure (60 chips of catalogs), by step.

A synthetic campaign is built on disk (:func:`build_campaign`): a reference catalog, and for
each exposure the chip stage's products of every chip (catalogs of ~750 detections per chip
with realistic centroid and photometric errors, static masks, x16 binned images) and the
ledger rows that make the exposure ready for the camera stage. The exposure's header pointing
is off by up to 5 arcmin and 0.3 deg. The camera stage then runs on it through the runtime
(`ps1mpi camera`, in this process: run under `mpiexec -n N` to use N ranks, one group of
`--group-size` ranks per exposure), and the ledger's timings split the wall time:
read (catalogs, slowest rank), gather (to the leader), match (pattern match), fit (reference
stars, match-and-fit iterations, zero point), write (masks, catalogs, JPEG, solution).
JSON keys: exposure_s, read_s, gather_s, match_s, fit_s, phot_s, write_s, n_det, n_matched,
astrom_rms_mas, ranks, group_size.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..algorithms import maskbits
from ..algorithms.astrometry import mjd_to_julian_year, pattern_match, propagate_proper_motion
from ..algorithms.photcal import synthetic_w
from ..geometry.camera import load_camera
from ..geometry.focalplane import Distortion, FocalPlaneModel
from ..infra.products import atomic_output
from .common import emit, peak_mb

__all__ = ["ExposureSpec", "SkySpec", "build_campaign", "make_sky", "make_refcat", "sky_radius",
           "true_model", "run"]

REF_EPOCH = 2015.5
REFCAT_LIMIT = 21.5


@dataclass
class SkySpec:
    """Synthetic stars around a field.

    Attributes
    ----------
    ra, dec : float
        Field centre (deg).
    radius : float
        Cap radius (deg).
    density : float
        Stars per square degree brighter than ``mag_max`` in r.
    mag_min, mag_max : float
        r-band range (mag); counts grow as 10**(0.3 r).
    pm_sigma : float
        Proper-motion dispersion (mas/yr per axis).
    bright : list of (ra, dec, r)
        Extra stars (e.g. a very bright one to test the dynamic masks).
    """

    ra: float
    dec: float
    radius: float
    density: float = 40000.0
    mag_min: float = 12.0
    mag_max: float = 22.5
    pm_sigma: float = 5.0
    bright: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class ExposureSpec:
    """One synthetic exposure.

    Attributes
    ----------
    name : str
        Exposure name.
    ra, dec, pa : float
        True boresight and position angle (deg).
    header_offset : tuple of float
        Header minus truth: (East, North) offset in arcsec and PA error in degrees.
    filter : str
        Filter; the true magnitudes are the stars' (w: :func:`synthetic_w` of g, r, i, the
        reference catalog having no w).
    mjd, exptime : float
        Exposure start (MJD) and time (s).
    zpt_obs : float
        True zero point for 1 e-/s (mag).
    distortion_px : float
        Amplitude of the radial cubic distortion at the field edge (px).
    seeing : float
        PSF FWHM (arcsec).
    sky_e : float
        Sky per pixel (e-).
    random : bool
        Detections at random positions (a bad exposure).
    bad_chips : tuple of str
        Chips registered with bad quality by the chip stage (no products).
    faulted_chips : tuple of str
        Chips whose chip-stage element faulted (the exposure is blocked).
    missing_catalogs : tuple of str
        Good chips whose catalog file is not written (a fault in the camera stage).
    junk_fraction : float
        Extra detections at random places (cosmic rays, artefacts), as a fraction.
    """

    name: str
    ra: float
    dec: float
    pa: float = 0.0
    header_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    filter: str = "r"
    mjd: float = 57000.3
    exptime: float = 40.0
    zpt_obs: float = 24.8
    distortion_px: float = 3.0
    seeing: float = 1.0
    sky_e: float = 1000.0
    random: bool = False
    bad_chips: tuple[str, ...] = ()
    faulted_chips: tuple[str, ...] = ()
    missing_catalogs: tuple[str, ...] = ()
    junk_fraction: float = 0.03


def _offset(ra: float, dec: float, east_arcsec: float, north_arcsec: float) -> tuple[float, float]:
    """Position moved by a tangent-plane offset (arcsec)."""
    from ..geometry.focalplane import gnomonic_inverse
    a, d = gnomonic_inverse(np.radians(east_arcsec / 3600.0), np.radians(north_arcsec / 3600.0),
                            ra, dec)
    return float(a), float(d)


def make_sky(spec: SkySpec, *, seed: int) -> np.ndarray:
    """Stars uniform in a cap with PS1-like colours and proper motions (reference epoch 2015.5).

    Returns a structured array: ra, dec (deg, epoch 2015.5), pmra, pmdec (mas/yr), g r i z y
    (AB mag).
    """
    rng = np.random.default_rng([seed, 11])
    area = 2 * math.pi * (1 - math.cos(math.radians(spec.radius))) * (180 / math.pi) ** 2
    n = rng.poisson(spec.density * area)
    u = rng.uniform(0, 1, n)
    a = 0.3 * math.log(10.0)
    lo, hi = math.exp(a * spec.mag_min), math.exp(a * spec.mag_max)
    r = np.log(lo + u * (hi - lo)) / a
    cosr = 1 - rng.uniform(0, 1, n) * (1 - math.cos(math.radians(spec.radius)))
    theta = np.arccos(cosr)
    phi = rng.uniform(0, 2 * math.pi, n)
    from ..geometry.focalplane import gnomonic_inverse
    # a point at angle theta from the centre along azimuth phi (uniform on the cap)
    ra, dec = gnomonic_inverse(np.tan(theta) * np.sin(phi), np.tan(theta) * np.cos(phi),
                               spec.ra, spec.dec)
    extra = spec.bright
    m = n + len(extra)
    st = np.zeros(m, [("ra", "f8"), ("dec", "f8"), ("pmra", "f8"), ("pmdec", "f8"),
                      ("g", "f8"), ("r", "f8"), ("i", "f8"), ("z", "f8"), ("y", "f8")])
    st["ra"][:n], st["dec"][:n], st["r"][:n] = ra, dec, r
    for k, (a_, d_, r_) in enumerate(extra):
        st["ra"][n + k], st["dec"][n + k], st["r"][n + k] = a_, d_, r_
    gr = rng.uniform(0.2, 1.4, m)
    st["g"] = st["r"] + gr
    st["i"] = st["r"] - 0.4 * gr - rng.normal(0, 0.03, m)
    st["z"] = st["i"] - 0.2 * gr
    st["y"] = st["z"] - 0.1 * gr
    st["pmra"] = rng.normal(0, spec.pm_sigma, m)
    st["pmdec"] = rng.normal(0, spec.pm_sigma, m)
    return st


def make_refcat(stars: np.ndarray, *, seed: int, limit: float = REFCAT_LIMIT) -> np.ndarray:
    """Reference catalog of the stars brighter than ``limit`` (r), with Gaia-like position and
    proper-motion errors and PS1-like magnitude errors (the simulator's recipe)."""
    rng = np.random.default_rng([seed, 12])
    st = stars[stars["r"] < limit]
    n = st.size
    cols = [("ID", "i8"), ("RA", "f8"), ("DEC", "f8"), ("RA_ERR", "f4"), ("DEC_ERR", "f4"),
            ("PMRA", "f4"), ("PMDEC", "f4"), ("PMRA_ERR", "f4"), ("PMDEC_ERR", "f4"),
            ("EPOCH", "f8")]
    for b in "grizy":
        cols += [(b.upper(), "f4"), (b.upper() + "_ERR", "f4")]
    out = np.zeros(n, cols)
    spos = 0.02 + 0.4 * 10 ** (0.4 * (st["r"] - 20.0))
    cosd = np.cos(np.radians(st["dec"]))
    out["ID"] = np.flatnonzero(stars["r"] < limit)
    out["RA"] = (st["ra"] + rng.normal(0, 1, n) * spos / 3.6e6 / cosd) % 360.0
    out["DEC"] = st["dec"] + rng.normal(0, 1, n) * spos / 3.6e6
    out["RA_ERR"] = out["DEC_ERR"] = spos
    out["PMRA"] = st["pmra"] + rng.normal(0, 1, n) * spos
    out["PMDEC"] = st["pmdec"] + rng.normal(0, 1, n) * spos
    out["PMRA_ERR"] = out["PMDEC_ERR"] = spos
    out["EPOCH"] = REF_EPOCH
    for b in "grizy":
        err = np.sqrt(0.005 ** 2 + (0.02 * 10 ** (0.4 * (st[b] - 20.0))) ** 2)
        out[b.upper()] = st[b] + rng.normal(0, 1, n) * err
        out[b.upper() + "_ERR"] = err
    return out


CATALOG_DTYPE = np.dtype([
    ("X_PSF", "f8"), ("Y_PSF", "f8"), ("X_PSF_SIG", "f4"), ("Y_PSF_SIG", "f4"),
    ("PSF_INST_MAG", "f4"), ("PSF_INST_MAG_SIG", "f4"), ("PSF_INST_FLUX", "f4"),
    ("PSF_INST_FLUX_SIG", "f4"), ("AP_MAG", "f4"), ("SKY", "f4"), ("FLAGS", "u2"),
])
SATURATED_FLAG = 0x0010   # what a saturated star's PSF fit gets (PHOT_MASKED)


def _chip_detections(spec: ExposureSpec, camera: Any, model: FocalPlaneModel, chip: str,
                     ra: np.ndarray, dec: np.ndarray, mag: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Catalog rows of one chip and their truth (true RA/Dec/mag, NaN for junk)."""
    nx, ny = camera.chip_nx, camera.chip_ny
    zp_exp = spec.zpt_obs + 2.5 * math.log10(spec.exptime)
    sig_psf = spec.seeing / 2.3548 / camera.pixel_scale
    area = 4 * math.pi * sig_psf ** 2
    if spec.random:
        n = int(rng.integers(150, 250))
        x, y = rng.uniform(0, nx - 1, n), rng.uniform(0, ny - 1, n)
        m_true = rng.uniform(-12.0, -6.0, n) + zp_exp
        t_ra = t_dec = np.full(n, np.nan)
    else:
        x, y = model.sky_to_pixel(camera, chip, ra, dec)
        on = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
        x, y, m_true, t_ra, t_dec = x[on], y[on], mag[on], ra[on], dec[on]
    flux = 10 ** (-0.4 * (m_true - zp_exp))
    snr = flux / np.sqrt(flux + area * spec.sky_e)
    keep = snr > 5.0
    x, y, m_true, t_ra, t_dec, flux, snr = (v[keep] for v in (x, y, m_true, t_ra, t_dec, flux,
                                                              snr))
    # Cramer-Rao-like centroid error of a Gaussian PSF, and a floor
    pos_sig = np.sqrt((sig_psf * math.sqrt(2.0) / snr) ** 2 + 0.003 ** 2)
    n = x.size
    n_junk = int(round(spec.junk_fraction * n))
    cat = np.zeros(n + n_junk, CATALOG_DTYPE)
    cat["X_PSF"][:n] = x + rng.normal(0, 1, n) * pos_sig
    cat["Y_PSF"][:n] = y + rng.normal(0, 1, n) * pos_sig
    cat["X_PSF_SIG"][:n] = cat["Y_PSF_SIG"][:n] = pos_sig
    f_meas = flux + rng.normal(0, 1, n) * flux / snr
    cat["PSF_INST_FLUX"][:n] = f_meas
    cat["PSF_INST_FLUX_SIG"][:n] = flux / snr
    peak = flux / (2 * math.pi * sig_psf ** 2) + spec.sky_e
    cat["FLAGS"][:n] = np.where(peak > 60000.0, SATURATED_FLAG, 0)
    if n_junk:
        j = slice(n, n + n_junk)
        cat["X_PSF"][j] = rng.uniform(0, nx - 1, n_junk)
        cat["Y_PSF"][j] = rng.uniform(0, ny - 1, n_junk)
        cat["X_PSF_SIG"][j] = cat["Y_PSF_SIG"][j] = 0.2
        cat["PSF_INST_FLUX"][j] = 10 ** rng.uniform(2.5, 4.0, n_junk)
        cat["PSF_INST_FLUX_SIG"][j] = 0.1 * cat["PSF_INST_FLUX"][j]
    with np.errstate(divide="ignore", invalid="ignore"):
        cat["PSF_INST_MAG"] = np.where(cat["PSF_INST_FLUX"] > 0,
                                       -2.5 * np.log10(cat["PSF_INST_FLUX"]), np.nan)
        cat["PSF_INST_MAG_SIG"] = 1.0857 * cat["PSF_INST_FLUX_SIG"] / cat["PSF_INST_FLUX"]
    cat["AP_MAG"] = cat["PSF_INST_MAG"] + 0.02
    cat["SKY"] = spec.sky_e
    order = rng.permutation(cat.size)
    truth = {"ra": np.concatenate([t_ra, np.full(n_junk, np.nan)])[order],
             "dec": np.concatenate([t_dec, np.full(n_junk, np.nan)])[order],
             "mag": np.concatenate([m_true, np.full(n_junk, np.nan)])[order],
             "pos_sig": np.concatenate([pos_sig, np.full(n_junk, np.nan)])[order]}
    return cat[order], truth


def sky_radius(camera: Any) -> float:
    """Radius (deg) of a star cap around a pointing that covers the camera stage's padded
    reference search (field, 25% pad, 6' pointing error) and its glint band."""
    X0, X1, Y0, Y1 = camera.focal_plane_extent()
    field_deg = math.hypot(max(abs(X0), X1), max(abs(Y0), Y1)) * camera.pixel_scale / 3600.0
    glint = 0.5 * (Y1 - Y0) / (4 * 5143.0) * 17428.0 * camera.pixel_scale / 3600.0
    return field_deg * 1.3 + 0.12 + glint


def true_model(spec: ExposureSpec, camera: Any) -> FocalPlaneModel:
    """The true focal-plane model of a synthetic exposure."""
    X0, X1, Y0, Y1 = camera.focal_plane_extent()
    dist = (Distortion.radial(spec.distortion_px, norm=0.5 * max(X1 - X0, Y1 - Y0))
            if spec.distortion_px else Distortion.none())
    return FocalPlaneModel(spec.ra, spec.dec, spec.pa, camera.pixel_scale, dist)


def _static_mask(camera: Any, chip_index: int) -> np.ndarray:
    """GAP between cells, one bad column."""
    mask = np.full((camera.chip_ny, camera.chip_nx), maskbits.GAP, np.uint16)
    for cell in camera.cell_names:
        x0, y0 = camera.cell_origin(cell)
        mask[y0:y0 + camera.cell_ny, x0:x0 + camera.cell_nx] = 0
    col = 37 + 11 * chip_index
    mask[:, col] |= maskbits.DETECTOR
    return mask


def build_campaign(root: str | Path, exposures: list[ExposureSpec], *, camera: str = "testcam",
                   sky: SkySpec | None = None, seed: int = 1, masks: bool = True,
                   binning: int = 16) -> dict[str, dict]:
    """Write a campaign ready for the camera stage and return the truth.

    Parameters
    ----------
    root : path
        Campaign directory (created): ``ledger.h5``, ``refcat/refcat.fits``, ``chip/...``.
    exposures : list of ExposureSpec
        The exposures.
    camera : str
        Camera name.
    sky : SkySpec, optional
        The stars; default a cap around the first exposure large enough for the padded
        reference search (and the glint band).
    seed : int
        Random seed.
    masks : bool
        Write the chip masks (full chip size) and binned images.
    binning : int
        Binning of the binned images.

    Returns
    -------
    dict
        Per exposure: ``model`` (true FocalPlaneModel), ``zpt_obs``, ``zp_exp``, ``header``
        (ra, dec, pa) and ``chips``: chip -> truth arrays per catalog row (ra, dec, mag,
        pos_sig; NaN for junk).
    """
    import fitsio

    from ..infra.ledger import Ledger
    from ..infra.schema import Fault, State
    from ..sim.catalogs import write_table

    root = Path(root)
    cam = load_camera(camera)
    X0, X1, Y0, Y1 = cam.focal_plane_extent()
    field_deg = math.hypot(max(abs(X0), X1), max(abs(Y0), Y1)) * cam.pixel_scale / 3600.0
    if sky is None:
        sky = SkySpec(exposures[0].ra, exposures[0].dec, radius=sky_radius(cam))
    stars = make_sky(sky, seed=seed)
    write_table(root / "refcat" / "refcat.fits",
                [("REFCAT", make_refcat(stars, seed=seed), {"EPOCH": REF_EPOCH})])
    n_exp = len(exposures)
    chips = list(cam.chip_names)
    heads = []
    for spec in exposures:
        hra, hdec = _offset(spec.ra, spec.dec, spec.header_offset[0], spec.header_offset[1])
        heads.append((hra, hdec, spec.pa + spec.header_offset[2]))
    # the ledger rows, one append per table (appends resize every column)
    led = Ledger.create(root / "ledger.h5")
    try:
        hra = np.array([h[0] for h in heads])
        hdec = np.array([h[1] for h in heads])
        raw = led.append("rawExp", n_exp, exp_name=[e.name for e in exposures],
                         filter=[e.filter for e in exposures], mjd=[e.mjd for e in exposures],
                         camera=cam.name, exptime=[e.exptime for e in exposures], airmass=1.1,
                         ra=hra, dec=hdec, posangle=[h[2] for h in heads], nchips=len(chips))
        led.transition("rawExp", raw, State.DONE)
        runs = led.append("chipRun", n_exp, exp_name=[e.name for e in exposures], raw_exp=raw,
                          filter=[e.filter for e in exposures], nchips=len(chips), ra=hra,
                          dec=hdec)
        led.transition("chipRun", runs, State.RUN)
        faulted = np.array([[c in e.faulted_chips for c in chips] for e in exposures]).ravel()
        bad = np.array([[c in e.bad_chips for c in chips] for e in exposures]).ravel()
        els = led.append("chipProcessedImfile", n_exp * len(chips),
                         run=np.repeat(runs, len(chips)),
                         exp_name=np.repeat([e.name for e in exposures], len(chips)),
                         chip=chips * n_exp, ra=np.repeat(hra, len(chips)),
                         dec=np.repeat(hdec, len(chips)))
        led.transition("chipProcessedImfile", els, State.DONE,
                       fault=np.where(faulted, int(Fault.SYSTEM), 0),
                       quality=(bad & ~faulted).astype(int),
                       message=["simulated fault" if f else ("simulated bad chip" if b_ else "")
                                for f, b_ in zip(faulted, bad)])
        done = np.array([not e.faulted_chips for e in exposures])
        led.transition("chipRun", runs[done], State.DONE,
                       quality=np.array([int(len(e.bad_chips) == len(chips))
                                         for e, d in zip(exposures, done) if d]))
        led.flush()
    finally:
        led.close()
    truth: dict[str, dict] = {}
    for k, spec in enumerate(exposures):
        rng = np.random.default_rng([seed, 21, k])
        model = true_model(spec, cam)
        mjd_mid = spec.mjd + 0.5 * spec.exptime / 86400.0
        ra, dec = propagate_proper_motion(stars["ra"], stars["dec"], stars["pmra"],
                                          stars["pmdec"], mjd_to_julian_year(mjd_mid) - REF_EPOCH)
        near = np.hypot((ra - spec.ra) * math.cos(math.radians(spec.dec)),
                        dec - spec.dec) < field_deg * 1.1
        band_mag = (synthetic_w(stars["g"], stars["r"], stars["i"]) if spec.filter == "w"
                    else stars[spec.filter])
        ex = {"model": model, "zpt_obs": spec.zpt_obs,
              "zp_exp": spec.zpt_obs + 2.5 * math.log10(spec.exptime),
              "header": heads[k], "chips": {}}
        for ci, chip in enumerate(chips):
            if chip in spec.faulted_chips or chip in spec.bad_chips:
                continue
            cat, tr = _chip_detections(spec, cam, model, chip, ra[near], dec[near],
                                       band_mag[near], rng)
            ex["chips"][chip] = tr
            base = root / "chip" / spec.name
            if chip not in spec.missing_catalogs:
                write_table(base / f"{spec.name}.{chip}.cmf",
                            [("SOURCES", cat, {"EXPNAME": spec.name, "CHIP": chip})])
            if masks:
                with atomic_output(base / f"{spec.name}.{chip}.mk.fits") as tmp:
                    with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
                        f.write(_static_mask(cam, ci), header={"CHIP": chip}, compress="RICE")
                bny, bnx = -(-cam.chip_ny // binning), -(-cam.chip_nx // binning)
                img = (spec.sky_e + rng.normal(0, 3.0, (bny, bnx))).astype(np.float32)
                with atomic_output(base / f"{spec.name}.{chip}.b16.fits") as tmp:
                    fitsio.write(str(tmp), img, clobber=True)
        truth[spec.name] = ex
    return truth


# ------------------------------------------------------------------------------ the benchmark

def _match_seconds(camera: Any, det: np.ndarray, ref: np.ndarray, guess: tuple, mjd: float,
                   max_offset_arcmin: float = 6.0, n_det: int = 300, max_ref: int = 4000
                   ) -> float:
    """Time of the pattern match alone on the inputs the stage gives it (brightest detections
    and reference stars in the padded box, projected about the header pointing)."""
    model = FocalPlaneModel(guess[0], guess[1], guess[2], camera.pixel_scale)
    names = np.array(camera.chip_names)
    ok = np.flatnonzero(np.isfinite(det["mag"]) & (det["flags"] == 0))
    bright = ok[np.argsort(det["mag"][ok])[:n_det]]
    X = np.empty(bright.size)
    Y = np.empty(bright.size)
    for c in np.unique(det["chip"][bright]):
        s = det["chip"][bright] == c
        X[s], Y[s] = camera.chip_to_focal(str(names[c]), det["x"][bright][s], det["y"][bright][s])
    ra, dec = ref["RA"], ref["DEC"]
    P, Q = model.sky_to_focal(ra, dec)
    off = max_offset_arcmin * 60.0 / camera.pixel_scale
    box = ((P > X.min() - off) & (P < X.max() + off) & (Q > Y.min() - off)
           & (Q < Y.max() + off))
    cand = np.flatnonzero(box)
    det_area = (X.max() - X.min()) * (Y.max() - Y.min())
    box_area = (X.max() - X.min() + 2 * off) * (Y.max() - Y.min() + 2 * off)
    n_ref = int(min(max_ref, max(3 * bright.size, bright.size * box_area / det_area)))
    rb = cand[np.argsort(ref["R"][cand])[:n_ref]]
    t0 = time.perf_counter()
    pattern_match(X, Y, P[rb], Q[rb], max_offset=off, max_rotation=math.radians(1.5),
                  bin_size=16.0)
    return time.perf_counter() - t0


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns the JSON result."""
    p = argparse.ArgumentParser(prog="ps1mpi bench camera-speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--camera", default="gpc1")
    p.add_argument("--group-size", type=int, default=None,
                   help="ranks per exposure (default: all ranks of the job)")
    p.add_argument("--density", type=float, default=6500.0,
                   help="stars per square degree to r = 22.5 (6500: ~45000 detections on GPC1)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="directory in which the temporary campaign is made (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the campaign afterwards")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)

    from ..infra.config import load_recipe
    from ..infra.ledger import Ledger
    from ..infra.world import World
    from ..stages.base import make_context, run_stage
    from ..stages.camera import CameraStage, ReferenceCatalog

    world = World.from_mpi()
    gsize = args.group_size or world.size
    work = None
    if world.rank == 0:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="camera-speed-", dir=args.workdir))
    work = Path(world.bcast_object(str(work) if work else None))
    spec = ExposureSpec("o5000g0001o", 150.0, 2.0, pa=0.4, header_offset=(180.0, -240.0, 0.3),
                        mjd=57000.3, exptime=45.0, seeing=1.0)
    cam = load_camera(args.camera)
    X0, X1, Y0, Y1 = cam.focal_plane_extent()
    field_deg = math.hypot(max(abs(X0), X1), max(abs(Y0), Y1)) * cam.pixel_scale / 3600.0
    t_build = 0.0
    if world.rank == 0:
        t0 = time.perf_counter()
        build_campaign(work, [spec], camera=args.camera, seed=args.seed,
                       sky=SkySpec(spec.ra, spec.dec, sky_radius(cam), density=args.density))
        t_build = time.perf_counter() - t0
        print(f"built a {args.camera} campaign in {t_build:.1f} s under {work}", flush=True)
    world.barrier()
    recipe = load_recipe(overrides=[f"camera.group_size={gsize}"])
    stage = CameraStage(group_size=gsize)
    ledger = Ledger.open(work / "ledger.h5", "a") if world.rank == 0 else None
    ctx = make_context(root=work, recipe=recipe, world=world, ledger_path=work / "ledger.h5",
                       stage="camera")
    t0 = time.perf_counter()
    report = run_stage(stage, ctx, ledger)
    wall = time.perf_counter() - t0
    result: dict = {}
    if world.rank == 0:
        row = 0
        el = ledger.read("camProcessedExp", [row])
        ledger.close()
        if report.faulted or el["quality"][0]:
            print(f"calibration failed: quality {el['quality'][0]}, {report}", flush=True)
        import fitsio
        det_all = []
        from ..stages.camera import detections_from_catalog
        for k, chip in enumerate(cam.chip_names):
            tab = fitsio.read(str(work / "chip" / spec.name / f"{spec.name}.{chip}.cmf"), ext=1)
            det_all.append(detections_from_catalog(tab, k))
        det = np.concatenate(det_all)
        refcat = ReferenceCatalog(work / "refcat" / "refcat.fits")
        with Ledger.open(work / "ledger.h5") as rl:
            info = rl.read("rawExp", [0], ["ra", "dec", "posangle"])
        guess = (float(info["ra"][0]), float(info["dec"][0]), float(info["posangle"][0]))
        ref = refcat.cone(guess[0], guess[1], field_deg * 1.25 + 0.1)
        t_match = _match_seconds(cam, det, ref, guess, spec.mjd)
        t_astrom = float(el["t_astrom"][0])
        result = {
            "camera": args.camera, "ranks": world.size, "group_size": gsize,
            "exposure_s": float(el["duration"][0]), "stage_wall_s": wall,
            "read_s": float(el["t_read"][0]), "gather_s": float(el["t_gather"][0]),
            "match_s": t_match, "fit_s": max(t_astrom - t_match, 0.0),
            "phot_s": float(el["t_phot"][0]), "write_s": float(el["t_write"][0]),
            "n_det": int(el["n_det"][0]), "n_ref": int(el["n_ref"][0]),
            "n_matched": int(el["n_matched"][0]),
            "astrom_rms_mas": float(el["astrom_rms_mas"][0]),
            "quality": int(el["quality"][0]),
            "build_s": t_build, "peak_mb": peak_mb(),
        }
        print(f"{args.camera}: {result['n_det']} detections, {result['n_ref']} reference stars, "
              f"{result['n_matched']} matched, RMS {result['astrom_rms_mas']:.1f} mas", flush=True)
        print(f"exposure {result['exposure_s']:.2f} s on {gsize} ranks: read "
              f"{result['read_s']:.2f}, gather {result['gather_s']:.3f}, match "
              f"{result['match_s']:.2f}, fit {result['fit_s']:.2f} (incl. reference stars), "
              f"zero point {result['phot_s']:.3f}, write {result['write_s']:.2f} s", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        emit(result)
    world.barrier()
    world.free()
    return result
