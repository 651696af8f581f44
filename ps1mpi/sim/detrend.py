"""Detrend masters made the way an observatory makes them.

Calibration frames (biases, darks, a flat-field exposure-time sequence, dome flats, night-sky
flats and fringe frames) are simulated through the same camera model as the science data
(:func:`ps1mpi.sim.instrument.expose_chip`), reduced with the masters already made, and combined
with the pure functions of :mod:`ps1mpi.algorithms.masters`. Chips are dealt round-robin to the
MPI ranks; the flat normalisation over the whole mosaic is one collective step. Outputs (all in
stitched-chip coordinates, see ``docs/sim.md``) go to ``<out>/detrend/<kind>/`` with an index
``<out>/detrend/index.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ps1mpi.algorithms import masters
from ps1mpi.infra.products import atomic_output
from ps1mpi.sim import psf as P
from ps1mpi.sim.instrument import EXPTIME, FILTER_ZP, FRINGE_AMP, Instrument, expose_chip
from ps1mpi.sim.plan import CalibrationPlan
from ps1mpi.sim.sky import SkyParams, counts_between, draw_broken_power_law

__all__ = ["DetrendEntry", "make_detrends", "reduce_frame", "calibration_light", "read_detrend_index", "read_nonlin",
           "detrend_path", "KINDS"]

KINDS = ("bias", "dark", "flat", "fringe", "mask", "nonlin")
_KIND_CODE = {"BIAS": 1, "DARK": 2, "LINEARITY": 3, "FLAT": 4, "SKYFLAT": 5, "FRINGE": 6}
_BAND_CODE = {b: i for i, b in enumerate("grizyw")}
_BAND_CODE[None] = 9


@dataclass
class DetrendEntry:
    """One row of the detrend index."""

    kind: str
    camera: str
    chip: str
    filter: str
    path: str
    mjd_start: float
    mjd_end: float
    nframes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def detrend_path(kind: str, camera: str, chip: str, band: str | None = None) -> str:
    """Relative path of a master inside ``<out>/detrend``."""
    tail = f".{band}" if band else ""
    return f"{kind}/{kind}.{camera}.{chip}{tail}.fits"


def read_detrend_index(detrend_dir: str | os.PathLike) -> list[dict]:
    """Entries of ``<detrend_dir>/index.json``."""
    with open(Path(detrend_dir) / "index.json") as fh:
        return json.load(fh)["detrends"]


# --------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------

def _dome_illumination(inst: Instrument, chip: str) -> np.ndarray:
    """Illumination of the dome screen on the chip (smooth, differs from the sky's)."""
    cam = inst.camera
    R = inst.field_radius
    X, _ = cam.chip_to_focal(chip, np.arange(cam.chip_nx, dtype=np.float64), np.zeros(1))
    _, Y = cam.chip_to_focal(chip, np.zeros(1), np.arange(cam.chip_ny, dtype=np.float64))
    u, v = X / R, Y / R
    # 1 + 0.04 u - 0.03 v + 0.05 (u^2 + v^2) as a rank-3 product
    left = np.stack([np.ones_like(v), 1.0 - 0.03 * v + 0.05 * v * v, np.zeros_like(v)], axis=1)
    right = np.stack([0.04 * u + 0.05 * u * u, np.ones_like(u), np.zeros_like(u)], axis=0)
    return (left.astype(np.float32) @ right.astype(np.float32))


def _random_stars(inst: Instrument, chip: str, light: np.ndarray, rng, *, band: str, exptime: float,
                  seeing: float, sky_e: float, params: SkyParams) -> None:
    """Add a random star field (a different field in every frame) to ``light``."""
    cam = inst.camera
    area = cam.chip_nx * cam.chip_ny * (cam.pixel_scale / 3600.0) ** 2
    n = rng.poisson(area * counts_between(params.star_density, 21.0, 13.0, 23.0, 18.0,
                                           params.star_slope_bright, params.star_slope_faint))
    if n == 0:
        return
    mag = draw_broken_power_law(rng, n, 13.0, 23.0, 18.0, params.star_slope_bright, params.star_slope_faint)
    flux = exptime * 10 ** (-0.4 * (mag - FILTER_ZP[band]))
    x = rng.uniform(-0.5, cam.chip_nx - 0.5, n)
    y = rng.uniform(-0.5, cam.chip_ny - 0.5, n)
    psf = P.ExposurePSF(seeing=seeing, field_radius=inst.field_radius, pixel_scale=cam.pixel_scale)
    X, Y = cam.chip_to_focal(chip, x, y)
    fw, e1, e2 = psf.at_focal(X, Y)
    rad = P.stamp_radius(flux, fw, psf=psf, threshold=0.02 * math.sqrt(sky_e))
    for r in np.unique(rad):
        s = np.flatnonzero(rad == r)
        P.render_points_into(light, x[s], y[s], flux[s], fw[s], e1[s], e2[s], psf=psf, radius=int(r))


def calibration_light(inst: Instrument, chip: str, obstype: str, *, rng: np.random.Generator, level_e: float = 0.0,
                      band: str | None = None, exptime: float = 0.0, fringe_factor: float = 1.0,
                      params: SkyParams | None = None) -> np.ndarray:
    """Light (e-, unit response, stitched chip) falling on ``chip`` in a calibration frame.

    BIAS and DARK: none. FLAT / LINEARITY: the dome lamp, ``level_e`` times the dome
    illumination. SKYFLAT / FRINGE: night sky of ``level_e`` with a random gradient, a random star
    field and the filter's fringes times ``fringe_factor``.
    """
    cam = inst.camera
    shape = (cam.chip_ny, cam.chip_nx)
    if obstype in ("BIAS", "DARK"):
        return np.zeros(shape, np.float32)
    if obstype in ("FLAT", "LINEARITY"):
        light = _dome_illumination(inst, chip)
        light *= np.float32(level_e)
        return light
    if obstype in ("SKYFLAT", "FRINGE"):
        R = inst.field_radius
        X, _ = cam.chip_to_focal(chip, np.arange(cam.chip_nx, dtype=np.float64), np.zeros(1))
        _, Y = cam.chip_to_focal(chip, np.zeros(1), np.arange(cam.chip_ny, dtype=np.float64))
        gx, gy = rng.normal(0.0, 0.02, 2)
        left = np.stack([np.ones_like(Y), gy * Y / R], axis=1).astype(np.float32)
        right = np.stack([level_e * (1 + gx * X / R), level_e * np.ones_like(X)], axis=0).astype(np.float32)
        light = left @ right
        fr = inst.fringe_pattern(chip, band)
        if fr is not None:
            light *= 1.0 + np.float32(fringe_factor) * fr
        _random_stars(inst, chip, light, rng, band=band, exptime=exptime, seeing=float(rng.uniform(0.8, 1.4)),
                      sky_e=level_e, params=params or SkyParams())
        return light
    raise ValueError(f"obstype {obstype!r} is not a calibration type")


def reduce_frame(cells: dict[str, np.ndarray], inst: Instrument, chip: str, *, bias: np.ndarray | None = None,
                 dark: np.ndarray | None = None, dark_time: float = 0.0, nonlin: dict | None = None,
                 electrons: bool = False, flat: np.ndarray | None = None) -> np.ndarray:
    """Reduce a raw calibration frame to a stitched chip image.

    Overscan per cell (:func:`ps1mpi.algorithms.masters.overscan_correct`), nonlinearity per
    cell (if tables are given), stitching, bias and dark subtraction (ADU), conversion to
    electrons with the cell gains (if ``electrons``), flat-field division (if given).
    Gap pixels are 0.
    """
    cam = inst.camera
    out = np.zeros((cam.chip_ny, cam.chip_nx), np.float32)
    el = inst.electronics(chip)
    # cell by cell: every temporary is one cell's size
    for cell in cam.cell_names:
        d = masters.overscan_correct(cells[cell], datasec=cam.datasec, biassec=cam.biassec)
        if nonlin is not None:
            adu, fac = nonlin[cell]
            d = masters.apply_nonlinearity(d, adu, fac)
        x0, y0 = cam.cell_origin(cell)
        sl = (slice(y0, y0 + cam.cell_ny), slice(x0, x0 + cam.cell_nx))
        if bias is not None:
            d -= bias[sl]
        if dark is not None and dark_time > 0:
            d -= dark[sl] * np.float32(dark_time)
        if electrons:
            d *= np.float32(el[cell].gain)
        if flat is not None:
            f = flat[sl]
            ok = f > 0.05
            np.divide(d, f, out=d, where=ok)
            d[~ok] = 0.0
        out[sl] = d
    return out


class _Stack:
    """A stack of n chip frames: in memory when small, otherwise in a scratch file in the work
    directory, written frame by frame and read back in bands of rows with explicit reads (not a
    memory map, whose resident pages would count against the rank's memory)."""

    def __init__(self, n: int, shape: tuple[int, int], workdir: str) -> None:
        self.n, self.shape = n, shape
        self._frame_bytes = shape[0] * shape[1] * 4
        if n * self._frame_bytes > 128 * 2 ** 20:
            fd, self._path = tempfile.mkstemp(suffix=".stack", dir=workdir)
            self._fh = os.fdopen(fd, "w+b")
            self._mem = None
        else:
            self._path, self._fh = None, None
            self._mem = np.empty((n,) + shape, np.float32)

    def __setitem__(self, k: int, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if self._mem is not None:
            self._mem[k] = frame
        else:
            self._fh.seek(k * self._frame_bytes)
            frame.tofile(self._fh)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.rows(0, self.shape[0])[k]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """``(n, y1 - y0, nx)`` band of every frame."""
        if self._mem is not None:
            return self._mem[:, y0:y1]
        y1 = min(y1, self.shape[0])
        nx = self.shape[1]
        out = np.empty((self.n, y1 - y0, nx), np.float32)
        self._fh.flush()
        for k in range(self.n):
            self._fh.seek(k * self._frame_bytes + y0 * nx * 4)
            out[k] = np.fromfile(self._fh, dtype=np.float32, count=(y1 - y0) * nx).reshape(y1 - y0, nx)
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            os.unlink(self._path)
        self._mem = None


def _combine_banded(stack: _Stack, func, rows: int = 512, **kw) -> np.ndarray:
    """Apply a stack combiner ``func(stack band, **kw) -> image`` in bands of rows."""
    ny = stack.shape[0]
    out = np.empty(stack.shape, np.float32)
    for a in range(0, ny, rows):
        out[a:a + rows] = func(stack.rows(a, a + rows), **kw)
    return out


def _frame(inst, chip, obstype, k, band, seed, *, level_e=0.0, exptime=0.0, dark_time=0.0, params=None):
    """Simulate calibration frame ``k`` of a kind: deterministic per (seed, kind, band, k, chip)."""
    c = inst.chip_index(chip)
    rng = np.random.default_rng([int(seed), 41, _KIND_CODE[obstype], _BAND_CODE[band], int(k), c])
    ff = float(np.random.default_rng([int(seed), 42, _BAND_CODE[band], int(k)]).uniform(0.7, 1.3))
    light = calibration_light(inst, chip, obstype, rng=rng, level_e=level_e, band=band, exptime=exptime,
                              fringe_factor=ff, params=params)
    res = expose_chip(inst, chip, light, exptime=exptime, dark_time=dark_time, rng=rng,
                      cosmic_rays=dark_time > 0)
    return res.cells


def _lamp(seed: int, band: str | None, k: int, kind: int) -> float:
    """Lamp brightness factor of dome frame k (the same for every chip of that exposure)."""
    return float(np.random.default_rng([int(seed), 43, kind, _BAND_CODE[band], int(k)]).normal(1.0, 0.02))


def _write_image(path: Path, data: np.ndarray, header: dict) -> None:
    import fitsio
    hdr = [{"name": k, "value": (v[0] if isinstance(v, tuple) else v),
            "comment": (v[1] if isinstance(v, tuple) else "")} for k, v in header.items()]
    with atomic_output(path) as tmp:
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(data, header=hdr)


def _write_nonlin(path: Path, tables: dict, header: dict) -> None:
    import fitsio
    cells = list(tables)
    n = max(len(tables[c][0]) for c in cells)
    arr = np.zeros(len(cells), dtype=[("CELL", "S4"), ("ADU", "f4", (n,)), ("FACTOR", "f4", (n,)),
                                      ("RATE", "f4"), ("RMS", "f4")])
    for i, c in enumerate(cells):
        adu, fac, rate, rms = tables[c]
        arr[i] = (c.encode(), adu, fac, rate, rms)
    hdr = [{"name": k, "value": (v[0] if isinstance(v, tuple) else v),
            "comment": (v[1] if isinstance(v, tuple) else "")} for k, v in header.items()]
    with atomic_output(path) as tmp:
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(arr, extname="NONLIN", header=hdr)


# --------------------------------------------------------------------------------------------
# the masters
# --------------------------------------------------------------------------------------------

def make_detrends(inst: Instrument, out_dir: str | os.PathLike, *, comm, filters: list[str], seed: int,
                  plan: CalibrationPlan, mjd_range: tuple[float, float], sky_params: SkyParams | None = None,
                  log=None) -> list[dict]:
    """Simulate calibration frames and build every master for every chip (MPI, by chip).

    Parameters
    ----------
    inst : Instrument
    out_dir : path-like
        Survey output directory; masters go to ``<out_dir>/detrend``.
    comm : mpi4py communicator
        Chips are dealt round-robin over its ranks; rank 0 writes the index.
    filters : list of str
        Filters that get a flat; z and y among them also get a fringe master.
    seed : int
    plan : CalibrationPlan
    mjd_range : (float, float)
        Validity range written to the index.
    sky_params : SkyParams, optional
        Star density of the sky and fringe frames.

    Returns
    -------
    list of dict
        The index entries (on every rank).
    """
    cam = inst.camera
    root = Path(out_dir) / "detrend"
    work = root / ".work"
    if comm.rank == 0:
        for k in KINDS:
            (root / k).mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    chips = cam.chip_names[comm.rank::comm.size]
    shape = (cam.chip_ny, cam.chip_nx)
    live = inst.live_mask()
    gap = ~live
    entries: list[DetrendEntry] = []
    mjd0, mjd1 = mjd_range
    filters = list(dict.fromkeys(filters))
    fringe_bands = [b for b in filters if FRINGE_AMP.get(b, 0.0) > 0.005]
    hdr_common = {"CAMERA": cam.name, "MJD-STRT": (mjd0, "start of validity (MJD)"),
                  "MJD-END": (mjd1, "end of validity (MJD)"), "SIMULATD": True}

    def entry(kind, chip, band, n):
        e = DetrendEntry(kind, cam.name, chip, band or "", detrend_path(kind, cam.name, chip, band), mjd0, mjd1, n)
        entries.append(e)
        return root / e.path

    levels = {}     # (chip, band) -> dict of frame levels and provisional sums
    keep = {}
    for chip in chips:
        el = inst.electronics(chip)
        gain_nom = float(np.median([e.gain for e in el.values()]))
        # ---- bias
        st = _Stack(plan.n_bias, shape, str(work))
        for k in range(plan.n_bias):
            st[k] = reduce_frame(_frame(inst, chip, "BIAS", k, None, seed), inst, chip)
        bias = _combine_banded(st, masters.make_bias)
        st.close()
        bias[gap] = 0.0
        _write_image(entry("bias", chip, None, plan.n_bias), bias,
                     {**hdr_common, "KIND": "bias", "CHIP": chip, "BUNIT": ("ADU", "residual bias after overscan"),
                      "NFRAMES": plan.n_bias})
        # ---- dark
        st = _Stack(plan.n_dark, shape, str(work))
        for k in range(plan.n_dark):
            st[k] = reduce_frame(_frame(inst, chip, "DARK", k, None, seed, dark_time=plan.dark_time),
                                      inst, chip, bias=bias)
        dark = _combine_banded(st, masters.make_dark, dark_times=np.full(plan.n_dark, plan.dark_time))
        st.close()
        dark[gap] = 0.0
        _write_image(entry("dark", chip, None, plan.n_dark), dark,
                     {**hdr_common, "KIND": "dark", "CHIP": chip, "BUNIT": ("ADU/s", "per second of dark time"),
                      "NFRAMES": plan.n_dark})
        # ---- nonlinearity from an exposure-time sequence of the dome lamp
        # up to 85% of the linear range: brighter, the pixels lit most by the lamp reach the
        # full well and bleed into the others; the table is extrapolated to saturation
        top = 0.85 * (cam.saturation - float(np.median([e.bias_level for e in el.values()])))
        levels_adu = np.geomspace(800.0, top, plan.n_linearity)
        rate = 1000.0 * gain_nom            # e-/s of the lamp
        t_lin = levels_adu * gain_nom / rate
        meas = {cell: [] for cell in cam.cell_names}
        for k, t in enumerate(t_lin):
            raw = _frame(inst, chip, "LINEARITY", k, "r", seed, level_e=rate * t * _lamp(seed, "r", k, 3),
                         exptime=t, dark_time=t)
            red = reduce_frame(raw, inst, chip, bias=bias, dark=dark, dark_time=t)
            for cell in cam.cell_names:
                x0, y0 = cam.cell_origin(cell)
                meas[cell].append(float(np.median(red[y0:y0 + cam.cell_ny, x0:x0 + cam.cell_nx])))
            del raw, red
        # the lamp varies from frame to frame: the sequence is calibrated by the lamp monitor
        lamp = np.array([_lamp(seed, "r", k, 3) for k in range(len(t_lin))])
        nonlin = {}
        ntab = {}
        for cell in cam.cell_names:
            m = np.array(meas[cell])
            try:
                if m.max() < 0.05 * levels_adu[-1]:
                    raise ValueError("no response")
                curve = masters.fit_nonlinearity(m, t_lin * lamp, max_level=el[cell].linear_range,
                                                 extrapolate=1.3)
                nonlin[cell] = (curve.adu, curve.factor)
                ntab[cell] = (curve.adu, curve.factor, curve.rate, curve.rms)
            except ValueError:       # dead cell: no response, identity table
                ident = (np.array([0.0, 65535.0], np.float32), np.ones(2, np.float32))
                nonlin[cell] = ident
                ntab[cell] = (np.linspace(0, 65535, 64).astype(np.float32), np.ones(64, np.float32), 0.0, 0.0)
        _write_nonlin(entry("nonlin", chip, None, plan.n_linearity), ntab,
                      {**hdr_common, "KIND": "nonlin", "CHIP": chip,
                       "COMMENT": "true ADU = measured ADU above bias * interp(measured, ADU, FACTOR)"})
        # ---- flats: dome flats corrected by night-sky flats
        for band in filters:
            st = _Stack(plan.n_dome, shape, str(work))
            t_dome = 10.0
            lev = np.zeros(plan.n_dome)
            for k in range(plan.n_dome):
                raw = _frame(inst, chip, "FLAT", k, band, seed, exptime=t_dome, dark_time=t_dome,
                             level_e=plan.dome_level * gain_nom * _lamp(seed, band, k, 4))
                frame = reduce_frame(raw, inst, chip, bias=bias, dark=dark, dark_time=t_dome, nonlin=nonlin,
                                     electrons=True)
                st[k] = frame
                lev[k] = masters.frame_level(frame, gap, step=7)
            dome = _combine_banded(st, masters.make_flat, levels=lev)
            st.close()
            st = _Stack(plan.n_sky, shape, str(work))
            slev = np.zeros(plan.n_sky)
            t_sky = EXPTIME.get(band, 30.0)
            for k in range(plan.n_sky):
                raw = _frame(inst, chip, "SKYFLAT", k, band, seed, exptime=t_sky, dark_time=t_sky,
                             level_e=plan.sky_flat_level, params=sky_params)
                frame = reduce_frame(raw, inst, chip, bias=bias, dark=dark, dark_time=t_sky, nonlin=nonlin,
                                     electrons=True)
                st[k] = frame
                slev[k] = masters.frame_level(frame, gap, step=7)
            skyflat = _combine_banded(st, masters.make_flat, levels=slev)
            st.close()
            low = (dome < 0.5) | gap
            corr = masters.illumination_correction(dome, skyflat, mask=low, box=128)
            prov = dome * corr
            prov[gap] = 0.0
            good = ~low & (prov > 0.5) & (prov < 1.5)
            np.save(work / f"flat.{chip}.{band}.npy", prov)
            levels[(chip, band)] = {"dome": lev, "sky": slev, "sum": float(prov[good].sum(dtype=np.float64)),
                                    "n": int(good.sum())}
            del dome, skyflat, corr, prov, good, low, frame, raw
        # keep a small camera's masters for the second pass; re-read a big one's from disk
        keep[chip] = (bias, dark, nonlin) if cam.chip_nx * cam.chip_ny < 4_000_000 else None
        del bias, dark
    # ---- collective: normalise the flats over the whole mosaic
    all_levels = {}
    for part in comm.allgather(levels):
        all_levels.update(part)
    for band in filters:
        # camera order, so that the sums do not depend on the number of ranks
        keys = sorted((k for k in all_levels if k[1] == band), key=lambda k: inst.chip_index(k[0]))
        sky_mosaic = np.median(np.array([all_levels[k]["sky"] for k in keys]), axis=0)
        bfac = {k[0]: float(np.mean(all_levels[k]["sky"] / sky_mosaic)) for k in keys}
        total = sum(bfac[k[0]] * all_levels[k]["sum"] for k in keys)
        count = sum(all_levels[k]["n"] for k in keys)
        G = total / count
        for chip in chips:
            prov = np.load(work / f"flat.{chip}.{band}.npy")
            flat = (prov * np.float32(bfac[chip] / G)).astype(np.float32)
            _write_image(entry("flat", chip, band, plan.n_dome + plan.n_sky), flat,
                         {**hdr_common, "KIND": "flat", "CHIP": chip, "FILTER": band,
                          "BUNIT": ("", "relative response, mean 1 over the mosaic"),
                          "NDOME": plan.n_dome, "NSKY": plan.n_sky, "CHIPSCAL": bfac[chip] / G})
    # ---- static masks and fringes (need the final flats)
    import fitsio
    for chip in chips:
        el = inst.electronics(chip)
        if keep.get(chip) is not None:
            bias, dark, nonlin = keep[chip]
        else:
            bias = fitsio.read(str(root / detrend_path("bias", cam.name, chip)))
            dark = fitsio.read(str(root / detrend_path("dark", cam.name, chip)))
            nonlin = _read_nonlin(root / detrend_path("nonlin", cam.name, chip))
        ref_band = "r" if "r" in filters else filters[0]
        flat_ref = fitsio.read(str(root / detrend_path("flat", cam.name, chip, ref_band))).astype(np.float32)
        dark_e = dark.copy()
        slices = inst.cell_slices()
        for cell, (sy, sx) in slices.items():
            dark_e[sy, sx] *= np.float32(el[cell].gain)
        mask = masters.make_static_mask(dark_e, flat_ref, gap=gap, cell_slices=slices, hot_rate=1.0)
        _write_image(entry("mask", chip, None, plan.n_dark + plan.n_dome), mask,
                     {**hdr_common, "KIND": "mask", "CHIP": chip,
                      "BUNIT": ("bits", "ps1mpi.algorithms.maskbits"),
                      "REFFLAT": ref_band, "HOTRATE": (1.0, "hot pixel threshold (e-/s)"),
                      "LOWFLAT": (0.5, "low response threshold")})
        for band in fringe_bands:
            flat_b = fitsio.read(str(root / detrend_path("flat", cam.name, chip, band))).astype(np.float32)
            st = _Stack(plan.n_fringe, shape, str(work))
            t_fr = EXPTIME.get(band, 30.0)
            lev = np.zeros(plan.n_fringe)
            for k in range(plan.n_fringe):
                raw = _frame(inst, chip, "FRINGE", k, band, seed, exptime=t_fr, dark_time=t_fr,
                             level_e=plan.fringe_sky_level, params=sky_params)
                frame = reduce_frame(raw, inst, chip, bias=bias, dark=dark, dark_time=t_fr, nonlin=nonlin,
                                     electrons=True, flat=flat_b)
                st[k] = frame
                lev[k] = masters.frame_level(frame, mask, step=7)
            comb = _combine_banded(st, lambda a: masters.sigma_clip_combine(a, scales=lev).image)
            st.close()
            fr = masters.fringe_template(comb, mask=mask, box=128)
            _write_image(entry("fringe", chip, band, plan.n_fringe), fr,
                         {**hdr_common, "KIND": "fringe", "CHIP": chip, "FILTER": band,
                          "BUNIT": ("", "fraction of the sky level"), "NFRAMES": plan.n_fringe})
    comm.Barrier()
    all_entries = []
    for part in comm.allgather([e.to_dict() for e in entries]):
        all_entries.extend(part)
    order = {k: i for i, k in enumerate(KINDS)}
    all_entries.sort(key=lambda e: (order[e["kind"]], e["chip"], e["filter"]))
    if comm.rank == 0:
        idx = {"camera": cam.name, "seed": int(seed), "coordinates": "stitched chip (chip_ny, chip_nx)",
               "detrends": all_entries}
        with atomic_output(root / "index.json") as tmp:
            tmp.write_text(json.dumps(idx, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    comm.Barrier()
    return all_entries


def read_nonlin(path) -> dict:
    """Nonlinearity tables of a chip: cell -> (ADU nodes, FACTOR) (see docs/sim.md)."""
    return _read_nonlin(path)


def _read_nonlin(path) -> dict:
    import fitsio
    t = fitsio.read(str(path), ext="NONLIN")
    return {(c.decode() if isinstance(c, bytes) else str(c)).strip(): (a, f)
            for c, a, f in zip(t["CELL"], t["ADU"], t["FACTOR"])}
