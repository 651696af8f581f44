"""Survey presets and the exposure plan (with its truth), deterministic from a seed.

A preset lists pointings (offsets from a field centre) and visits: (night, pointing, filter,
number of exposures). Two exposures of a visit form a TTI pair ~16 minutes apart, as in the
PS1 3pi survey; every exposure is dithered. Nights are grouped into observing seasons a year
apart, so that nightly, deep, best-seeing and out-of-season stacks all get inputs. Each
exposure gets its truth: boresight, pointing error, airmass (from the hour angle at the
PS1 site), seeing and PSF shape, sky brightness and gradient, zero point (extinction and
clouds) and fringe amplitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ps1mpi.infra.rawfile import exposure_name
from ps1mpi.sim.instrument import EXPTIME, EXTINCTION, FILTER_ZP, SKY_MAG
from ps1mpi.sim.sky import SkyParams, offset_point

__all__ = ["Visit", "Preset", "PRESETS", "CalibrationPlan", "PLAN_DTYPE", "make_plan",
           "airmass_at", "SITE_LAT", "SITE_LON"]

SITE_LAT = 20.7072     # Haleakala (deg N)
SITE_LON = -156.2560   # deg E


@dataclass(frozen=True)
class Visit:
    """Exposures of one pointing in one filter on one night.

    Attributes
    ----------
    night : int
        Night number (days after the preset's first night).
    pointing : int
        Index into the preset's pointings.
    band : str
        Filter.
    nexp : int
        Exposures (2 = a TTI pair).
    """

    night: int
    pointing: int
    band: str
    nexp: int = 2


@dataclass(frozen=True)
class CalibrationPlan:
    """How many calibration frames make each detrend master."""

    n_bias: int = 8
    n_dark: int = 5
    dark_time: float = 300.0
    n_linearity: int = 12
    n_dome: int = 6
    n_sky: int = 7
    n_fringe: int = 6
    dome_level: float = 25000.0    # ADU
    sky_flat_level: float = 8000.0   # e-
    fringe_sky_level: float = 6000.0  # e-


@dataclass(frozen=True)
class Preset:
    """A named survey.

    Attributes
    ----------
    name : str
    camera : str
        Default camera.
    field : tuple
        (ra, dec) of the field centre (deg).
    pointings : tuple
        Offsets of the pointings from the field centre (arcmin East, arcmin North).
    visits : tuple of Visit
    first_night : int
        MJD of night 0 (the field transits near local midnight then).
    dither : float
        Dither half-range (arcsec).
    pointing_error : float
        Maximum pointing error written into the headers (arcsec).
    sky : SkyParams
    calibration : CalibrationPlan
    detrend_filters : tuple
        Filters that get flats (besides those observed); z and y also get fringe frames.
    """

    name: str
    camera: str
    field: tuple[float, float]
    pointings: tuple[tuple[float, float], ...]
    visits: tuple[Visit, ...]
    first_night: int = 55576
    dither: float = 20.0
    pointing_error: float = 120.0
    sky: SkyParams = field(default_factory=SkyParams)
    calibration: CalibrationPlan = field(default_factory=CalibrationPlan)
    detrend_filters: tuple[str, ...] = ("z", "y")


_FIELD = (120.0, 20.0)   # l ~ 205, b ~ +26: a moderate Galactic latitude
_S2 = 365                # a year later: the second season

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", camera="testcam", field=_FIELD, pointings=((0.0, 0.0),),
        visits=(Visit(0, 0, "r", 2), Visit(0, 0, "y", 1), Visit(_S2, 0, "r", 1)),
        calibration=CalibrationPlan(n_bias=3, n_dark=3, n_linearity=8, n_dome=3, n_sky=3, n_fringe=3),
        detrend_filters=(),
    ),
    "demo": Preset(
        name="demo", camera="testcam", field=_FIELD, pointings=((0.0, 0.0), (3.0, 1.5)),
        visits=(Visit(0, 0, "r", 2), Visit(0, 0, "g", 2), Visit(0, 0, "i", 2), Visit(0, 1, "r", 2),
                Visit(3, 0, "r", 2), Visit(3, 0, "g", 1), Visit(3, 0, "i", 1), Visit(3, 1, "r", 1),
                Visit(_S2, 0, "r", 2), Visit(_S2, 0, "g", 1), Visit(_S2, 0, "i", 1)),
        detrend_filters=("z", "y"),
    ),
    "single": Preset(
        name="single", camera="gpc1", field=_FIELD, pointings=((0.0, 0.0),),
        visits=(Visit(0, 0, "r", 1),), dither=0.0, pointing_error=180.0,
        sky=SkyParams(star_density=8000.0, mag_faint=23.5),
        calibration=CalibrationPlan(n_bias=3, n_dark=3, n_linearity=8, n_dome=3, n_sky=4, n_fringe=3),
        detrend_filters=(),
    ),
}

PLAN_DTYPE = np.dtype([
    ("expname", "S16"), ("exp_index", "i4"), ("pointing", "i2"), ("band", "S2"),
    ("mjd", "f8"), ("night", "i4"), ("season", "i2"), ("tti_pair", "i4"), ("exptime", "f4"),
    ("airmass", "f4"), ("hour_angle", "f4"),
    ("ra", "f8"), ("dec", "f8"), ("pa", "f8"),               # true boresight (deg)
    ("ra_hdr", "f8"), ("dec_hdr", "f8"), ("pa_hdr", "f8"),   # header (commanded) values
    ("zp", "f4"), ("cloud", "f4"), ("sky_mag", "f4"), ("sky_e", "f4"),
    ("sky_grad_x", "f4"), ("sky_grad_y", "f4"),
    ("seeing", "f4"), ("psf_beta", "f4"), ("psf_e1", "f4"), ("psf_e2", "f4"), ("psf_astig", "f4"),
    ("psf_fwhm_radial", "f4"), ("psf_wing_frac", "f4"), ("psf_wing_scale", "f4"), ("psf_wing_beta", "f4"),
    ("fringe_factor", "f4"),
])


def _gmst_deg(mjd):
    return (280.46061837 + 360.98564736629 * (np.asarray(mjd, dtype=np.float64) - 51544.5)) % 360.0


def airmass_at(ra: float, dec: float, mjd) -> tuple[np.ndarray, np.ndarray]:
    """Airmass (Kasten & Young 1989) and hour angle (deg) of (ra, dec) seen from Haleakala."""
    ha = (_gmst_deg(mjd) + SITE_LON - ra + 180.0) % 360.0 - 180.0
    lat, d, h = np.radians(SITE_LAT), np.radians(dec), np.radians(ha)
    sin_alt = np.sin(lat) * np.sin(d) + np.cos(lat) * np.cos(d) * np.cos(h)
    alt = np.degrees(np.arcsin(np.clip(sin_alt, -1, 1)))
    with np.errstate(invalid="ignore"):
        x = 1.0 / (sin_alt + 0.50572 * (alt + 6.07995) ** -1.6364)
    return np.where(alt > 0, x, np.inf), ha


def _transit_mjd(ra: float, night_mjd: int) -> float:
    """MJD of the upper transit of ``ra`` nearest to local midnight of the night starting at
    ``night_mjd`` (local midnight at Haleakala is ~10:25 UT)."""
    midnight = night_mjd + (-SITE_LON / 15.0) / 24.0 + 0.0
    ha = (_gmst_deg(midnight) + SITE_LON - ra + 180.0) % 360.0 - 180.0
    return midnight - ha / 360.98564736629


def make_plan(preset: Preset, *, seed: int, camera_code: str, pixel_scale: float) -> np.ndarray:
    """The exposure plan with its truth (one row of :data:`PLAN_DTYPE` per exposure, time order).

    Parameters
    ----------
    preset : Preset
    seed : int
    camera_code : str
        One letter used in the exposure names (``g`` GPC1, ``t`` test camera).
    pixel_scale : float
        arcsec / pixel (for the sky level per pixel).
    """
    rng = np.random.default_rng([int(seed), 31])
    rows = []
    pair_id = 0
    nights = sorted({v.night for v in preset.visits})
    for night in nights:
        visits = [v for v in preset.visits if v.night == night]
        night_mjd = preset.first_night + night
        # night conditions
        moon = rng.uniform(0.0, 0.8)
        start = _transit_mjd(preset.field[0], night_mjd) - 1.0 / 24.0
        firsts, seconds = [], []
        for v in visits:
            pair = pair_id
            pair_id += 1
            firsts.append((v, pair))
            for _ in range(v.nexp - 1):
                seconds.append((v, pair))
        sched = [(start + i * 2.0 / 1440.0, v, p) for i, (v, p) in enumerate(firsts)]
        sched += [(start + (16.0 + 2.0 * i) / 1440.0, v, p) for i, (v, p) in enumerate(seconds)]
        sched.sort(key=lambda s: s[0])
        for mjd, v, pair in sched:
            rows.append((night, night_mjd, mjd, v, pair, moon))
    plan = np.zeros(len(rows), PLAN_DTYPE)
    seq_in_night: dict[int, int] = {}
    pair_seeing: dict[int, float] = {}
    for k, (night, night_mjd, mjd, v, pair, moon) in enumerate(rows):
        r = plan[k]
        seq = seq_in_night.get(night_mjd, 0) + 1
        seq_in_night[night_mjd] = seq
        r["expname"] = exposure_name(night_mjd, seq, camera_code=camera_code)
        r["exp_index"] = k
        r["pointing"] = v.pointing
        r["band"] = v.band
        r["mjd"] = mjd
        r["night"] = night_mjd
        r["season"] = night // 180
        r["tti_pair"] = pair
        r["exptime"] = EXPTIME[v.band]
        dx, dy = preset.pointings[v.pointing]
        pra, pdec = offset_point(preset.field[0], preset.field[1], dx * 60.0, dy * 60.0)
        ddx, ddy = rng.uniform(-preset.dither, preset.dither, 2)
        ra, dec = offset_point(pra, pdec, ddx, ddy)
        r["ra"], r["dec"] = ra, dec
        r["pa"] = rng.normal(0.0, 0.05)
        # pointing error: uniform in a disc of radius pointing_error arcsec
        er = preset.pointing_error * math.sqrt(rng.uniform())
        ea = rng.uniform(0, 2 * np.pi)
        # the header holds the commanded pointing; the truth is off by the error
        r["ra_hdr"], r["dec_hdr"] = offset_point(ra, dec, er * math.cos(ea), er * math.sin(ea))
        r["pa_hdr"] = 0.0
        X, ha = airmass_at(float(ra), float(dec), mjd + 0.5 * EXPTIME[v.band] / 86400.0)
        r["airmass"], r["hour_angle"] = float(X), float(ha)
        cloud = 0.0 if rng.uniform() < 0.8 else rng.uniform(0.02, 0.3)
        r["cloud"] = cloud
        r["zp"] = FILTER_ZP[v.band] - EXTINCTION[v.band] * (float(X) - 1.0) - cloud
        sky_mag = SKY_MAG[v.band] - moon * {"g": 1.0, "r": 0.7, "i": 0.5, "z": 0.3, "y": 0.2, "w": 0.7}[v.band] \
            + rng.normal(0.0, 0.05) - 0.1 * (float(X) - 1.0)
        r["sky_mag"] = sky_mag
        # e- per pixel (unit response) over the exposure; the sky is emitted above the
        # extinction, so its level uses the zero point outside the atmosphere
        r["sky_e"] = EXPTIME[v.band] * pixel_scale ** 2 * 10 ** (-0.4 * (sky_mag - FILTER_ZP[v.band]))
        r["sky_grad_x"], r["sky_grad_y"] = rng.normal(0.0, 0.02, 2)
        if pair in pair_seeing:
            seeing = float(np.clip(pair_seeing[pair] * rng.uniform(0.95, 1.05), 0.75, 1.6))
        else:
            seeing = float(np.clip(1.05 * rng.lognormal(0.0, 0.18), 0.75, 1.6))
            pair_seeing[pair] = seeing
        r["seeing"] = seeing
        r["psf_beta"] = rng.uniform(2.8, 3.4)
        r["psf_e1"], r["psf_e2"] = rng.normal(0.0, 0.03, 2)
        r["psf_astig"] = rng.normal(0.03, 0.015)
        r["psf_fwhm_radial"] = rng.uniform(0.05, 0.15)
        r["psf_wing_frac"] = rng.uniform(0.04, 0.08)
        r["psf_wing_scale"] = 2.5
        r["psf_wing_beta"] = 2.5
        r["fringe_factor"] = rng.uniform(0.7, 1.3)
    return plan
