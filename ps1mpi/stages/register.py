"""register: describe every downloaded raw exposure so the chip stage can find it.

Registration, in the IPP's sense (adding exposures to the list of known raw exposures, not
pixel alignment), as two steps like the IPP's ``register_imfile`` / ``register_exp``:

1. Per chip (one unit each, in parallel across ranks): check the raw file against the raw
   format (:func:`ps1mpi.infra.rawfile.validate_raw_chip`), read it, take the metadata from its
   primary header (:func:`ps1mpi.algorithms.rawstats.header_metadata`), check it against what
   the datastore listed for the exposure, and measure its pixels (mean, standard deviation,
   saturated fraction, NaN content: :func:`~ps1mpi.algorithms.rawstats.chip_pixel_stats`).
   Result: one ``rawImfile`` row.
2. Per exposure, on rank 0 once all its chips are done: merge the chips into one ``rawExp``
   row (:func:`~ps1mpi.algorithms.rawstats.merge_exposure_metadata`): shared values checked
   for consistency, derived values (mean of the chip means, ...) computed.

Rules:

- An exposure is registered when its ``summitExp`` run is DONE with quality 0 (every chip
  downloaded and verified, none faulted), exactly once: a second ``summitExp`` row with the
  same exposure name is a conflicting second version, refused and reported as an error
  (:attr:`RegisterStage.conflicts`); re-running registers nothing twice.
- Bad data is quality, not a fault: an unreadable or malformed chip is registered with a
  non-zero quality (codes below) and its reason, and later stages skip it. A missing file is a
  fault (the system lost it). An exposure whose good chips disagree on shared values, or that
  has no good chip, gets a non-zero quality.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..algorithms.rawstats import (RawMetadataError, chip_pixel_stats, header_metadata,
                                   merge_exposure_metadata)
from ..infra.ledger import Ledger
from ..infra.rawfile import RawFileError, read_raw_chip, validate_raw_chip
from ..infra.runtime import Outcome, WorkUnit
from ..infra.schema import State
from ..stages.base import Stage, StageContext

__all__ = ["RegisterStage", "QUALITY", "EXP_QUALITY"]

# chip quality codes (rawImfile.quality)
QUALITY = {
    "unreadable": 1,   # not a complete, readable FITS file (truncated, damaged)
    "header": 2,       # primary keywords missing or invalid
    "cells": 3,        # wrong cell count, malformed cell extensions or sections
    "all_nan": 4,      # no finite pixel in the chip
    "mismatch": 5,     # header disagrees with the datastore listing (exposure, chip, filter, time)
}
# exposure quality codes (rawExp.quality)
EXP_QUALITY = {
    "no_good_chip": 1,  # every chip has bad quality
    "conflict": 2,      # the good chips disagree on values every chip must share
}

# how close a chip's header must be to the datastore's listing
MJD_TOLERANCE_DAYS = 1.0 / 86400.0
EXPTIME_TOLERANCE_S = 1e-3


def classify_problems(problems: list[str]) -> int:
    """Chip quality code for the problems :func:`validate_raw_chip` reports."""
    text = " ".join(problems).lower()
    if any(w in text for w in ("truncated", "not a fits", "is empty", "unreadable",
                               "not a multiple of 2880", "no such file")):
        return QUALITY["unreadable"]
    if any(w in text for w in ("cell", "ncells", "datasec", "biassec")):
        return QUALITY["cells"]
    return QUALITY["header"]


class RegisterStage(Stage):
    """Register downloaded exposures (see the module docstring)."""

    name = "register"
    run_table = "rawExp"
    element_table = "rawImfile"
    inputs = ("summitExp", "summitImfile")
    outputs = {}

    def __init__(self) -> None:
        self.conflicts: list[str] = []  # conflicting second versions found by define (rank 0)
        self._cameras: dict[str, object] = {}

    # ------------------------------------------------------------------ define (rank 0)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Create a rawExp run and rawImfile elements for every summitExp run that is DONE
        with quality 0 and not registered yet. Returns the chips added."""
        self.conflicts = []
        s_state = ledger.column("summitExp", "state")
        s_quality = ledger.column("summitExp", "quality")
        ready = np.flatnonzero((s_state == State.DONE) & (s_quality == 0))
        if ready.size == 0:
            return 0
        s_name = ledger.column("summitExp", "exp_name")
        registered = {}
        for name, summit in zip(ledger.column(self.run_table, "exp_name"),
                                ledger.column(self.run_table, "summit_exp")):
            registered.setdefault(bytes(name), int(summit))
        im_run = ledger.column("summitImfile", "run")
        im_state = ledger.column("summitImfile", "state")
        order = np.argsort(im_run, kind="stable")
        starts = np.searchsorted(im_run[order], ready, side="left")
        ends = np.searchsorted(im_run[order], ready, side="right")
        exp_cols = ledger.read("summitExp", ready, ["exp_name", "filter", "mjd", "camera",
                                                    "exptime", "ra", "dec"])
        claimed: dict[bytes, int] = {}
        take: list[int] = []
        chip_rows: list[np.ndarray] = []
        for i, srow in enumerate(ready):
            name = bytes(s_name[srow])
            prior = registered.get(name, claimed.get(name))
            if prior is not None:
                if prior != int(srow):
                    msg = (f"exposure {name.decode()}: summitExp row {int(srow)} is a second "
                           f"version of an exposure already registered from summitExp row "
                           f"{prior}; refused")
                    self.conflicts.append(msg)
                    ctx.log.error("register: %s", msg)
                continue
            chips = order[starts[i]:ends[i]]
            if chips.size == 0 or np.any(im_state[chips] != State.DONE):
                continue  # not every chip downloaded (cannot happen for a DONE run)
            claimed[name] = int(srow)
            take.append(i)
            chip_rows.append(chips)
        if not take:
            return 0
        # one append per table for all the exposures: each append resizes every column
        t = np.array(take)
        nchips = np.array([c.size for c in chip_rows])
        runs = ledger.append(self.run_table, t.size, exp_name=exp_cols["exp_name"][t],
                             filter=exp_cols["filter"][t], mjd=exp_cols["mjd"][t],
                             summit_exp=ready[t], camera=exp_cols["camera"][t],
                             exptime=exp_cols["exptime"][t], ra=exp_cols["ra"][t],
                             dec=exp_cols["dec"][t], nchips=nchips)
        ledger.transition(self.run_table, runs, State.RUN,
                          message=[f"from summitExp row {int(r)}" for r in ready[t]])
        chips = np.concatenate(chip_rows)
        c = ledger.read("summitImfile", chips, ["chip", "path"])
        rows = ledger.append(self.element_table, chips.size, run=np.repeat(runs, nchips),
                             exp_name=np.repeat(exp_cols["exp_name"][t], nchips),
                             chip=c["chip"], path=c["path"],
                             ra=np.repeat(exp_cols["ra"][t], nchips),
                             dec=np.repeat(exp_cols["dec"][t], nchips))
        ledger.transition(self.element_table, rows, State.NEW, message="downloaded")
        return int(chips.size)

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending chips with what the datastore listed for their exposure."""
        rows = ledger.pending(self.element_table,
                              retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        el = ledger.read(self.element_table, rows, ["exp_name", "chip", "path", "ra", "dec", "run"])
        runs = el["run"]
        summit = ledger.column(self.run_table, "summit_exp", runs)
        ex = ledger.read("summitExp", summit, ["filter", "mjd", "exptime", "camera"])
        out = []
        for i, r in enumerate(rows):
            exp, chip = el["exp_name"][i].decode(), el["chip"][i].decode()
            out.append(WorkUnit(self.element_table, int(r), f"{exp}.{chip}", float(el["ra"][i]),
                                float(el["dec"][i]),
                                info={"exp_name": exp, "chip": chip, "path": el["path"][i].decode(),
                                      "filter": ex["filter"][i].decode(),
                                      "mjd": float(ex["mjd"][i]),
                                      "exptime": float(ex["exptime"][i]),
                                      "camera": ex["camera"][i].decode()}))
        return out

    # ------------------------------------------------------------------ process (any rank)
    def _camera(self, name: str):
        if name not in self._cameras:
            camera = None
            if name:
                try:
                    from ..geometry.camera import load_camera

                    camera = load_camera(name)
                except Exception:  # noqa: BLE001 - an unknown camera is checked without it
                    camera = None
            self._cameras[name] = camera
        return self._cameras[name]

    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Describe one raw chip: header metadata and pixel statistics, or a bad quality."""
        info = unit.info
        path = ctx.root / info["path"]
        if not info["path"] or not path.is_file():
            raise FileNotFoundError(f"{path}: raw chip {unit.name} is missing from the raw tree")
        camera = self._camera(info["camera"])
        problems = validate_raw_chip(path, camera=camera, check_pixels=False)
        if problems:
            return _bad(classify_problems(problems), path, problems)
        try:
            chip = read_raw_chip(path)
        except RawFileError as err:
            return _bad(QUALITY["unreadable"], path, [str(err)])
        try:
            md = header_metadata(chip.header, source=path.name)
        except RawMetadataError as err:
            return _bad(QUALITY["header"], path, err.problems)
        summary = {"filter": md["filter"], "mjd": md["mjd"], "exptime": md["exptime"],
                   "airmass": md["airmass"], "ra": md["ra"], "dec": md["dec"],
                   "ncells": len(chip.cells)}
        mismatch = _mismatches(md, info)
        if mismatch:
            return _bad(QUALITY["mismatch"], path, mismatch, summary)
        try:
            stats = chip_pixel_stats(
                chip.cells,
                saturation={c: float(h["SATURATE"]) for c, h in chip.cell_headers.items()},
                datasec={c: chip.datasec(c) for c in chip.cells})
        except (ValueError, KeyError) as err:
            return _bad(QUALITY["cells"], path, [str(err)], summary)
        summary.update(stats.as_summary())
        if stats.all_nan:
            return _bad(QUALITY["all_nan"], path, ["every pixel is NaN"], summary)
        if stats.nan_cells:
            ctx.log.warning("register: %s: cells without finite pixels: %s", unit.name,
                            ", ".join(stats.nan_cells))
        return Outcome(summary=summary)

    # ------------------------------------------------------------------ complete (rank 0)
    def complete(self, ledger: Ledger, ctx: StageContext) -> None:
        """Merge the chips of every exposure whose chips are all done into its rawExp row."""
        run_state = ledger.column(self.run_table, "state")
        open_runs = np.flatnonzero(run_state == State.RUN)
        if open_runs.size == 0:
            return
        el_run = ledger.column(self.element_table, "run")
        el_state = ledger.column(self.element_table, "state")
        finished = (el_state == State.DONE) | (el_state == State.DROP)
        n_all = np.bincount(el_run[el_run >= 0], minlength=run_state.size)
        n_fin = np.bincount(el_run[(el_run >= 0) & finished], minlength=run_state.size)
        close = open_runs[(n_all[open_runs] > 0) & (n_fin[open_runs] == n_all[open_runs])]
        if close.size == 0:
            return
        members = np.flatnonzero(np.isin(el_run, close))
        cols = ledger.read(self.element_table, members,
                           ["run", "exp_name", "chip", "path", "filter", "mjd", "exptime",
                            "airmass", "ra", "dec", "mean", "stdev", "sat_frac", "quality",
                            "state"])
        for run in close:
            sel = np.flatnonzero(cols["run"] == run)
            chips = []
            for j in sel:
                good = cols["quality"][j] == 0 and cols["state"][j] == State.DONE
                rec = {"chip": cols["chip"][j].decode(), "quality": 0 if good else 1}
                if good:
                    rec.update(exp_name=cols["exp_name"][j].decode(),
                               filter=cols["filter"][j].decode(),
                               **{c: float(cols[c][j]) for c in ("mjd", "exptime", "airmass",
                                                                  "ra", "dec", "mean", "stdev",
                                                                  "sat_frac")})
                chips.append(rec)
            merged = merge_exposure_metadata(chips)
            values = merged.values
            good_paths = [cols["path"][j].decode() for j, c in zip(sel, chips) if c["quality"] == 0]
            posangle = _posangle(ctx.root, good_paths)
            quality, message = 0, f"{merged.nchips - merged.nchips_bad} good chips of {merged.nchips}"
            if merged.nchips_bad == merged.nchips:
                quality, message = EXP_QUALITY["no_good_chip"], "no chip with good quality"
            elif merged.conflicts:
                quality = EXP_QUALITY["conflict"]
                message = "; ".join(str(c) for c in merged.conflicts)
            update = {"nchips": merged.nchips, "nchips_bad": merged.nchips_bad,
                      "mean": merged.mean, "stdev": merged.stdev, "sat_frac": merged.sat_frac,
                      "posangle": posangle}
            for key in ("mjd", "exptime", "airmass", "ra", "dec"):
                if key in values:
                    update[key] = values[key]
            if "filter" in values:
                update["filter"] = values["filter"]
            ledger.transition(self.run_table, [int(run)], State.DONE, quality=quality,
                              message=message, **update)
            if quality:
                ctx.log.warning("register: exposure %s registered with quality %d: %s",
                                values.get("exp_name", f"rawExp[{run}]"), quality, message)
        ledger.flush()


def _bad(quality: int, path: Path, problems: list[str], summary: dict | None = None) -> Outcome:
    return Outcome(quality=quality, message=f"{path.name}: " + "; ".join(problems),
                   summary=summary or {})


def _mismatches(md: dict, info: dict) -> list[str]:
    """Where the chip's header disagrees with the datastore's listing of its exposure."""
    out = []
    if md["exp_name"] != info["exp_name"]:
        out.append(f"EXPNAME {md['exp_name']!r} but the datastore lists exposure {info['exp_name']!r}")
    if md["chip"] != info["chip"]:
        out.append(f"DETECTOR {md['chip']!r} but the datastore lists chip {info['chip']!r}")
    if info["filter"] and md["filter"] != info["filter"]:
        out.append(f"FILTER {md['filter']!r} but the datastore lists {info['filter']!r}")
    if math.isfinite(info["mjd"]) and abs(md["mjd"] - info["mjd"]) > MJD_TOLERANCE_DAYS:
        out.append(f"MJD-OBS {md['mjd']!r} but the datastore lists {info['mjd']!r}")
    if math.isfinite(info["exptime"]) and abs(md["exptime"] - info["exptime"]) > EXPTIME_TOLERANCE_S:
        out.append(f"EXPTIME {md['exptime']!r} but the datastore lists {info['exptime']!r}")
    return out


def _posangle(root: Path, paths: list[str]) -> float:
    """POSANGLE from the primary header of the first good chip (deg; NaN if none)."""
    import fitsio

    for rel in paths:
        try:
            value = float(fitsio.read_header(str(root / rel), 0)["POSANGLE"])
        except Exception:  # noqa: BLE001 - try the next chip
            continue
        if math.isfinite(value):
            return value
    return math.nan
