"""The processing ledger's schema: every table and column, with a version number.

The ledger is column-oriented: one HDF5 dataset per column, so that a query touching one column
(say ``state`` of 22.5 million chip elements) reads only that column. Each table is either a
*run* table (one row per item the system decided to process, e.g. one exposure in ``chipRun``)
or an *element* table (one row per unit of work, e.g. one chip in ``chipProcessedImfile``)
linked to its run by the ``run`` column. Table names follow the IPP's processing database.

Every table carries the bookkeeping columns of :data:`COMMON_COLUMNS`; the stage-specific
columns below hold keys and the summary metadata each stage reports. Changing this file
changes :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

SCHEMA_VERSION = 1


class State(IntEnum):
    """Life cycle of a row. Elements go NEW -> RUN -> DONE; a fault sends them back to NEW."""

    NEW = 0   # waiting to be processed (or to be retried after a fault)
    RUN = 1   # element: claimed by a rank; run: open, some elements not yet done
    DONE = 2  # finished (quality may still be non-zero: bad data, completed)
    DROP = 3  # will not be processed (e.g. its input had bad quality)


class Fault(IntEnum):
    """Fault codes of the IPP: non-zero means a transient failure of the system."""

    OK = 0
    UNKNOWN = 1
    SYSTEM = 2
    CONFIG = 3
    PROGRAMMING = 4
    DATA = 5
    TIMEOUT = 6


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    doc: str
    fill: object = 0


@dataclass(frozen=True)
class Table:
    name: str
    kind: str                     # "run" or "element"
    doc: str
    columns: tuple[Column, ...]
    run_table: str | None = None  # for element tables: the run table their ``run`` column points to
    stage: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name} has no column {name!r}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype([(c.name, c.dtype) for c in self.columns])


NAN = float("nan")

COMMON_COLUMNS = (
    Column("state", "u1", "State code (see State)", int(State.NEW)),
    Column("fault", "u1", "Fault code of the last attempt (0 = ok)"),
    Column("quality", "u2", "Quality flag (0 = good data; non-zero = bad data, skipped downstream)"),
    Column("nfault", "u1", "Number of faulted attempts since the last revert"),
    Column("t_start", "f8", "Unix time the last attempt started", NAN),
    Column("t_end", "f8", "Unix time the last attempt ended", NAN),
    Column("duration", "f4", "Seconds the last attempt took", NAN),
    Column("host", "u2", "Index into /hosts of the host of the last attempt"),
    Column("rank", "i4", "MPI rank of the last attempt", -1),
    Column("message", "i8", "Index into /messages of the last fault/quality reason (-1 = none)", -1),
    Column("ra", "f8", "Right ascension of the item's centre (deg), for region ordering", NAN),
    Column("dec", "f8", "Declination of the item's centre (deg)", NAN),
)


def _element(name, stage, run_table, doc, *cols) -> Table:
    base = (Column("run", "i8", f"Row of the parent run in {run_table}", -1),)
    return Table(name, "element", doc, COMMON_COLUMNS + base + tuple(cols), run_table, stage)


def _run(name, stage, doc, *cols) -> Table:
    return Table(name, "run", doc, COMMON_COLUMNS + tuple(cols), None, stage)


def C(name: str, dtype: str, doc: str, fill: object = None) -> Column:
    if fill is None:
        fill = NAN if dtype.startswith("f") else (b"" if dtype.startswith("S") else (-1 if dtype.startswith("i") else 0))
    return Column(name, dtype, doc, fill)


EXP_KEYS = (
    C("exp_name", "S24", "Exposure identifier, e.g. o5432g0123o"),
    C("filter", "S8", "Filter (g, r, i, z, y, w)"),
    C("mjd", "f8", "MJD at the start of the exposure (days)"),
)

TABLES: dict[str, Table] = {t.name: t for t in (
    _run("campaignRun", "campaign", "One row per campaign job launched (a job history).",
         C("job_id", "S32", "Batch job identifier or host:pid"),
         C("nranks", "i4", "MPI ranks in the job"),
         C("command", "S256", "Command line")),
    _run("summitExp", "summitcopy", "Exposures found on the datastore.",
         *EXP_KEYS,
         C("camera", "S16", "Camera name"),
         C("exptime", "f4", "Exposure time (s)"),
         C("nchips", "i4", "Chips listed for the exposure"),
         C("chips_uri", "S256", "URL of the exposure's chip listing")),
    _element("summitImfile", "summitcopy", "summitExp", "Chip files to download.",
             C("exp_name", "S24", "Exposure identifier"),
             C("chip", "S8", "Chip (OTA) name, e.g. XY01"),
             C("uri", "S256", "Download URL"),
             C("bytes", "i8", "Listed size (bytes)"),
             C("md5", "S32", "Listed md5 checksum (hex)"),
             C("path", "S128", "Raw file path relative to the campaign root"),
             C("mb_s", "f4", "Download rate (MB/s)")),
    _run("rawExp", "register", "Registered raw exposures (one per exposure, ever).",
         *EXP_KEYS,
         C("summit_exp", "i8", "Row in summitExp"),
         C("camera", "S16", "Camera name"),
         C("exptime", "f4", "Exposure time (s)"),
         C("airmass", "f4", "Airmass"),
         C("posangle", "f8", "Position angle (deg)"),
         C("nchips", "i4", "Chips registered"),
         C("nchips_bad", "i4", "Chips registered with bad quality"),
         C("mean", "f4", "Mean of the chips' mean pixel values (ADU)"),
         C("stdev", "f4", "Mean of the chips' pixel standard deviations (ADU)"),
         C("sat_frac", "f4", "Mean saturated fraction")),
    _element("rawImfile", "register", "rawExp", "Registered raw chips with header and pixel metadata.",
             C("exp_name", "S24", "Exposure identifier"),
             C("chip", "S8", "Chip name"),
             C("path", "S128", "Raw file path relative to the campaign root"),
             C("filter", "S8", "Filter"),
             C("mjd", "f8", "MJD-OBS"),
             C("exptime", "f4", "Exposure time (s)"),
             C("airmass", "f4", "Airmass"),
             C("posangle", "f8", "Position angle from the header (deg)"),
             C("ncells", "i4", "Cells read"),
             C("mean", "f4", "Mean pixel value (ADU)"),
             C("stdev", "f4", "Pixel standard deviation (ADU)"),
             C("sat_frac", "f4", "Fraction of saturated pixels")),
    _run("chipRun", "chip", "One row per exposure sent through the chip stage.",
         C("exp_name", "S24", "Exposure identifier"),
         C("raw_exp", "i8", "Row in rawExp"),
         C("filter", "S8", "Filter"),
         C("nchips", "i4", "Chips to process")),
    _element("chipProcessedImfile", "chip", "chipRun", "Detrended and measured chips.",
             C("exp_name", "S24", "Exposure identifier"),
             C("chip", "S8", "Chip name"),
             C("raw_imfile", "i8", "Row in rawImfile"),
             C("bg", "f4", "Mean background (e-)"),
             C("bg_stdev", "f4", "Background noise (e-)"),
             C("fwhm_major", "f4", "PSF FWHM major axis (arcsec)"),
             C("fwhm_minor", "f4", "PSF FWHM minor axis (arcsec)"),
             C("n_sources", "i4", "Sources measured"),
             C("n_psf_stars", "i4", "Stars used for the PSF model"),
             C("masked_frac", "f4", "Fraction of masked pixels"),
             C("t_detrend", "f4", "Seconds spent detrending"),
             C("t_detect", "f4", "Seconds spent detecting"),
             C("t_psf", "f4", "Seconds spent on the PSF model"),
             C("t_measure", "f4", "Seconds spent measuring"),
             C("t_io", "f4", "Seconds spent reading and writing"),
             C("detrend", "S128", "Detrend masters used (ids)"),
             C("t_background", "f4", "Seconds spent on the background model"),
             C("sat_frac", "f4", "Fraction of the live pixels saturated"),
             C("n_cr", "i4", "Pixels masked as cosmic rays"),
             C("fringe_amp", "f4", "Fitted fringe amplitude (e-; NaN: no fringe correction)"),
             C("ap_corr", "f4", "Aperture correction of the PSF model (true / PSF flux)"),
             C("psf_chi2", "f4", "Median reduced chi-square of the PSF stars")),
    _run("camRun", "camera", "One row per exposure calibrated by the camera stage.",
         C("exp_name", "S24", "Exposure identifier"),
         C("chip_run", "i8", "Row in chipRun"),
         C("filter", "S8", "Filter")),
    _element("camProcessedExp", "camera", "camRun", "Exposure-level calibration results.",
             C("exp_name", "S24", "Exposure identifier"),
             C("n_chips", "i4", "Good chips used"),
             C("n_matched", "i4", "Reference stars matched"),
             C("astrom_rms_mas", "f4", "Astrometric residual RMS (mas)"),
             C("ra_offset_arcsec", "f4", "Pointing offset from the header, RA (arcsec)"),
             C("dec_offset_arcsec", "f4", "Pointing offset from the header, Dec (arcsec)"),
             C("zero_point", "f4", "Photometric zero point (mag for 1 e-/s)"),
             C("zero_point_err", "f4", "Zero-point uncertainty (mag)"),
             C("n_phot", "i4", "Stars used for the zero point"),
             C("dyn_masked_frac", "f4", "Fraction of pixels masked dynamically"),
             C("n_det", "i4", "Detections read from the good chips' catalogs"),
             C("n_ref", "i4", "Reference stars in the padded footprint"),
             C("pa_offset_arcsec", "f4", "Position-angle correction to the header (arcsec)"),
             C("astrom_rms_ra_mas", "f4", "Astrometric residual RMS along RA cos(Dec) (mas)"),
             C("astrom_rms_dec_mas", "f4", "Astrometric residual RMS along Dec (mas)"),
             C("zp_rms", "f4", "RMS of the zero-point residuals of the stars used (mag)"),
             C("n_ranks", "i4", "Ranks that calibrated the exposure together"),
             C("t_read", "f4", "Seconds reading chip catalogs (slowest rank)"),
             C("t_gather", "f4", "Seconds gathering the catalogs to the leader"),
             C("t_astrom", "f4", "Seconds loading reference stars, matching and fitting"),
             C("t_phot", "f4", "Seconds fitting the zero point"),
             C("t_write", "f4", "Seconds applying masks and writing products (slowest rank)")),
    _run("warpRun", "warp", "One row per calibrated exposure to warp.",
         C("exp_name", "S24", "Exposure identifier"),
         C("cam_run", "i8", "Row in camRun"),
         C("filter", "S8", "Filter"),
         C("mjd", "f8", "MJD of the exposure"),
         C("exptime", "f4", "Exposure time (s)"),
         C("n_skycells", "i4", "Skycells the exposure's chips touch")),
    _element("warpSkyfile", "warp", "warpRun", "One exposure resampled onto one skycell.",
             C("exp_name", "S24", "Exposure identifier"),
             C("skycell", "S24", "Skycell name, skycell.PPPP.SSS"),
             C("filter", "S8", "Filter"),
             C("mjd", "f8", "MJD of the exposure"),
             C("good_frac", "f4", "Fraction of good pixels"),
             C("fwhm", "f4", "PSF FWHM in the warp (arcsec)"),
             C("zero_point", "f4", "Zero point of the warp (mag)"),
             C("exptime", "f4", "Exposure time (s)"),
             C("chips", "S64", "Chips that overlap the skycell, comma-separated ('' = test all)"),
             C("n_chips", "i4", "Chips that overlap the skycell"),
             C("zpt_obs", "f4", "Exposure zero point from the camera stage (mag for 1 e-/s)"),
             C("flux_scale", "f4", "Factor from chip electrons to warp flux at the warp zero point"),
             C("cov_factor", "f4", "Large-scale to per-pixel noise variance ratio of the warp"),
             C("map_error", "f4", "Largest pixel-map interpolation error (chip pixels)"),
             C("med_var", "f4", "Median variance of the good pixels (stack weight = 1/med_var)"),
             C("chip_reads", "i4", "Chips read from disk for this unit (others came from the cache)")),
    _run("stackRun", "stack", "One row per skycell x filter x stack kind.",
         C("skycell", "S24", "Skycell name"),
         C("filter", "S8", "Filter"),
         C("kind", "S16", "nightly, deep, best_seeing, out_of_season"),
         C("label", "S32", "Night or season label")),
    _element("stackSumSkyfile", "stack", "stackRun", "Stack products.",
             C("skycell", "S24", "Skycell name"),
             C("filter", "S8", "Filter"),
             C("kind", "S16", "Stack kind"),
             C("n_inputs", "i4", "Warps combined"),
             C("n_rejected_inputs", "i4", "Warps dropped"),
             C("depth_5sigma", "f4", "5-sigma point-source depth (mag)"),
             C("good_frac", "f4", "Fraction of good pixels"),
             C("label", "S32", "Night or season label, or 'all'"),
             C("fwhm", "f4", "Weighted mean PSF FWHM of the inputs used (arcsec)"),
             C("n_ranks", "i4", "Ranks that assembled the stack"),
             C("t_read", "f4", "Seconds reading input rows (slowest rank)"),
             C("t_combine", "f4", "Seconds rejecting and combining (slowest rank)"),
             C("t_gather", "f4", "Seconds in the collectives (leader)"),
             C("t_write", "f4", "Seconds writing the products (leader)")),
    _run("staticskyRun", "staticsky", "One row per skycell (all filters at once)."
         , C("skycell", "S24", "Skycell name")),
    _element("staticskyResult", "staticsky", "staticskyRun", "Stack photometry per skycell.",
             C("skycell", "S24", "Skycell name"),
             C("n_sources", "i4", "Sources in the merged list")),
    _run("skycalRun", "skycal", "One row per skycell.", C("skycell", "S24", "Skycell name")),
    _element("skycalResult", "skycal", "skycalRun", "Recalibrated stack catalogs.",
             C("skycell", "S24", "Skycell name"),
             C("zero_point", "f4", "Zero point (mag)"),
             C("astrom_rms_mas", "f4", "Astrometric residual RMS (mas)")),
    _run("fullForceRun", "fullforce", "One row per skycell x filter.",
         C("skycell", "S24", "Skycell name"), C("filter", "S8", "Filter")),
    _element("fullForceResult", "fullforce", "fullForceRun", "Forced photometry of one warp.",
             C("skycell", "S24", "Skycell name"),
             C("filter", "S8", "Filter"),
             C("warp", "i8", "Row in warpSkyfile"),
             C("n_sources", "i4", "Sources measured")),
    _run("diffRun", "diff", "One row per difference pair.",
         C("skycell", "S24", "Skycell name"), C("filter", "S8", "Filter"),
         C("kind", "S16", "warp-warp, warp-stack or stack-stack")),
    _element("diffSkyfile", "diff", "diffRun", "Difference images and detections.",
             C("skycell", "S24", "Skycell name"),
             C("n_detections", "i4", "Transient detections")),
)}

EVENT_DTYPE = np.dtype([
    ("time", "f8"),      # unix time of the change
    ("table", "u1"),     # index into TABLE_NAMES
    ("row", "i8"),
    ("state", "u1"),
    ("fault", "u1"),
    ("quality", "u2"),
    ("rank", "i4"),
    ("host", "u2"),
    ("duration", "f4"),
    ("message", "i8"),   # index into /messages or -1
])

TABLE_NAMES: tuple[str, ...] = tuple(TABLES)
MESSAGE_DTYPE = "S240"
HOST_DTYPE = "S64"

