"""Files the simulator writes besides the raw data: reference catalog, truth tables, survey plan.

All are FITS binary tables (columns and units in ``docs/sim.md``), written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ps1mpi.infra.products import atomic_output
from ps1mpi.sim.sky import REF_EPOCH, SURVEY_BANDS, Sky, mover_positions_at, transient_mags_at

__all__ = ["REFCAT_LIMIT", "make_refcat", "write_table", "write_refcat", "write_sky_truth", "write_survey",
           "write_chip_truth", "read_survey"]

#: Faint limit (r) of the reference catalog.
REFCAT_LIMIT = 21.5


def _hdr(header: dict | None) -> list[dict]:
    out = []
    for k, v in (header or {}).items():
        comment = ""
        if isinstance(v, tuple):
            v, comment = v
        if isinstance(v, np.generic):
            v = v.item()
        out.append({"name": k, "value": v, "comment": comment})
    return out


def write_table(path: str | os.PathLike, tables: list[tuple[str, np.ndarray, dict | None]],
                primary: dict | None = None) -> Path:
    """Write FITS binary tables ``(extname, array, header)`` after an empty primary HDU."""
    import fitsio
    path = Path(path)
    with atomic_output(path) as tmp:
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(None, header=_hdr(primary))
            for name, arr, hdr in tables:
                f.write(arr, extname=name, header=_hdr(hdr))
    return path


def make_refcat(sky: Sky, *, seed: int, limit: float = REFCAT_LIMIT, with_w: bool = False) -> np.ndarray:
    """Reference catalog of the simulated stars (Gaia-like astrometry, PS1-like photometry).

    Positions are the true positions at :data:`REF_EPOCH` plus Gaussian errors
    ``sigma_pos = 0.02 + 0.4 * 10^(0.4 (r - 20))`` mas; proper-motion errors are the same numbers
    in mas/yr; magnitude errors ``sqrt(0.005^2 + (0.02 * 10^(0.4 (m - 20)))^2)``. Stars with
    r < ``limit`` are listed. Without ``with_w`` there is no w column (the camera stage
    synthesises w from g, r, i).
    """
    rng = np.random.default_rng([int(seed), 51])
    st = sky.stars[sky.stars["r"] < limit]
    n = st.size
    cols = [("ID", "i8"), ("RA", "f8"), ("DEC", "f8"), ("RA_ERR", "f4"), ("DEC_ERR", "f4"),
            ("PMRA", "f4"), ("PMDEC", "f4"), ("PMRA_ERR", "f4"), ("PMDEC_ERR", "f4"), ("EPOCH", "f8")]
    bands = list(SURVEY_BANDS) + (["w"] if with_w else [])
    for b in bands:
        cols += [(b.upper(), "f4"), (b.upper() + "_ERR", "f4")]
    out = np.zeros(n, cols)
    r = st["r"].astype(np.float64)
    spos = 0.02 + 0.4 * 10 ** (0.4 * (r - 20.0))          # mas
    cosd = np.cos(np.radians(st["dec"]))
    out["ID"] = st["id"]
    out["RA"] = (st["ra"] + rng.normal(0, 1, n) * spos / 3.6e6 / cosd) % 360.0
    out["DEC"] = st["dec"] + rng.normal(0, 1, n) * spos / 3.6e6
    out["RA_ERR"], out["DEC_ERR"] = spos, spos
    out["PMRA"] = st["pmra"] + rng.normal(0, 1, n) * spos
    out["PMDEC"] = st["pmdec"] + rng.normal(0, 1, n) * spos
    out["PMRA_ERR"], out["PMDEC_ERR"] = spos, spos
    out["EPOCH"] = REF_EPOCH
    for b in bands:
        m = st[b].astype(np.float64)
        err = np.sqrt(0.005 ** 2 + (0.02 * 10 ** (0.4 * (m - 20.0))) ** 2)
        out[b.upper()] = m + rng.normal(0, 1, n) * err
        out[b.upper() + "_ERR"] = err
    return out


def write_refcat(path, refcat: np.ndarray, *, sky: Sky, seed: int) -> Path:
    """Write the reference catalog (see :func:`make_refcat`)."""
    hdr = {"EPOCH": (REF_EPOCH, "Julian year of RA, DEC"), "EQUINOX": 2000.0, "RADESYS": "ICRS",
           "MAGSYS": ("PS1", "magnitude system"), "HAS_W": ("W" in refcat.dtype.names, "w band listed"),
           "MAGLIM": (REFCAT_LIMIT, "faint limit in r"), "CEN_RA": sky.center[0], "CEN_DEC": sky.center[1],
           "RADIUS": (sky.radius, "cap radius (deg)"), "SEED": int(seed),
           "UNITS": "RA DEC deg; *_ERR of positions mas; PM mas/yr (PMRA includes cos dec); mags AB"}
    return write_table(path, [("REFCAT", refcat, hdr)], primary=hdr)


def write_sky_truth(truth_dir, sky: Sky, plan: np.ndarray, *, seed: int) -> list[Path]:
    """Truth catalogs of the whole sky and the time-variable sources (one file each)."""
    truth_dir = Path(truth_dir)
    paths = []
    up = lambda a: a.astype([(n.upper(), a.dtype[n]) for n in a.dtype.names])  # noqa: E731
    hdr = {"EPOCH": (REF_EPOCH, "Julian year of the star positions"), "SEED": int(seed),
           "UNITS": "deg; PM mas/yr; mags AB; R_E arcsec (semi-major); PA deg N through E"}
    paths.append(write_table(truth_dir / "stars.fits", [("STARS", up(sky.stars), hdr)]))
    paths.append(write_table(truth_dir / "galaxies.fits", [("GALAXIES", up(sky.galaxies), hdr)]))
    # transients: parameters and light curves at every exposure
    lc = []
    for row in plan:
        band = row["band"].decode()
        mjd_mid = float(row["mjd"]) + 0.5 * float(row["exptime"]) / 86400.0
        if sky.transients.size == 0:
            break
        m = transient_mags_at(sky.transients, band, mjd_mid)
        flux = float(row["exptime"]) * 10 ** (-0.4 * (m - float(row["zp"])))
        rec = np.zeros(sky.transients.size, [("ID", "i8"), ("EXPNAME", "S16"), ("MJD", "f8"), ("FILTER", "S2"),
                                              ("MAG", "f4"), ("FLUX", "f4")])
        rec["ID"], rec["EXPNAME"], rec["MJD"], rec["FILTER"] = sky.transients["id"], row["expname"], mjd_mid, band
        rec["MAG"] = np.where(np.isfinite(m), m, 99.0)
        rec["FLUX"] = np.where(np.isfinite(m), flux, 0.0)
        lc.append(rec)
    lcs = np.concatenate(lc) if lc else np.zeros(0, [("ID", "i8")])
    paths.append(write_table(truth_dir / "transients.fits",
                             [("TRANSIENTS", up(sky.transients), hdr), ("LIGHTCURVES", lcs, {"UNITS": "FLUX e-"})]))
    # movers: tracks and positions at every exposure of their night
    pos = []
    for row in plan:
        band = row["band"].decode()
        mjd_mid = float(row["mjd"]) + 0.5 * float(row["exptime"]) / 86400.0
        mv = sky.movers[np.abs(mjd_mid - sky.movers["mjd0"]) < 1.0]
        if mv.size == 0:
            continue
        ra, dec = mover_positions_at(mv, mjd_mid)
        rec = np.zeros(mv.size, [("ID", "i8"), ("EXPNAME", "S16"), ("MJD", "f8"), ("FILTER", "S2"),
                                 ("RA", "f8"), ("DEC", "f8"), ("MAG", "f4")])
        rec["ID"], rec["EXPNAME"], rec["MJD"], rec["FILTER"] = mv["id"], row["expname"], mjd_mid, band
        rec["RA"], rec["DEC"], rec["MAG"] = ra, dec, mv[band]
        pos.append(rec)
    pos = np.concatenate(pos) if pos else np.zeros(0, [("ID", "i8")])
    paths.append(write_table(truth_dir / "movers.fits",
                             [("MOVERS", up(sky.movers), {**hdr, "RATES": "deg/day"}), ("POSITIONS", pos, None)]))
    return paths


def write_survey(path, plan: np.ndarray, *, header: dict, distortion) -> Path:
    """The exposure plan with its truth (``survey.fits``)."""
    up = plan.astype([(n.upper(), plan.dtype[n]) for n in plan.dtype.names])
    d = distortion.to_dict()
    nt = len(d["coeffs_x"])
    dist = np.zeros(1, [("ORDER", "i4"), ("NORM", "f8"), ("COEFFS_X", "f8", (max(nt, 1),)),
                        ("COEFFS_Y", "f8", (max(nt, 1),))])
    dist["ORDER"], dist["NORM"] = d["order"], d["norm"]
    if nt:
        dist["COEFFS_X"][0], dist["COEFFS_Y"][0] = d["coeffs_x"], d["coeffs_y"]
    return write_table(path, [("EXPOSURES", up, header), ("DISTORTION", dist,
                                                          {"COMMENT": "ps1mpi.geometry.focalplane.Distortion"})],
                       primary=header)


def read_survey(path) -> tuple[np.ndarray, dict, dict]:
    """Read ``survey.fits``: (exposure table, header dict, distortion dict)."""
    import fitsio
    with fitsio.FITS(str(path)) as f:
        tab = f["EXPOSURES"].read()
        hdr = {k: f["EXPOSURES"].read_header()[k] for k in f["EXPOSURES"].read_header().keys()}
        d = f["DISTORTION"].read()[0]
    order = int(d["ORDER"])
    dist = {"order": order, "norm": float(d["NORM"]), "coeffs_x": list(d["COEFFS_X"]),
            "coeffs_y": list(d["COEFFS_Y"])}
    from ps1mpi.geometry.focalplane import Distortion
    if len(Distortion.terms(order)) == 0:
        dist["coeffs_x"], dist["coeffs_y"] = [], []
    return tab, hdr, dist


def write_chip_truth(path, res, *, compress: bool = True) -> Path:
    """Truth of one simulated chip (:class:`ps1mpi.sim.exposure.ChipResult`)."""
    import fitsio
    path = Path(path)
    hdr = dict(res.truth_header)
    wcs_cards = [{"name": k, "value": v, "comment": c} for k, v, c in
                 ((card.keyword, card.value, card.comment) for card in res.wcs_header.cards)
                 if k not in ("", "COMMENT", "HISTORY")]
    with atomic_output(path) as tmp:
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(None, header=_hdr(hdr))
            f.write(res.truth, extname="SOURCES", header=_hdr({"UNITS": "X Y px (0-based); FLUX e-; RA DEC deg; "
                                                                         "PSF_FWHM arcsec; R_E arcsec; THETA deg"}))
            kw = {"compress": "RICE"} if compress else {}
            f.write(res.truth_mask, extname="MASK", header=wcs_cards + _hdr({"BUNIT": "ps1mpi.algorithms.maskbits"}),
                    **kw)
            f.write(res.artefacts if res.artefacts.size else np.zeros(1, res.artefacts.dtype)[:0],
                    extname="ARTEFACTS", header=_hdr({"NROWS": int(res.artefacts.size)}))
            f.write(res.cosmic_rays if res.cosmic_rays.size else np.zeros(1, res.cosmic_rays.dtype)[:0],
                    extname="COSMICS", header=_hdr({"NROWS": int(res.cosmic_rays.size)}))
    return path
