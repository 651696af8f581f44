"""Find and measure the sources of any single FITS image (psphot alone), writing a CMF catalog.

  ps1mpi phot IMAGE.fits [--weight W.fits] [--mask M.fits] [--out CAT.fits]
                         [--gain G] [--saturation S] [--fwhm PX] [--set chip.sources.threshold=5]

Reads:  the first image HDU with data of IMAGE (or --hdu N); optionally a weight image
        (variance by default, as PS1 .wt files; --weight-type inverse-variance for
        SExtractor-style weights) and a mask image (non-zero = bad pixel).
Writes: the catalog (default IMAGE with .cmf in place of .fits): the chip stage's format, a
        primary header (image metadata, gain, FWHM, flag bit definitions) and a SOURCES table
        with PS1 CMF-style columns and units (docs/sources.md, "Catalog columns"); RA_PSF and
        DEC_PSF when the image has a celestial WCS. Optionally the PSF model (--psf) and the
        background model (--background).

The same detection and measurement as the chip stage (background model, matched-filter
detection, PS1_V1 PSF model, PSF photometry, moments, Kron and aperture fluxes). Meant for
images from any telescope: NaN or infinite pixels are treated as missing, and keywords an
image may lack take recipe values ([chip.phot]): gain (GAIN, else chip.phot.gain; the
catalog is in electrons unless the gain is 0), saturation (SATURATE, else
chip.phot.saturation; 0 = none), FWHM guess (from the WCS pixel scale and
chip.sources.fwhm_guess_arcsec, else chip.phot.fwhm_guess_px). Without a weight image the
variance is the measured sky noise plus the Poisson noise of the sources. With too few stars
for a PSF model a constant model of the measured FWHM is used (flag PSF_FALLBACK).

Exit codes: 0 catalog written; 1 the image is bad data (no usable sky, no sources, or no PSF
with chip.phot.psf_fallback = false): an empty catalog is written with the reason in its
PROBLEM keyword; 2 the inputs or options are wrong.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = __doc__

#: Header keywords copied from the image into the catalog's primary header.
COPY_KEYWORDS = ("OBJECT", "TELESCOP", "INSTRUME", "DETECTOR", "FILTER", "EXPTIME", "MJD-OBS",
                 "DATE-OBS", "AIRMASS", "EXPNAME", "RA", "DEC")


class PhotError(ValueError):
    """An input of ``ps1mpi phot`` is unusable; the message names it."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi phot", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, help="FITS image")
    p.add_argument("--hdu", type=int, default=None,
                   help="HDU number of the image (default: the first image HDU with data)")
    p.add_argument("--weight", type=Path, default=None, help="weight image (same shape)")
    p.add_argument("--weight-type", choices=("variance", "inverse-variance"), default=None,
                   help="meaning of --weight (default recipe chip.phot.weight_type)")
    p.add_argument("--mask", type=Path, default=None,
                   help="mask image (non-zero pixels are not used)")
    p.add_argument("--out", type=Path, default=None, help="output catalog (default IMAGE.cmf)")
    p.add_argument("--psf", type=Path, default=None, help="also write the PSF model here")
    p.add_argument("--background", type=Path, default=None,
                   help="also write the background model here")
    p.add_argument("--gain", type=float, default=None,
                   help="gain (e-/image unit), overriding the header; 0 keeps image units")
    p.add_argument("--saturation", type=float, default=None,
                   help="saturation level (image units), overriding the header; 0 = none")
    p.add_argument("--fwhm", type=float, default=None,
                   help="FWHM guess (pixels) for the first detection pass")
    p.add_argument("--recipe", action="append", default=[], type=Path, metavar="FILE",
                   help="recipe TOML overriding the packaged defaults (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe value (repeatable)")
    return p.parse_args(argv)


def _read_image(path: Path, hdu: int | None, what: str) -> tuple[np.ndarray, Any]:
    import fitsio

    if not path.is_file():
        raise PhotError(f"{path}: {what} not found")
    try:
        with fitsio.FITS(str(path)) as f:
            if hdu is not None:
                if not 0 <= hdu < len(f):
                    raise PhotError(f"{path}: no HDU {hdu} (the file has {len(f)})")
                h = f[hdu]
                if h.get_exttype() != "IMAGE_HDU" or not h.has_data():
                    raise PhotError(f"{path}: HDU {hdu} holds no image")
                return h.read(), h.read_header()
            for h in f:
                if h.get_exttype() == "IMAGE_HDU" and h.has_data():
                    return h.read(), h.read_header()
    except OSError as err:
        raise PhotError(f"{path}: not a readable FITS file ({err})") from None
    raise PhotError(f"{path}: holds no image")


def _celestial_wcs(header) -> Any:
    """Celestial astropy WCS of a fitsio header, or None."""
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    cards = fits.Header()
    for rec in header.records():
        name = rec.get("name")
        if not name or name in ("COMMENT", "HISTORY", "CONTINUE"):
            continue
        try:
            cards[name] = rec.get("value")
        except (ValueError, KeyError):
            continue
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(cards, relax=True, naxis=2)
    except Exception:  # noqa: BLE001 - an unparsable WCS is treated as none
        return None
    if not w.has_celestial:
        return None
    return w.celestial


def _number(header, key: str) -> float | None:
    if not key or key not in header:
        return None
    try:
        v = float(header[key])
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def prepare_image(image: np.ndarray, *, weight: np.ndarray | None,
                  weight_type: str, mask: np.ndarray | None, gain: float,
                  saturation: float, read_noise: float, background_cell: int):
    """Image, variance and mask of a foreign image, in electrons when ``gain > 0``.

    Parameters
    ----------
    image : ndarray
        Image (image units).
    weight : ndarray or None
        Variance or inverse variance (image units) per ``weight_type``.
    weight_type : {"variance", "inverse-variance"}
    mask : ndarray or None
        Non-zero = bad pixel (mask bit DETECTOR).
    gain : float
        Electrons per image unit; 0 keeps the image units (no Poisson term).
    saturation : float
        Saturation level (image units); 0 = none. Pixels at or above it get SAT.
    read_noise : float
        Read noise (electrons) added to the empirical sky noise when there is no weight.
    background_cell : int
        Background grid spacing (pixels) for the empirical noise.

    Returns
    -------
    image, variance : ndarray, float32
        In electrons (or image units), unusable pixels set to 0.
    mask : ndarray, uint16
        GAP for missing data (NaN, infinite, non-positive variance), SAT, DETECTOR.
    """
    from ..algorithms import maskbits
    from ..algorithms.background import fit_background

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise PhotError(f"image: expected a 2-D image, got shape {img.shape}")
    scale = float(gain) if gain > 0 else 1.0
    msk = np.zeros(img.shape, np.uint16)
    bad = ~np.isfinite(img)
    if saturation > 0:
        with np.errstate(invalid="ignore"):
            msk[np.isfinite(img) & (img >= saturation)] |= np.uint16(maskbits.SAT)
    if mask is not None:
        if mask.shape != img.shape:
            raise PhotError(f"mask: shape {mask.shape} differs from the image {img.shape}")
        msk[np.asarray(mask) != 0] |= np.uint16(maskbits.DETECTOR)
    img = np.where(bad, np.float32(0), img * np.float32(scale)).astype(np.float32)
    if weight is not None:
        if weight.shape != img.shape:
            raise PhotError(f"weight: shape {weight.shape} differs from the image {img.shape}")
        w = np.asarray(weight, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            var = w if weight_type == "variance" else 1.0 / w
        var = var * scale * scale
        bad |= ~np.isfinite(var) | ~(var > 0)
        var = np.where(bad, 0.0, var).astype(np.float32)
    else:
        msk_tmp = msk | np.where(bad, np.uint16(maskbits.GAP), np.uint16(0))
        try:
            bg = fit_background(img, msk_tmp, cell=int(background_cell))
        except ValueError:
            # no sky to measure the noise on: every pixel unusable, which the measurement
            # reports as bad data ("no_sky")
            bg = None
        if bg is None:
            var = np.zeros(img.shape, np.float32)
        else:
            sky_var = float(bg.sigma) ** 2 + float(read_noise) ** 2
            if gain > 0:
                src = np.maximum(img - bg.evaluate(img.shape), 0.0)
                var = (src + np.float32(sky_var)).astype(np.float32)
            else:
                var = np.full(img.shape, sky_var, np.float32)
        var[bad] = 0.0
    msk[bad] |= np.uint16(maskbits.GAP)
    return img, var, msk


def main(args: argparse.Namespace) -> int:
    from ..algorithms.catalog import find_and_measure
    from ..infra.config import RecipeError, load_recipe
    from ..infra.products import atomic_output
    from ..infra.runtime import ConfigError
    from ..stages.chip import measure_options, write_background_model, write_catalog

    t0 = time.perf_counter()
    try:
        recipe = load_recipe(args.recipe, args.set)
        rec = recipe["chip"]["phot"]
        image, header = _read_image(args.image, args.hdu, "image")
        weight = _read_image(args.weight, None, "weight image")[0] if args.weight else None
        mask = _read_image(args.mask, None, "mask image")[0] if args.mask else None
        gain = args.gain if args.gain is not None else _number(header, str(rec["gain_keyword"]))
        if gain is None or gain < 0:
            gain = float(rec["gain"])
        sat = args.saturation if args.saturation is not None else \
            _number(header, str(rec["saturation_keyword"]))
        if sat is None:
            sat = float(rec["saturation"])
        weight_type = args.weight_type or str(rec["weight_type"])
        if weight_type not in ("variance", "inverse-variance"):
            raise RecipeError(f"recipe chip.phot.weight_type: {weight_type!r} is not "
                              "'variance' or 'inverse-variance'")
        img, var, msk = prepare_image(image, weight=weight, weight_type=weight_type,
                                      mask=mask, gain=float(gain), saturation=float(sat),
                                      read_noise=float(rec["read_noise"]),
                                      background_cell=int(recipe["chip"]["sources"]
                                                          ["background_cell"]))
        wcs = _celestial_wcs(header)
        scale = None
        if wcs is not None:
            from astropy.wcs.utils import proj_plane_pixel_scales
            scale = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
            if not (np.isfinite(scale) and scale > 0):
                scale = None
        opts = measure_options(recipe["chip"]["sources"], pixel_scale=None if args.fwhm else scale,
                               fwhm_guess_px=args.fwhm or float(rec["fwhm_guess_px"]),
                               psf_fallback=bool(rec["psf_fallback"]))
        opts.min_sources = int(rec["min_sources"])
    except (PhotError, RecipeError, ConfigError) as err:
        print(f"ps1mpi phot: {err}", file=sys.stderr)
        return 2
    meas = find_and_measure(img, var, msk, gain=1.0 if gain > 0 else None, options=opts,
                            wcs=wcs)
    flux_unit = "e-" if gain > 0 else str(header.get("BUNIT", "count") or "count").strip()
    hdr: dict[str, Any] = {}
    for key in COPY_KEYWORDS:
        if key in header:
            v = header[key]
            if isinstance(v, (str, int, float, bool)):
                hdr[key] = v
    hdr["IMAGE"] = (str(args.image.name)[:68], "image measured")
    hdr["GAIN"] = (float(gain), "e- per image unit applied (0: image units kept)")
    hdr["SATURATE"] = (float(sat), "saturation level (image units; 0 = none)")
    hdr["WCS"] = (wcs is not None, "RA_PSF/DEC_PSF from the image WCS")
    if meas.background is not None:
        hdr["SKYSIG"] = (float(meas.background.sigma), f"sky noise per pixel ({flux_unit})")
    if meas.psf is not None:
        shp = meas.psf.shape_at((img.shape[1] - 1) / 2.0, (img.shape[0] - 1) / 2.0)
        hdr["FWHM_MAJ"] = (float(shp.fwhm_major), "PSF FWHM at the centre (pixels)")
        hdr["FWHM_MIN"] = (float(shp.fwhm_minor), "PSF FWHM at the centre (pixels)")
        hdr["NPSFSTAR"] = (int(meas.psf.n_psf_stars), "stars of the PSF model")
        hdr["APCORR"] = (float(meas.psf.ap_corr), "aperture correction applied")
    if meas.problem:
        hdr["PROBLEM"] = (meas.problem, meas.message[:60])
    out = args.out or args.image.with_suffix(".cmf")
    if out.resolve() == args.image.resolve():
        print(f"ps1mpi phot: --out {out} would overwrite the image", file=sys.stderr)
        return 2
    with atomic_output(out) as tmp:
        write_catalog(tmp, meas.catalog, hdr, flux_unit=flux_unit)
    if args.psf is not None and meas.psf is not None:
        from astropy.io.fits.verify import VerifyWarning
        with atomic_output(args.psf) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            meas.psf.to_hdulist().writeto(tmp)
    if args.background is not None and meas.background is not None:
        with atomic_output(args.background) as tmp:
            write_background_model(tmp, meas.background, {"IMAGE": str(args.image.name)[:68]})
    dt = time.perf_counter() - t0
    if meas.catalog.size == 0 and meas.problem:
        print(f"ps1mpi phot: {args.image}: {meas.message}; empty catalog written to {out}",
              file=sys.stderr)
        return 1
    note = f" ({meas.message})" if meas.message else ""
    print(f"phot: {meas.catalog.size} sources measured in {args.image} -> {out} "
          f"({dt:.1f} s){note}")
    return 0
