"""``simulate_survey``: the whole simulated survey, MPI-parallel by chip.

Every rank draws the same sky and plan from the seed. Rank 0 writes the shared files (the
survey plan with truth, the reference catalog, the sky truth); the detrend masters and the
science chips are dealt round-robin to the ranks, each rank writing its own chips. The random
numbers of a chip depend only on (seed, exposure, chip), so the output does not depend on the
number of ranks. Output tree (``docs/sim.md``)::

    <out>/survey.fits                         exposure plan + truth
    <out>/datastore/<EXP>/<EXP>.<CHIP>.fits   raw chips (docs/raw-format.md)
    <out>/truth/<EXP>/<EXP>.<CHIP>.truth.fits per-chip truth (sources, mask, artefacts, WCS)
    <out>/truth/{stars,galaxies,transients,movers}.fits
    <out>/refcat/refcat.fits                  reference catalog
    <out>/detrend/index.json + <kind>/...     detrend masters
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ps1mpi.geometry.camera import load_camera
from ps1mpi.geometry.focalplane import Distortion
from ps1mpi.infra.products import atomic_output
from ps1mpi.infra.rawfile import write_raw_chip
from ps1mpi.sim.catalogs import make_refcat, write_chip_truth, write_refcat, write_sky_truth, write_survey
from ps1mpi.sim.detrend import make_detrends
from ps1mpi.sim.exposure import exposure_context, simulate_chip
from ps1mpi.sim.instrument import Instrument
from ps1mpi.sim.plan import PRESETS, Preset, make_plan
from ps1mpi.sim.sky import offset_point, make_sky

__all__ = ["SurveySummary", "simulate_survey", "survey_setup", "raw_path", "truth_path", "CAMERA_CODE"]

CAMERA_CODE = {"gpc1": "g", "testcam": "t"}


@dataclass
class SurveySummary:
    """What :func:`simulate_survey` made (the same on every rank).

    Attributes
    ----------
    out_dir : str
    preset, camera : str
    seed : int
    exposures : list of str
        Exposure names, time order.
    filters : list of str
    n_chips : int
        Raw chip files written.
    chips : list of str
        Chips simulated.
    nranks : int
    seconds : dict
        Wall-clock seconds of each phase (sky, detrend, science, total).
    chip_seconds : float
        Mean seconds per science chip (per rank).
    paths : dict
        survey, refcat, detrend_index, datastore, truth.
    """

    out_dir: str
    preset: str
    camera: str
    seed: int
    exposures: list[str]
    filters: list[str]
    n_chips: int
    chips: list[str]
    nranks: int
    seconds: dict = field(default_factory=dict)
    chip_seconds: float = float("nan")
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def raw_path(out_dir, expname: str, chip: str) -> Path:
    """``<out>/datastore/<EXP>/<EXP>.<CHIP>.fits``."""
    return Path(out_dir) / "datastore" / expname / f"{expname}.{chip}.fits"


def truth_path(out_dir, expname: str, chip: str) -> Path:
    """``<out>/truth/<EXP>/<EXP>.<CHIP>.truth.fits``."""
    return Path(out_dir) / "truth" / expname / f"{expname}.{chip}.truth.fits"


def _inject_positions(preset: Preset, inst: Instrument, pointing_radec, rng) -> list[tuple[float, float, float]]:
    """Bright stars per pointing: one inside the field, the others just outside the focal-plane
    edge (facing a chip edge, so that they throw glints and ghosts)."""
    cam = inst.camera
    k = preset.sky.inject_bright
    out = []
    if k <= 0:
        return out
    X0, X1, Y0, Y1 = cam.focal_plane_extent()
    s = cam.pixel_scale
    for ra, dec in pointing_radec:
        # inside: within the central half of the field
        X, Y = rng.uniform(0.5 * X0, 0.5 * X1), rng.uniform(0.5 * Y0, 0.5 * Y1)
        a, d = offset_point(ra, dec, -X * s, Y * s)
        out.append((float(a), float(d), float(rng.uniform(8.5, 10.5))))
        for _ in range(k - 1):
            side = rng.integers(4)
            t = rng.uniform(0.2, 0.8)
            dist = rng.uniform(30.0, 150.0)
            if side == 0:
                X, Y = X0 - dist, Y0 + t * (Y1 - Y0)
            elif side == 1:
                X, Y = X1 + dist, Y0 + t * (Y1 - Y0)
            elif side == 2:
                X, Y = X0 + t * (X1 - X0), Y0 - dist
            else:
                X, Y = X0 + t * (X1 - X0), Y1 + dist
            a, d = offset_point(ra, dec, -X * s, Y * s)
            out.append((float(a), float(d), float(rng.uniform(6.5, 8.0))))
    return out


def survey_setup(*, preset: str | Preset = "demo", camera: str | None = None, seed: int = 1,
                 star_density: float | None = None):
    """Everything deterministic a survey needs before pixels: (preset, camera, instrument,
    plan, sky, distortion). Cheap enough to call on every rank (and from tests).
    ``star_density`` (stars with r < 21 per deg^2) overrides the preset's."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    pre = PRESETS[preset] if isinstance(preset, str) else preset
    if star_density is not None:
        if not star_density > 0:
            raise ValueError(f"star_density {star_density} must be positive (stars per deg^2 with r < 21)")
        pre = dataclasses.replace(pre, sky=dataclasses.replace(pre.sky, star_density=float(star_density)))
    cam = load_camera(camera or pre.camera)
    inst = Instrument(cam, seed=seed)
    code = CAMERA_CODE.get(cam.name, cam.name[0].lower())
    plan = make_plan(pre, seed=seed, camera_code=code, pixel_scale=cam.pixel_scale)
    X0, X1, Y0, Y1 = cam.focal_plane_extent()
    distortion = Distortion.gpc1_like(norm=0.5 * max(X1 - X0, Y1 - Y0))
    field_deg = inst.field_radius * cam.pixel_scale / 3600.0
    pts = [offset_point(pre.field[0], pre.field[1], dx * 60.0, dy * 60.0) for dx, dy in pre.pointings]
    off = max(math.hypot(dx, dy) for dx, dy in pre.pointings) / 60.0
    # cap: every pointing's field, dithers and pointing errors, plus half a field of padding
    radius = off + 1.5 * field_deg + (pre.dither + pre.pointing_error) / 3600.0 + 0.01
    rng = np.random.default_rng([int(seed), 61])
    extra = _inject_positions(pre, inst, pts, rng)
    nights = sorted({int(n) for n in plan["night"]})
    sky = make_sky(pre.field, radius, seed=seed, mjd_range=(float(plan["mjd"].min()), float(plan["mjd"].max())),
                   pointings=[(float(a), float(d)) for a, d in pts], field_radius=field_deg, nights=nights,
                   extra_stars=extra, params=pre.sky)
    return pre, cam, inst, plan, sky, distortion


def simulate_survey(out_dir: str | os.PathLike, *, preset: str | Preset = "demo", camera: str | None = None,
                    seed: int = 1, comm=MPI.COMM_WORLD, chips: list[str] | None = None,
                    exposures: list[str] | None = None, detrend: bool = True, compress: bool = False,
                    star_density: float | None = None, log=None) -> SurveySummary:
    """Simulate a survey: raw chips, detrend masters, reference catalog and truth.

    Parameters
    ----------
    out_dir : path-like
        Output directory (created).
    preset : str or Preset
        ``"tiny"`` (4 exposures, tests), ``"demo"`` (17 exposures, 2 pointings, g r i, 3 nights
        over two seasons), ``"single"`` (one r exposure, made for ``--camera gpc1``).
    camera : str, optional
        ``"testcam"`` or ``"gpc1"`` (default: the preset's camera).
    seed : int
        Everything is deterministic from the seed (and independent of the number of ranks).
    comm : MPI communicator
        Chips are dealt round-robin to its ranks.
    chips : list of str, optional
        Simulate only these chips (default all).
    exposures : list of str, optional
        Write only these exposures' chips (the plan and shared files are always complete).
    detrend : bool
        Also make the detrend masters.
    compress : bool
        Tile-compress the raw cells (RICE, lossless).
    star_density : float, optional
        Stars with r < 21 per deg^2 (the density knob; default the preset's, 40000 for the test
        camera presets: ~130 usable stars per 3.5' chip).
    log : callable, optional
        ``log(message)`` for progress (rank 0 only).

    Returns
    -------
    SurveySummary
    """
    t_all = time.time()
    out = Path(out_dir)
    say = (log if (log is not None and comm.rank == 0) else (lambda m: None))
    t0 = time.time()
    pre, cam, inst, plan, sky, distortion = survey_setup(preset=preset, camera=camera, seed=seed,
                                                         star_density=star_density)
    chip_list = [cam.chip(c).name for c in chips] if chips else list(cam.chip_names)
    names = [n.decode() for n in plan["expname"]]
    if exposures is not None:
        unknown = sorted(set(exposures) - set(names))
        if unknown:
            raise ValueError(f"exposures {unknown} are not in preset {pre.name}")
    todo = [i for i, n in enumerate(names) if exposures is None or n in exposures]
    bands = sorted({b.decode() for b in plan["band"]}, key="grizyw".index)
    mjd_range = (float(np.floor(plan["mjd"].min())) - 30.0, float(np.ceil(plan["mjd"].max())) + 30.0)
    if comm.rank == 0:
        for sub in ("datastore", "truth", "refcat", "detrend"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        header = {"PRESET": pre.name, "CAMERA": cam.name, "SEED": int(seed), "NEXP": len(names),
                  "FIELDRA": pre.field[0], "FIELDDEC": pre.field[1], "PIXSCALE": cam.pixel_scale,
                  "FIELDRAD": (inst.field_radius, "field radius (focal-plane px)"),
                  "UNITS": "RA DEC PA deg (true: RA DEC PA; header: *_HDR); MJD days; ZP mag for 1 e-/s; "
                           "SKY_E e-/px; SEEING arcsec"}
        write_survey(out / "survey.fits", plan, header=header, distortion=distortion)
        write_refcat(out / "refcat" / "refcat.fits", make_refcat(sky, seed=seed), sky=sky, seed=seed)
        write_sky_truth(out / "truth", sky, plan, seed=seed)
    comm.Barrier()
    seconds = {"setup": time.time() - t0}
    say(f"sim: preset {pre.name}, camera {cam.name}, {len(names)} exposures, {len(chip_list)} chips, "
        f"{sky.stars.size} stars, {sky.galaxies.size} galaxies, {comm.size} ranks")
    # ---- detrend masters
    t0 = time.time()
    if detrend:
        filters = list(dict.fromkeys(bands + list(pre.detrend_filters)))
        inst_d = inst if chips is None else _SubsetInstrument(inst, chip_list)
        make_detrends(inst_d, out, comm=comm, filters=filters, seed=seed, plan=pre.calibration,
                      mjd_range=mjd_range, sky_params=pre.sky)
        say(f"sim: detrend masters for {len(chip_list)} chips, filters {' '.join(filters)}")
    seconds["detrend"] = time.time() - t0
    # ---- science exposures: (exposure, chip) units dealt round-robin
    t0 = time.time()
    units = [(i, c) for i in todo for c in chip_list]
    mine = units[comm.rank::comm.size]
    ctx = None
    chip_times = []
    code = CAMERA_CODE.get(cam.name, cam.name[0].lower())
    for i, chip in mine:
        tc = time.time()
        if ctx is None or ctx.row["exp_index"] != i:
            ctx = exposure_context(plan[i], inst=inst, sky=sky, distortion=distortion, camera_code=code)
        rng = np.random.default_rng([int(seed), 71, i, cam.chip_names.index(chip)])
        res = simulate_chip(ctx, chip, rng=rng)
        name = names[i]
        write_raw_chip(raw_path(out, name, chip), res.cells, header=res.header, datasec=cam.datasec,
                       biassec=cam.biassec, gain=res.cell_headers["gain"], read_noise=res.cell_headers["read_noise"],
                       saturation=res.cell_headers["saturation"], maxlin=res.cell_headers["maxlin"],
                       compress=compress)
        write_chip_truth(truth_path(out, name, chip), res)
        chip_times.append(time.time() - tc)
    n_written = comm.allreduce(len(mine), op=MPI.SUM)
    comm.Barrier()
    seconds["science"] = time.time() - t0
    seconds["total"] = time.time() - t_all
    all_times = [t for part in comm.allgather(chip_times) for t in part]
    say(f"sim: {n_written} raw chips written in {seconds['science']:.1f} s")
    summary = SurveySummary(
        out_dir=str(out), preset=pre.name, camera=cam.name, seed=int(seed), exposures=[names[i] for i in todo],
        filters=bands, n_chips=int(n_written), chips=chip_list, nranks=comm.size, seconds=seconds,
        chip_seconds=float(np.mean(all_times)) if all_times else float("nan"),
        paths={"survey": str(out / "survey.fits"), "refcat": str(out / "refcat" / "refcat.fits"),
               "detrend_index": str(out / "detrend" / "index.json") if detrend else "",
               "datastore": str(out / "datastore"), "truth": str(out / "truth")})
    if comm.rank == 0:
        with atomic_output(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary.to_dict(), indent=1))
    comm.Barrier()
    return summary


class _SubsetInstrument:
    """An :class:`Instrument` view that lists only some chips (for partial simulations)."""

    def __init__(self, inst: Instrument, chips: list[str]) -> None:
        self._inst = inst
        self.camera = _SubsetCamera(inst.camera, chips)

    def __getattr__(self, name):
        return getattr(self._inst, name)

    def chip_index(self, chip: str) -> int:
        return self._inst.chip_index(chip)


class _SubsetCamera:
    def __init__(self, cam, chips):
        self._cam = cam
        self.chip_names = list(chips)

    def __getattr__(self, name):
        return getattr(self._cam, name)
