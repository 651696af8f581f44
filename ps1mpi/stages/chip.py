"""chip: detrend each registered OTA, stitch its cells, find and measure its sources.

The IPP's chip stage (``ppImage`` followed by ``psphot``), one unit of work per chip:

define (rank 0)
    For every ``rawExp`` DONE with quality 0 and no ``chipRun`` yet: one ``chipRun`` (state
    RUN) and one ``chipProcessedImfile`` element per chip of the exposure whose ``rawImfile``
    is DONE with quality 0 (a bad raw chip gets no element: it is dropped downstream). Each
    element is placed on the sky at its chip's centre (header boresight and position angle
    through the camera layout), so that the region-ordered queue keeps neighbouring chips
    together.
process (any rank)
    1. read the raw chip (:func:`ps1mpi.infra.rawfile.read_raw_chip`);
    2. select the detrend masters for the chip, filter and date from the index
       (``chip.detrend_dir``/index.json, :class:`DetrendIndex`): the valid entry of each kind
       with the latest start of validity; the choice goes into ``chipProcessedImfile.detrend``
       (``kind[.filter]@mjd_start`` per master) and the product headers (paths);
    3. detrend (:func:`ps1mpi.algorithms.detrend.detrend_cells`): overscan, nonlinearity,
       bias, dark, gain, flat, static mask, variance, stitching, saturation and bleed trails,
       fringes (``chip.fringe_filters``), cosmic rays;
    4. find and measure the sources (:func:`ps1mpi.algorithms.catalog.find_and_measure`):
       background model (subtracted), detection, PSF model, PSF photometry, moments, Kron,
       apertures, catalog;
    5. write the products (paths in :attr:`ChipStage.outputs`, formats in
       docs/chip-stage.md) under temporary names, renamed into place with the catalog last.
complete (rank 0)
    A ``chipRun`` is DONE when all its chips are DONE (quality 1 if none is good).

Bad data completes with ``quality != 0`` and a reason (codes :data:`QUALITY`); anything
raised is a fault (a missing master is a configuration fault, code 3).
"""

from __future__ import annotations

import json
import math
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from astropy.io.fits.verify import VerifyWarning

from ..algorithms import maskbits
from ..algorithms.background import BackgroundModel
from ..algorithms.binning import bin_image
from ..algorithms.catalog import (FLAG_BITS, FLAG_DOC, CMF_COLUMNS, MeasureOptions,
                                  SourceMeasurement, column_units, find_and_measure)
from ..algorithms.detrend import NonlinearityTable, detrend_cells
from ..algorithms.quantise import quantisation_step
from ..infra.ledger import Ledger
from ..infra.products import atomic_outputs
from ..infra.rawfile import RawChip, RawFileError, read_raw_chip
from ..infra.runtime import ConfigError, DataError, Outcome, WorkUnit
from ..infra.schema import State
from .base import Stage, StageContext

__all__ = ["ChipStage", "QUALITY", "DetrendIndex", "MasterSet", "measure_options",
           "write_catalog", "read_catalog", "write_background_model", "read_background_model",
           "write_float_image", "write_chip_products", "catalog_header_cards"]

#: chipProcessedImfile quality codes (bad data, completed; later stages skip the chip)
QUALITY = {
    "raw_unreadable": 1,   # the raw chip could not be read (damaged since registration)
    "saturated": 2,        # more than chip.max_saturated_frac of the live pixels saturated
    "masked": 3,           # fewer than chip.min_good_frac of the live pixels usable
    "no_sky": 4,           # no background model (too few usable sky pixels)
    "no_sources": 5,       # fewer than chip.sources.min_sources detections
    "psf_failed": 6,       # the PSF model could not be fitted (too few usable stars)
}

_ARCSEC_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT",
               "GCOUNT", "BZERO", "BSCALE", "END", "COMMENT", "HISTORY", "", "CHECKSUM",
               "DATASUM", "NCELLS", "EXTNAME"}


# ------------------------------------------------------------------------------ masters

class DetrendIndex:
    """The detrend masters listed in ``<detrend_dir>/index.json`` (written by the simulator,
    or by any program following docs/sim.md): entries with ``kind``, ``camera``, ``chip``,
    ``filter`` ('' when not filter-specific), ``path`` (relative to the directory),
    ``mjd_start``, ``mjd_end``.

    Parameters
    ----------
    directory : path
        The detrend directory.

    Raises
    ------
    ConfigError
        If the index is missing or malformed.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / "index.json"
        try:
            with open(path) as fh:
                data = json.load(fh)
            entries = data["detrends"]
        except FileNotFoundError:
            raise ConfigError(f"{path}: no detrend index (recipe chip.detrend_dir)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: malformed detrend index: {err}") from None
        need = ("kind", "camera", "chip", "filter", "path", "mjd_start", "mjd_end")
        for i, e in enumerate(entries):
            missing = [k for k in need if k not in e]
            if missing:
                raise ConfigError(f"{path}: entry {i} lacks {missing}")
        self.entries: list[dict] = entries

    def select(self, kind: str, *, camera: str, chip: str, filter: str, mjd: float
               ) -> dict | None:
        """The master of ``kind`` for a chip at a date: the entry valid at ``mjd`` (for flat
        and fringe: of the filter) with the latest ``mjd_start``; None if there is none."""
        best = None
        for e in self.entries:
            if e["kind"] != kind or e["camera"] != camera or e["chip"] != chip:
                continue
            if kind in ("flat", "fringe") and e["filter"] != filter:
                continue
            if not (float(e["mjd_start"]) <= mjd <= float(e["mjd_end"])):
                continue
            if best is None or float(e["mjd_start"]) >= float(best["mjd_start"]):
                best = e
        return best


@dataclass
class MasterSet:
    """The masters chosen for one chip: arrays (chip coordinates) and their index entries."""

    arrays: dict[str, Any]
    entries: dict[str, dict]

    def label(self) -> str:
        """Compact record of the choice: ``kind[.filter]@mjd_start`` per master."""
        parts = []
        for kind, e in self.entries.items():
            tag = f"{kind}.{e['filter']}" if e.get("filter") else kind
            parts.append(f"{tag}@{float(e['mjd_start']):.0f}")
        return " ".join(parts)


class _MasterCache:
    """Master files already read by this rank, least recently used dropped past a limit."""

    def __init__(self, limit_bytes: float):
        self.limit = float(limit_bytes)
        self.items: OrderedDict[Path, Any] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, dict):
            return sum(v.adu.nbytes + v.factor.nbytes for v in value.values())
        return 0

    def get(self, path: Path, loader) -> Any:
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        value = loader(path)
        self.items[path] = value
        self.nbytes += self._size(value)
        while self.nbytes > self.limit and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= self._size(old)
        return value


def _read_master_image(path: Path) -> np.ndarray:
    import fitsio

    if not path.is_file():
        raise ConfigError(f"{path}: detrend master listed in the index is missing")
    with fitsio.FITS(str(path)) as f:
        for hdu in f:
            if hdu.get_exttype() == "IMAGE_HDU" and hdu.has_data():
                return hdu.read()
    raise ConfigError(f"{path}: detrend master holds no image")


def _read_nonlin(path: Path) -> dict[str, NonlinearityTable]:
    import fitsio

    if not path.is_file():
        raise ConfigError(f"{path}: nonlinearity master listed in the index is missing")
    try:
        t = fitsio.read(str(path), ext="NONLIN")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: no NONLIN table: {err}") from None
    out = {}
    for cell, adu, fac in zip(t["CELL"], t["ADU"], t["FACTOR"]):
        name = (cell.decode() if isinstance(cell, bytes) else str(cell)).strip()
        try:
            out[name] = NonlinearityTable(np.asarray(adu, np.float64), np.asarray(fac, np.float64))
        except ValueError as err:
            raise ConfigError(f"{path}: cell {name}: {err}") from None
    return out


# ------------------------------------------------------------------------------ products

def _cards(header: Mapping[str, Any]) -> list[dict]:
    """dict (value or (value, comment)) -> fitsio card dicts."""
    out = []
    for k, v in header.items():
        value, comment = (v if isinstance(v, tuple) else (v, ""))
        if isinstance(value, (np.floating, float)) and not math.isfinite(float(value)):
            continue
        if isinstance(value, np.generic):
            value = value.item()
        text = repr(value) if isinstance(value, str) else str(value)
        room = max(0, 80 - 10 - max(20, len(text) + 2) - 3)
        out.append({"name": k, "value": value, "comment": str(comment)[:room]})
    return out


def write_float_image(path: str | Path, data: np.ndarray, header: Mapping[str, Any], *,
                      compress: bool, qlevel: float, seed_name: str) -> None:
    """Write a float image, RICE tile-compressed with subtractive dithering (exact zeros
    preserved) when ``compress``. The quantisation step is the image noise divided by
    ``qlevel``, the noise estimated once for the image
    (:func:`ps1mpi.algorithms.quantise.quantisation_step`, the quiet end of its row noises)
    rather than by cfitsio for every tile, which took over half of the write.

    The dither seed is derived from ``seed_name`` so that a redo writes identical bytes.
    """
    import fitsio

    kw: dict[str, Any] = {}
    if compress:
        data = np.ascontiguousarray(data, dtype=np.float32)
        step = quantisation_step(data, qlevel=float(qlevel))
        # cfitsio: a negative qlevel is an absolute step; None lets it estimate per tile
        kw = dict(compress="RICE", qlevel=-step if step else float(qlevel),
                  qmethod="SUBTRACTIVE_DITHER_2",
                  dither_seed=1 + zlib.crc32(seed_name.encode()) % 10000)
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(np.ascontiguousarray(data, dtype=np.float32), header=_cards(header), **kw)


def _write_mask(path: Path, mask: np.ndarray, header: Mapping[str, Any]) -> None:
    import fitsio

    cards = dict(header)
    cards["BUNIT"] = ("bits", "ps1mpi.algorithms.maskbits")
    for name, value in maskbits.NAMES.items():
        cards[f"MSKB{int(value).bit_length() - 1:02d}"] = (name, f"mask bit 0x{value:04x}")
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(np.ascontiguousarray(mask, dtype=np.uint16), header=_cards(cards),
                compress="RICE")


def write_background_model(path: str | Path, bg: BackgroundModel,
                           header: Mapping[str, Any]) -> None:
    """Write a background model: primary image = node values (float64, image units) with
    the image size and noise in the header, then tables ``X_NODES``/``Y_NODES`` (pixels) and
    the statistics-cell images ``CELL_VALUES``/``CELL_SIGMA`` (see docs/chip-stage.md)."""
    import fitsio

    ny, nx = bg.image_shape
    hdr = dict(header)
    hdr.update({"BGMODEL": ("SPLINE", "tensor-product cubic spline through the nodes"),
                "IMNAXIS1": (int(nx), "image width (pixels)"),
                "IMNAXIS2": (int(ny), "image height (pixels)"),
                "SKYSIG": (float(bg.sigma), "sky noise per pixel (image units)")})
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(np.asarray(bg.grid, np.float64), header=_cards(hdr))
        f.write(np.rec.fromarrays([np.asarray(bg.x_nodes, np.float64)], names="X"),
                extname="X_NODES")
        f.write(np.rec.fromarrays([np.asarray(bg.y_nodes, np.float64)], names="Y"),
                extname="Y_NODES")
        cv = np.asarray(bg.cell_values, np.float64)
        if cv.size:
            f.write(cv, extname="CELL_VALUES")
            f.write(np.asarray(bg.cell_sigma, np.float64), extname="CELL_SIGMA")
            f.write(np.rec.fromarrays([np.asarray(bg.cell_x, np.float64)], names="X"),
                    extname="CELL_X")
            f.write(np.rec.fromarrays([np.asarray(bg.cell_y, np.float64)], names="Y"),
                    extname="CELL_Y")


def read_background_model(path: str | Path) -> BackgroundModel:
    """Read a background model written by :func:`write_background_model`.

    Returns
    -------
    BackgroundModel
        ``evaluate()`` gives the sky that was subtracted from the chip image.
    """
    import fitsio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: background model is missing")
    with fitsio.FITS(str(path)) as f:
        grid = f[0].read()
        h = f[0].read_header()
        xn = f["X_NODES"].read()["X"]
        yn = f["Y_NODES"].read()["Y"]
        names = {hdu.get_extname() for hdu in f}
        extra = {}
        if "CELL_VALUES" in names:
            extra = dict(cell_values=f["CELL_VALUES"].read(), cell_sigma=f["CELL_SIGMA"].read(),
                         cell_x=f["CELL_X"].read()["X"], cell_y=f["CELL_Y"].read()["Y"])
    return BackgroundModel(grid=np.asarray(grid, np.float64), x_nodes=np.asarray(xn, np.float64),
                           y_nodes=np.asarray(yn, np.float64), sigma=float(h["SKYSIG"]),
                           image_shape=(int(h["IMNAXIS2"]), int(h["IMNAXIS1"])), **extra)


def catalog_header_cards(*, flux_unit: str) -> dict[str, Any]:
    """Header cards that document a catalog: flux unit and every FLAGS bit."""
    out: dict[str, Any] = {"FLUXUNIT": (flux_unit, "unit of the *_FLUX columns"),
                           "MAGDEF": ("-2.5log10(flux)", "instrumental magnitudes, no zero point")}
    for name, bit in FLAG_BITS.items():
        out[f"FLAG{int(bit).bit_length() - 1:02d}"] = (name, f"0x{bit:05x} {FLAG_DOC[name]}")
    return out


def write_catalog(path: str | Path, catalog: np.ndarray, header: Mapping[str, Any], *,
                  flux_unit: str = "e-") -> None:
    """Write a CMF catalog: primary header (metadata, FLAGS bit definitions), then the
    binary table ``SOURCES`` with ``TUNITn`` units and each ``TTYPEn`` commented with the
    column's meaning (docs/sources.md, "Catalog columns")."""
    import fitsio

    names = list(catalog.dtype.names or ())
    units = column_units(names, flux_unit=flux_unit)
    doc = {n: d for n, _, _, d in CMF_COLUMNS}
    hdr = dict(header)
    hdr.update(catalog_header_cards(flux_unit=flux_unit))
    hdr["NSOURCES"] = (int(catalog.size), "rows of the SOURCES table")
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(None, header=_cards(hdr))
        f.write(catalog, extname="SOURCES", units=units)
        hdu = f["SOURCES"]
        for i, name in enumerate(names, start=1):
            hdu.write_key(f"TTYPE{i}", name, comment=doc.get(name, "")[:47])


def read_catalog(path: str | Path) -> tuple[np.ndarray, dict]:
    """The ``SOURCES`` table of a catalog and its primary header (as a dict)."""
    import fitsio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: catalog is missing")
    with fitsio.FITS(str(path)) as f:
        hdr = f[0].read_header()
        data = f["SOURCES"].read() if f["SOURCES"].get_nrows() else \
            np.zeros(0, dtype=f["SOURCES"].get_rec_dtype()[0])
    return data, {k: hdr[k] for k in hdr.keys() if k not in ("COMMENT", "HISTORY", "")}


def measure_options(recipe_sources: Mapping[str, Any], *, pixel_scale: float | None,
                    fwhm_guess_px: float | None = None, psf_fallback: bool = False
                    ) -> MeasureOptions:
    """:class:`MeasureOptions` from the ``[chip.sources]`` recipe table.

    Parameters
    ----------
    recipe_sources : mapping
        ``recipe["chip"]["sources"]``.
    pixel_scale : float or None
        Arcsec per pixel, to convert ``fwhm_guess_arcsec``; None to use ``fwhm_guess_px``.
    fwhm_guess_px : float, optional
        FWHM guess in pixels when there is no pixel scale.
    psf_fallback : bool
        Measure with a constant PSF when the model cannot be fitted.
    """
    r = recipe_sources
    res = str(r["psf_residuals"]).lower()
    residuals = {"auto": "auto", "always": True, "never": False}.get(res)
    if residuals is None:
        raise ConfigError(f"recipe chip.sources.psf_residuals: {r['psf_residuals']!r} is not "
                          "'auto', 'always' or 'never'")
    if pixel_scale:
        fwhm = float(r["fwhm_guess_arcsec"]) / float(pixel_scale)
    else:
        fwhm = float(fwhm_guess_px or 4.5)
    return MeasureOptions(background_cell=int(r["background_cell"]), fwhm_guess=fwhm,
                          threshold=float(r["threshold"]),
                          footprint_threshold=float(r["footprint_threshold"]),
                          min_sources=int(r["min_sources"]), psf_max_stars=int(r["psf_max_stars"]),
                          psf_min_snr=float(r["psf_min_snr"]), psf_max_grid=int(r["psf_max_grid"]),
                          psf_residuals=residuals, psf_fallback=bool(psf_fallback),
                          fit_radius_fwhm=float(r["fit_radius_fwhm"]),
                          ext_threshold=float(r["ext_threshold"]),
                          max_sources=int(r["max_sources"]))


# ------------------------------------------------------------------------------ the stage

class ChipStage(Stage):
    """Detrend, stitch, find and measure every registered chip (see the module docstring)."""

    name = "chip"
    run_table = "chipRun"
    element_table = "chipProcessedImfile"
    inputs = ("rawExp", "rawImfile")
    outputs = {
        "image": "chip/{exp_name}/{exp_name}.{chip}.ch.fits",
        "variance": "chip/{exp_name}/{exp_name}.{chip}.wt.fits",
        "mask": "chip/{exp_name}/{exp_name}.{chip}.mk.fits",
        "psf": "chip/{exp_name}/{exp_name}.{chip}.psf.fits",
        "background": "chip/{exp_name}/{exp_name}.{chip}.bg.fits",
        "binned1": "chip/{exp_name}/{exp_name}.{chip}.b16.fits",
        "binned2": "chip/{exp_name}/{exp_name}.{chip}.b256.fits",
        "log": "chip/{exp_name}/{exp_name}.{chip}.log",
        "catalog": "chip/{exp_name}/{exp_name}.{chip}.cmf",
    }

    def __init__(self) -> None:
        self._cameras: dict[str, Any] = {}
        self._indexes: dict[Path, DetrendIndex] = {}
        self._cache: _MasterCache | None = None

    # ------------------------------------------------------------------ helpers
    def _camera(self, name: str):
        if name not in self._cameras:
            from ..geometry.camera import load_camera
            try:
                self._cameras[name] = load_camera(name)
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise ConfigError(f"camera {name!r} of the exposure: {err}") from None
        return self._cameras[name]

    def _detrend_dir(self, ctx: StageContext) -> Path:
        rel = Path(str(ctx.recipe.get("chip.detrend_dir")))
        return rel if rel.is_absolute() else ctx.root / rel

    def _index(self, ctx: StageContext) -> DetrendIndex:
        d = self._detrend_dir(ctx)
        if d not in self._indexes:
            self._indexes[d] = DetrendIndex(d)
        return self._indexes[d]

    def select_masters(self, ctx: StageContext, *, camera: str, chip: str, filter: str,
                       mjd: float) -> MasterSet:
        """Choose and read the masters of one chip (cached per rank).

        Raises
        ------
        ConfigError
            If a required master is not in the index or its file is missing.
        """
        rec = ctx.recipe["chip"]
        index = self._index(ctx)
        if self._cache is None:
            self._cache = _MasterCache(float(rec["master_cache_mb"]) * 1e6)
        kinds = list(rec["masters"])
        entries: dict[str, dict] = {}
        for kind in kinds:
            e = index.select(kind, camera=camera, chip=chip, filter=filter, mjd=mjd)
            if e is None:
                raise ConfigError(f"{index.directory}/index.json: no {kind} master for "
                                  f"{camera} {chip}" + (f" filter {filter}" if kind == "flat"
                                                        else "") + f" valid at MJD {mjd:.5f}")
            entries[kind] = e
        if filter in rec["fringe_filters"]:
            e = index.select("fringe", camera=camera, chip=chip, filter=filter, mjd=mjd)
            if e is None and filter in rec["fringe_required"]:
                raise ConfigError(f"{index.directory}/index.json: no fringe master for "
                                  f"{camera} {chip} filter {filter} valid at MJD {mjd:.5f} "
                                  "(recipe chip.fringe_required)")
            if e is not None:
                entries["fringe"] = e
        arrays: dict[str, Any] = {}
        for kind, e in entries.items():
            path = index.directory / e["path"]
            if kind == "nonlin":
                arrays[kind] = self._cache.get(path, _read_nonlin)
            elif kind == "mask":
                arrays[kind] = self._cache.get(
                    path, lambda p: np.ascontiguousarray(_read_master_image(p), np.uint16))
            else:
                arrays[kind] = self._cache.get(
                    path, lambda p: np.ascontiguousarray(_read_master_image(p), np.float32))
        return MasterSet(arrays, entries)

    # ------------------------------------------------------------------ define (rank 0)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Create a chipRun and its chip elements for every rawExp DONE with quality 0 that
        has no chipRun yet. Returns the number of chips added."""
        if ledger.nrows("rawExp") == 0:
            return 0
        state = ledger.column("rawExp", "state")
        quality = ledger.column("rawExp", "quality")
        ready = np.flatnonzero((state == State.DONE) & (quality == 0))
        if ledger.nrows(self.run_table):
            ready = ready[~np.isin(ready, ledger.column(self.run_table, "raw_exp"))]
        if ready.size == 0:
            return 0
        exp = ledger.read("rawExp", ready, ["exp_name", "filter", "camera", "ra", "dec",
                                            "posangle"])
        im_run = ledger.column("rawImfile", "run")
        im_good = ((ledger.column("rawImfile", "state") == State.DONE)
                   & (ledger.column("rawImfile", "quality") == 0))
        # collect first, then one append per table: each append resizes every column
        take, per_exp = [], []
        for i, rrow in enumerate(ready):
            chips = np.flatnonzero((im_run == rrow) & im_good)
            if chips.size == 0:
                continue
            names = [c.decode() for c in ledger.column("rawImfile", "chip", chips)]
            ra, dec = self._chip_centres(exp["camera"][i].decode(), names, float(exp["ra"][i]),
                                         float(exp["dec"][i]), float(exp["posangle"][i]))
            take.append(i)
            per_exp.append((chips, names, ra, dec))
        if not take:
            return 0
        take = np.array(take)
        nchips = np.array([c.size for c, *_ in per_exp])
        runs = ledger.append(self.run_table, take.size, exp_name=exp["exp_name"][take],
                             raw_exp=ready[take], filter=exp["filter"][take], nchips=nchips,
                             ra=exp["ra"][take], dec=exp["dec"][take])
        ledger.transition(self.run_table, runs, State.RUN,
                          message=[f"from rawExp row {int(r)}" for r in ready[take]])
        rows = ledger.append(self.element_table, int(nchips.sum()),
                             run=np.repeat(runs, nchips),
                             exp_name=np.repeat(exp["exp_name"][take], nchips),
                             chip=[n for _, names, _, _ in per_exp for n in names],
                             raw_imfile=np.concatenate([c for c, *_ in per_exp]),
                             ra=np.concatenate([r for _, _, r, _ in per_exp]),
                             dec=np.concatenate([d for *_, d in per_exp]))
        ledger.transition(self.element_table, rows, State.NEW, message="registered")
        return int(nchips.sum())

    def _chip_centres(self, camera: str, chips: list[str], ra: float, dec: float,
                      pa: float) -> tuple[np.ndarray, np.ndarray]:
        """Sky position of each chip's centre from the header pointing (for region order);
        the boresight for every chip if the camera or pointing is unknown."""
        n = len(chips)
        fallback = (np.full(n, ra), np.full(n, dec))
        if not (math.isfinite(ra) and math.isfinite(dec)):
            return fallback
        try:
            from ..geometry.focalplane import FocalPlaneModel
            cam = self._camera(camera)
            model = FocalPlaneModel(ra, dec, pa if math.isfinite(pa) else 0.0,
                                    cam.pixel_scale)
            out_ra, out_dec = np.empty(n), np.empty(n)
            for k, chip in enumerate(chips):
                a, d = model.pixel_to_sky(cam, chip, (cam.chip_nx - 1) / 2.0,
                                          (cam.chip_ny - 1) / 2.0)
                out_ra[k], out_dec[k] = float(a), float(d)
            return out_ra, out_dec
        except (ConfigError, KeyError, ValueError):
            return fallback

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending chips with their raw file and exposure values."""
        rows = ledger.pending(self.element_table,
                              retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        el = ledger.read(self.element_table, rows, ["exp_name", "chip", "raw_imfile", "ra",
                                                    "dec", "run"])
        im = ledger.read("rawImfile", el["raw_imfile"], ["path", "filter", "mjd", "exptime",
                                                         "run"])
        ex = ledger.read("rawExp", im["run"], ["camera", "filter", "mjd", "exptime"])
        out = []
        for i, r in enumerate(rows):
            exp, chip = el["exp_name"][i].decode(), el["chip"][i].decode()
            band = im["filter"][i].decode() or ex["filter"][i].decode()
            mjd = float(im["mjd"][i]) if math.isfinite(im["mjd"][i]) else float(ex["mjd"][i])
            out.append(WorkUnit(self.element_table, int(r), f"{exp}.{chip}", float(el["ra"][i]),
                                float(el["dec"][i]),
                                info={"exp_name": exp, "chip": chip,
                                      "path": im["path"][i].decode(), "filter": band,
                                      "mjd": mjd, "camera": ex["camera"][i].decode()}))
        return out

    # ------------------------------------------------------------------ process (any rank)
    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Detrend one chip, find and measure its sources, write its products."""
        info = unit.info
        exp, chip = info["exp_name"], info["chip"]
        keys = dict(exp_name=exp, chip=chip)
        rec = ctx.recipe["chip"]
        lines: list[str] = []
        timing = {"t_io": 0.0}

        def note(text: str) -> None:
            lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {unit.name}: {text}")

        # ---- 1. raw chip
        t0 = time.perf_counter()
        path = ctx.root / info["path"]
        if not info["path"] or not path.is_file():
            raise FileNotFoundError(f"{path}: raw chip {unit.name} is missing")
        try:
            raw = read_raw_chip(path)
        except RawFileError as err:
            return Outcome(quality=QUALITY["raw_unreadable"], message=str(err))
        camera_name = info["camera"] or str(raw.header.get("CAMERA", ""))
        cam = self._camera(camera_name)
        band = info["filter"] or str(raw.header.get("FILTER", ""))
        mjd = info["mjd"] if math.isfinite(info["mjd"]) else float(raw.header["MJD-OBS"])
        timing["t_io"] += time.perf_counter() - t0
        note(f"raw {path} ({len(raw.cells)} cells), camera {cam.name}, filter {band}, "
             f"MJD {mjd:.5f}")

        # ---- 2. masters
        t0 = time.perf_counter()
        masters = self.select_masters(ctx, camera=cam.name, chip=chip, filter=band, mjd=mjd)
        timing["t_io"] += time.perf_counter() - t0
        for kind, e in masters.entries.items():
            note(f"master {kind}: {e['path']} (valid MJD {e['mjd_start']}..{e['mjd_end']})")

        # ---- 3. detrend
        t0 = time.perf_counter()
        try:
            det = self._detrend(raw, cam, masters, rec, chip=chip)
        except _FringeFailure as err:
            note(str(err))
            self._remove_products(ctx, keys, [w for w in self.outputs if w != "log"])
            self._write_log(ctx, keys, lines)
            return Outcome(quality=QUALITY["masked"], message=str(err),
                           summary={"detrend": masters.label()[:128]})
        timing["t_detrend"] = time.perf_counter() - t0
        st = det.stats
        img, var, msk = det.image, det.variance, det.mask
        live = (msk & maskbits.GAP) == 0
        n_live = max(int(live.sum()), 1)
        sat_frac = float(st["n_sat"]) / n_live
        good_frac = float(np.count_nonzero(live & ((msk & maskbits.BAD) == 0))) / n_live
        fringe = st.get("fringe")
        summary: dict[str, Any] = {
            "detrend": masters.label()[:128], "t_detrend": timing["t_detrend"],
            "sat_frac": sat_frac, "masked_frac": 1.0 - good_frac, "n_cr": int(st["n_cr"]),
            "fringe_amp": float(fringe.amplitude) if fringe is not None else float("nan"),
        }
        note(f"detrended in {timing['t_detrend']:.2f} s ({st['engine']}): saturated "
             f"{st['n_sat']}, bleed {st['n_bleed']}, low {st['n_low']}, cosmic-ray pixels "
             f"{st['n_cr']}, usable fraction {good_frac:.4f}"
             + (f", fringe amplitude {fringe.amplitude:.2f} +- {fringe.amplitude_err:.2f} e-"
                if fringe is not None else ""))
        base_hdr = self._base_header(raw, cam, band, masters)

        # ---- 4. bad data?  sources
        problem = ""
        message = ""
        if sat_frac > float(rec["max_saturated_frac"]):
            problem = "saturated"
            message = (f"{sat_frac:.1%} of the live pixels saturated (limit "
                       f"{float(rec['max_saturated_frac']):.0%})")
        elif good_frac < float(rec["min_good_frac"]):
            problem = "masked"
            message = (f"only {good_frac:.1%} of the live pixels usable (limit "
                       f"{float(rec['min_good_frac']):.0%})")
        meas: SourceMeasurement | None = None
        if not problem:
            opts = measure_options(rec["sources"], pixel_scale=cam.pixel_scale)
            meas = find_and_measure(img, var, msk, gain=1.0, options=opts)
            for k, v in meas.timings.items():
                timing[f"t_{k}"] = v
            summary.update({"t_background": meas.timings["background"],
                            "t_detect": meas.timings["detect"], "t_psf": meas.timings["psf"],
                            "t_measure": meas.timings["measure"]})
            if meas.background is not None:
                summary["bg"] = float(np.mean(meas.background.grid))
                summary["bg_stdev"] = float(meas.background.sigma)
            summary["n_sources"] = int(meas.catalog.size)
            if meas.problem:
                problem, message = meas.problem, meas.message
            note(f"background {summary.get('bg', float('nan')):.1f} e- (noise "
                 f"{summary.get('bg_stdev', float('nan')):.2f} e-), {meas.detections.size} "
                 f"detections, FWHM estimate "
                 f"{meas.fwhm.fwhm if meas.fwhm is not None else float('nan'):.2f} px")
        if meas is not None and meas.psf is not None and not problem:
            psf = meas.psf
            shp = psf.shape_at((cam.chip_nx - 1) / 2.0, (cam.chip_ny - 1) / 2.0)
            summary.update({"n_psf_stars": int(psf.n_psf_stars),
                            "fwhm_major": float(shp.fwhm_major) * cam.pixel_scale,
                            "fwhm_minor": float(shp.fwhm_minor) * cam.pixel_scale,
                            "ap_corr": float(psf.ap_corr), "psf_chi2": float(psf.chi2_dof)})
            note(f"PSF model {psf.grid_shape[0]}x{psf.grid_shape[1]} nodes from "
                 f"{psf.n_psf_stars} stars, FWHM {summary['fwhm_major']:.3f}\" x "
                 f"{summary['fwhm_minor']:.3f}\", aperture correction {psf.ap_corr:.4f}, "
                 f"chi2/dof {psf.chi2_dof:.2f}; {meas.catalog.size} sources measured")

        # ---- 5. products
        t0 = time.perf_counter()
        quality = QUALITY[problem] if problem else 0
        if problem:
            note(f"bad data ({problem}): {message}")
        self._write_products(ctx, keys, base_hdr, img, var, msk, meas, summary, rec, lines,
                             complete=not problem)
        timing["t_io"] += time.perf_counter() - t0
        summary["t_io"] = timing["t_io"]
        return Outcome(quality=quality, message=message, summary=summary)

    # ------------------------------------------------------------------ pieces
    def _detrend(self, raw: RawChip, cam, masters: MasterSet, rec: Mapping[str, Any], *,
                 chip: str):
        cells = raw.cells
        unknown = sorted(set(cells) - set(cam.cell_names))
        if unknown:
            raise DataError(f"{raw.path}: cells {unknown} are not cells of camera {cam.name}")
        hdrs = raw.cell_headers

        def per_cell(key: str, default: float) -> dict[str, float]:
            out = {}
            for c in cells:
                v = hdrs[c].get(key)
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    v = float("nan")
                out[c] = v if math.isfinite(v) else float(default)
            return out

        shape = (cam.chip_ny, cam.chip_nx)
        a = masters.arrays
        for kind in ("bias", "dark", "flat", "fringe", "mask"):
            if kind in a and a[kind].shape != shape:
                raise ConfigError(f"{kind} master {masters.entries[kind]['path']}: shape "
                                  f"{a[kind].shape}, the {cam.name} chip is {shape}")
        nonlin = a.get("nonlin")
        if nonlin is not None:
            missing = sorted(set(cells) - set(nonlin))
            if missing:
                raise ConfigError(f"nonlinearity master {masters.entries['nonlin']['path']}: "
                                  f"no table for cells {missing}")
        dark_time = raw.header.get("DARKTIME", raw.header.get("EXPTIME", 0.0))
        try:
            dark_time = float(dark_time)
        except (TypeError, ValueError):
            dark_time = 0.0
        cosmic = {"sigclip": float(rec["cosmic_sigclip"]), "sigfrac": float(rec["cosmic_sigfrac"]),
                  "objlim": float(rec["cosmic_objlim"])}
        try:
            return detrend_cells(
                cells, datasec={c: raw.datasec(c) for c in cells},
                biassec={c: raw.biassec(c) for c in cells},
                cell_origins={c: cam.cell_origin(c) for c in cam.cell_names}, chip_shape=shape,
                gain=per_cell("GAIN", cam.gain), read_noise=per_cell("RDNOISE", cam.read_noise),
                saturation=per_cell("SATURATE", cam.saturation),
                bias=a.get("bias"), dark=a.get("dark"), dark_time=max(dark_time, 0.0),
                flat=a.get("flat"), fringe=a.get("fringe"), static_mask=a.get("mask"),
                nonlinearity=nonlin, overscan_statistic=str(rec["overscan_statistic"]),
                overscan_boxcar=int(rec["overscan_boxcar"]), flat_min=float(rec["flat_min"]),
                bleed_fraction=float(rec["bleed_fraction"]), bleed_grow=int(rec["bleed_grow"]),
                fringe_points=int(rec["fringe_points"]),
                fringe_half_box=int(rec["fringe_half_box"]), fringe_rej=float(rec["fringe_rej"]),
                fringe_iter=int(rec["fringe_iter"]), fringe_keep=float(rec["fringe_keep"]),
                fringe_seed=zlib.crc32(f"{raw.header.get('EXPNAME', '')}.{chip}".encode()),
                find_cosmics=bool(rec["find_cosmics"]), cosmic_options=cosmic)
        except ValueError as err:
            if str(err).startswith("fringe fit"):
                raise _FringeFailure(f"{err}: the chip is too masked to fit its fringes") \
                    from None
            raise

    @staticmethod
    def _base_header(raw: RawChip, cam, band: str, masters: MasterSet) -> dict[str, Any]:
        hdr: dict[str, Any] = {}
        for k, v in raw.header.items():
            if k.upper() in _STRUCTURAL or not isinstance(v, (str, int, float, bool, np.generic)):
                continue
            hdr[k.upper()] = v
        hdr["CAMERA"] = cam.name
        hdr["FILTER"] = band
        hdr["PIXSCALE"] = (cam.pixel_scale, "nominal pixel scale (arcsec/pixel)")
        for kind, e in masters.entries.items():
            key = {"bias": "DET_BIAS", "dark": "DET_DARK", "flat": "DET_FLAT",
                   "fringe": "DET_FRNG", "mask": "DET_MASK", "nonlin": "DET_NLIN"}[kind]
            hdr[key] = (str(e["path"])[:68], f"{kind} master (detrend_dir)")
        hdr["DETREND"] = (masters.label()[:68], "masters: kind[.filter]@mjd_start")
        return hdr

    def _remove_products(self, ctx: StageContext, keys: dict, whats: list[str]) -> None:
        for what in whats:
            self.product_path(ctx, what, **keys).unlink(missing_ok=True)

    def _write_log(self, ctx: StageContext, keys: dict, lines: list[str]) -> None:
        from ..infra.products import atomic_output
        with atomic_output(self.product_path(ctx, "log", **keys)) as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    def _write_products(self, ctx: StageContext, keys: dict, base_hdr: dict,
                        img: np.ndarray, var: np.ndarray, msk: np.ndarray,
                        meas: SourceMeasurement | None, summary: dict, rec: Mapping[str, Any],
                        lines: list[str], *, complete: bool) -> None:
        whats = ["image", "variance", "mask"]
        if complete:
            whats += ["psf", "background", "binned1", "binned2"]
        whats.append("log")
        if complete:
            whats.append("catalog")             # last: its presence marks a complete chip
        else:
            # a bad chip has no catalog (nor PSF, background, binned images): remove any
            # left by an earlier attempt so that the products describe this outcome
            self._remove_products(ctx, keys, ["catalog", "psf", "background", "binned1",
                                              "binned2"])
        paths = {w: self.product_path(ctx, w, **keys) for w in whats}
        with atomic_outputs(paths) as tmp:
            write_chip_products(tmp, name=f"{keys['exp_name']}.{keys['chip']}",
                                base_header=base_hdr, image=img, variance=var, mask=msk,
                                meas=meas if complete else None, summary=summary,
                                output=rec["output"], log_lines=lines)


def write_chip_products(paths: Mapping[str, Path], *, name: str, base_header: Mapping[str, Any],
                        image: np.ndarray, variance: np.ndarray, mask: np.ndarray,
                        meas: SourceMeasurement | None, summary: Mapping[str, Any],
                        output: Mapping[str, Any], log_lines: list[str]) -> None:
    """Write a chip's products to the given paths (keys of :attr:`ChipStage.outputs`; the
    caller makes them atomic). Image, variance and mask are always written; PSF model,
    background model, binned images and catalog when ``meas`` holds them; the log when
    ``"log"`` is among the paths.

    Parameters
    ----------
    paths : mapping of str to Path
        Where to write each product.
    name : str
        ``<exp>.<chip>``, seeds the compression dither (identical bytes on a redo).
    base_header : mapping
        Header cards every product carries (raw primary keywords, masters used).
    image, variance, mask : ndarray
        Detrended image (e-) with its sky, variance (e-^2), mask bits.
    meas : SourceMeasurement or None
        Sources, PSF and background; the image is written background-subtracted when its
        background model exists.
    summary : mapping
        Summary values (FWHM, PSF stars, timings) for the headers and the log.
    output : mapping
        The ``[chip.output]`` recipe table (compress, qlevel, binning).
    log_lines : list of str
        Lines of the chip's log (the timings line is appended).
    """
    compress = bool(output["compress"])
    qlevel = float(output["qlevel"])
    factors = [int(f) for f in output["binning"]]
    if len(factors) != 2:
        raise ConfigError(f"recipe chip.output.binning: need two factors, got {factors}")
    bg = meas.background if meas is not None else None
    sub = meas.sky_subtracted if (meas is not None and meas.sky_subtracted is not None) \
        else None
    pixels = sub if sub is not None else image
    hdr = dict(base_header)
    hdr["BUNIT"] = ("electron", "detrended, flat-fielded")
    hdr["GAIN"] = (1.0, "e-/unit: the image is in electrons")
    hdr["BGSUB"] = (sub is not None, "background model (.bg.fits) subtracted")
    if bg is not None:
        hdr["BGMEAN"] = (float(np.mean(bg.grid)), "mean background subtracted (e-)")
        hdr["SKYSIG"] = (float(bg.sigma), "sky noise per pixel (e-)")
    if compress:
        hdr["QLEVEL"] = (qlevel, "RICE quantisation step = image noise / QLEVEL")
    for k, card in (("fwhm_major", "FWHM_MAJ"), ("fwhm_minor", "FWHM_MIN")):
        if k in summary:
            hdr[card] = (float(summary[k]), "PSF FWHM at the chip centre (arcsec)")
    write_float_image(paths["image"], pixels, hdr, compress=compress, qlevel=qlevel,
                      seed_name=name)
    vhdr = dict(base_header)
    vhdr["BUNIT"] = ("electron2", "variance of the image")
    write_float_image(paths["variance"], variance, vhdr, compress=compress, qlevel=qlevel,
                      seed_name=name + ".wt")
    _write_mask(paths["mask"], mask, base_header)
    if meas is not None and meas.psf is not None and "psf" in paths:
        hdul = meas.psf.to_hdulist()
        for k in ("EXPNAME", "DETECTOR", "FILTER", "MJD-OBS"):
            if k in base_header:
                hdul[0].header[k] = base_header[k]
        with warnings.catch_warnings():   # long comments of the PSF cards
            warnings.simplefilter("ignore", VerifyWarning)
            hdul.writeto(paths["psf"])
        write_background_model(paths["background"], meas.background,
                               {k: base_header[k] for k in ("EXPNAME", "DETECTOR")
                                if k in base_header} | {"BUNIT": "electron"})
        for key, f in zip(("binned1", "binned2"), factors):
            b = bin_image(pixels, f, mask=mask)
            bh = {k: base_header[k] for k in ("EXPNAME", "DETECTOR", "FILTER")
                  if k in base_header}
            bh.update({"BINNING": (f, "block size (pixels)"),
                       "BUNIT": ("electron", "mean per pixel of unmasked pixels"),
                       "BGSUB": bool(sub is not None)})
            write_float_image(paths[key], b, bh, compress=False, qlevel=0.0, seed_name=name)
    if "log" in paths:
        log_lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name}: timings (s) "
                         + ", ".join(f"{k[2:]} {v:.2f}" for k, v in summary.items()
                                     if k.startswith("t_")))
        Path(paths["log"]).write_text("\n".join(log_lines) + "\n")
    if meas is not None and meas.psf is not None and "catalog" in paths:
        chdr = dict(base_header)
        chdr.update({k: v for k, v in (
            ("FWHM_MAJ", summary.get("fwhm_major")), ("FWHM_MIN", summary.get("fwhm_minor")),
            ("NPSFSTAR", summary.get("n_psf_stars")), ("APCORR", summary.get("ap_corr")),
            ("BGMEAN", summary.get("bg")), ("SKYSIG", summary.get("bg_stdev"))) if v is not None})
        write_catalog(paths["catalog"], meas.catalog, chdr, flux_unit="e-")


class _FringeFailure(RuntimeError):
    """The fringe amplitude could not be fitted (too few usable sample points)."""
