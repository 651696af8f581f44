"""Registration metadata: header keywords and quick pixel statistics of raw chips, and the
merge of chip-level metadata into exposure-level metadata.

Registration (the IPP's ``register`` stage, rawExp/rawImfile tables) describes every raw
chip with values taken from its primary header (RA, DEC, FILTER, MJD-OBS, ...) and from a
quick look at its pixels (mean, standard deviation, saturated fraction), then describes the
exposure: values that every chip repeats (exposure name, filter, time, pointing) must agree
and are copied; values derived from the chips (the mean of the chip means, ...) are computed.

Pure functions: mappings and numpy arrays in, dataclasses and dicts out; no files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "RawMetadataError", "MetadataConflict", "Conflict", "ChipPixelStats", "ExposureMetadata",
    "parse_angle", "header_metadata", "chip_pixel_stats", "merge_exposure_metadata",
    "REQUIRED_KEYWORDS", "SHARED_KEYS", "DEFAULT_TOLERANCES",
]


class RawMetadataError(ValueError):
    """A raw chip's header or pixels cannot be described: the message names the source and
    every problem found. Registration turns it into a non-zero quality, not a fault."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class Conflict:
    """A value that should be the same in every chip of an exposure but is not."""

    key: str
    values: dict[str, Any]  # chip name -> value

    def __str__(self) -> str:
        shown = ", ".join(f"{chip}={_show(value)}" for chip, value in list(self.values.items())[:6])
        more = f" (+{len(self.values) - 6} more)" if len(self.values) > 6 else ""
        return f"{self.key} differs between chips: {shown}{more}"


def _show(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v) and float(np.float32(v)) == v:
            return str(np.float32(v))  # a single-precision value: its shortest form
        return repr(v)
    return repr(value)


class MetadataConflict(ValueError):
    """Chips of one exposure disagree on values that must be shared."""

    def __init__(self, exposure: str, conflicts: Sequence[Conflict]):
        self.exposure = exposure
        self.conflicts = list(conflicts)
        super().__init__(f"exposure {exposure}: " + "; ".join(str(c) for c in self.conflicts))


# ------------------------------------------------------------------------------ headers

# Primary-header keywords registration needs; FILTER may be derived from FILTERID (and vice
# versa), DETECTOR may be given as CHIP.
REQUIRED_KEYWORDS = ("EXPNAME", "RA", "DEC", "POSANGLE", "FILTER", "MJD-OBS", "EXPTIME",
                     "AIRMASS", "DETECTOR")

_SEXAGESIMAL = re.compile(r"^\s*([+-]?)\s*(\d{1,3})[:\s]+(\d{1,2})[:\s]+(\d{1,2}(?:\.\d*)?)\s*$")


def parse_angle(value: Any, *, hours: bool = False, what: str = "angle") -> float:
    """An angle from a header value -> degrees.

    Parameters
    ----------
    value : float, int or str
        Decimal degrees (number or text), or sexagesimal text ``"HH:MM:SS.s"`` /
        ``"+DD:MM:SS.s"`` (colons or spaces).
    hours : bool
        Sexagesimal text is in hours (right ascension): multiplied by 15. Decimal values are
        always degrees.
    what : str
        Name of the value, for the error message.

    Returns
    -------
    float
        The angle (deg).
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what}: {value!r} is not an angle")
    if isinstance(value, (int, float, np.integer, np.floating)):
        out = float(value)
    else:
        text = str(value).strip()
        m = _SEXAGESIMAL.match(text)
        if m:
            sign = -1.0 if m.group(1) == "-" else 1.0
            a, b, c = float(m.group(2)), float(m.group(3)), float(m.group(4))
            if b >= 60 or c >= 60:
                raise ValueError(f"{what}: {text!r} has minutes or seconds >= 60")
            out = sign * (a + b / 60.0 + c / 3600.0) * (15.0 if hours else 1.0)
        else:
            try:
                out = float(text)
            except ValueError:
                raise ValueError(f"{what}: {text!r} is neither decimal degrees nor "
                                 "sexagesimal") from None
    if not math.isfinite(out):
        raise ValueError(f"{what}: {value!r} is not finite")
    return out


def _number(header: Mapping[str, Any], key: str, problems: list[str]) -> float:
    value = header.get(key)
    if isinstance(value, bool):
        problems.append(f"{key} = {value!r} is not a number")
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        problems.append(f"{key} = {value!r} is not a number")
        return math.nan
    if not math.isfinite(out):
        problems.append(f"{key} = {value!r} is not finite")
    return out


def header_metadata(header: Mapping[str, Any], *, source: str = "header") -> dict[str, Any]:
    """Registration metadata from a raw chip's primary header.

    Parameters
    ----------
    header : mapping
        Primary header keywords (an ``astropy.io.fits.Header`` or a dict).
    source : str
        Name of the file, for error messages.

    Returns
    -------
    dict
        ``exp_name``, ``chip``, ``filter`` (e.g. ``r``), ``filter_id`` (e.g. ``r.00000``),
        ``ra``, ``dec``, ``posangle`` (deg), ``mjd`` (MJD-OBS, days), ``exptime`` (s),
        ``airmass``, ``camera`` and ``telescope`` (empty when absent).

    Raises
    ------
    RawMetadataError
        Listing every missing or invalid keyword (RA outside [0, 360), DEC outside
        [-90, 90], negative EXPTIME, AIRMASS below 1, non-numeric values...).
    """
    problems: list[str] = []
    keys = set(header.keys())

    def text(key: str) -> str:
        value = header.get(key)
        return "" if value is None else str(value).strip()

    filter_id = text("FILTERID")
    filt = text("FILTER") or (filter_id.split(".")[0] if filter_id else "")
    filter_id = filter_id or filt
    chip = text("DETECTOR") or text("CHIP")
    missing = [k for k in ("EXPNAME", "RA", "DEC", "POSANGLE", "MJD-OBS", "EXPTIME", "AIRMASS")
               if k not in keys or header.get(k) is None or text(k) == ""]
    if not filt:
        missing.append("FILTER (or FILTERID)")
    if not chip:
        missing.append("DETECTOR (or CHIP)")
    if missing:
        problems.append(f"missing keywords {', '.join(missing)}")
    out: dict[str, Any] = {"exp_name": text("EXPNAME"), "chip": chip, "filter": filt,
                           "filter_id": filter_id, "camera": text("CAMERA"),
                           "telescope": text("TELESCOP")}
    for key, name, hours, lo, hi in (("RA", "ra", True, 0.0, 360.0), ("DEC", "dec", False, -90.0, 90.0)):
        out[name] = math.nan
        if key in keys and header.get(key) is not None and text(key):
            try:
                value = parse_angle(header[key], hours=hours, what=key)
            except ValueError as err:
                problems.append(str(err))
                continue
            if name == "ra":
                value = value % 360.0
            if not lo <= value <= hi:
                problems.append(f"{key} = {header[key]!r} is outside [{lo:g}, {hi:g}] deg")
            out[name] = value
    for key, name in (("POSANGLE", "posangle"), ("MJD-OBS", "mjd"), ("EXPTIME", "exptime"),
                      ("AIRMASS", "airmass")):
        out[name] = math.nan
        if key in keys and header.get(key) is not None and text(key):
            out[name] = _number(header, key, problems)
    if out["exptime"] < 0:
        problems.append(f"EXPTIME = {out['exptime']!r} is negative")
    if out["airmass"] < 0.999:
        problems.append(f"AIRMASS = {out['airmass']!r} is below 1")
    if problems:
        raise RawMetadataError(source, problems)
    return out


# ------------------------------------------------------------------------------ pixels


@dataclass(frozen=True)
class ChipPixelStats:
    """Quick pixel statistics of one raw chip (over the data sections of its cells)."""

    ncells: int
    npix: int                   # finite data pixels used
    ntotal: int                 # data pixels in all cells
    mean: float                 # mean of the finite data pixels (ADU)
    stdev: float                # their standard deviation (ADU, ddof 0)
    sat_frac: float             # fraction of finite data pixels at or above saturation
    nan_frac: float             # fraction of data pixels that are NaN or infinite
    all_nan: bool               # no finite data pixel at all
    nan_cells: tuple[str, ...]  # cells without any finite data pixel

    def as_summary(self) -> dict[str, float | int]:
        """The values registration records (rawImfile columns)."""
        return {"ncells": self.ncells, "mean": self.mean, "stdev": self.stdev,
                "sat_frac": self.sat_frac}


def _per_cell(value, names: Sequence[str], what: str):
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no entry for cells {missing}")
        return [value[n] for n in names]
    return [value] * len(names)


def chip_pixel_stats(cells: Mapping[str, np.ndarray] | Sequence[np.ndarray], *,
                     saturation: float | Mapping[str, float] | None = None,
                     datasec: tuple[int, int, int, int] | Mapping[str, tuple[int, int, int, int]]
                     | None = None) -> ChipPixelStats:
    """Mean, standard deviation, saturated fraction and NaN content of a raw chip.

    The statistics are exact over all data pixels (cell means and sums of squared deviations
    are combined with the pairwise formula of Chan et al., so no precision is lost on
    large chips). Non-finite pixels are excluded and counted.

    Parameters
    ----------
    cells : mapping of cell name -> 2-D array, or sequence of 2-D arrays
        Raw cell pixels (ADU), any numeric dtype, indexed ``[y, x]``.
    saturation : float or mapping cell -> float, optional
        Saturation level (ADU, e.g. the cell's SATURATE keyword); pixels ``>=`` it count as
        saturated. None: no pixel is counted saturated.
    datasec : (y0, y1, x0, x1) or mapping cell -> (y0, y1, x0, x1), optional
        0-based half-open data section of each cell; None: the whole cell (no overscan).

    Returns
    -------
    ChipPixelStats

    Raises
    ------
    ValueError
        No cells, a cell that is not 2-D, a data section outside its cell, or a mapping
        without an entry for some cell.
    """
    if isinstance(cells, Mapping):
        names = list(cells.keys())
        arrays = [cells[n] for n in names]
    else:
        arrays = list(cells)
        names = [f"cell{i}" for i in range(len(arrays))]
    if not arrays:
        raise ValueError("chip_pixel_stats: no cells given")
    sats = _per_cell(saturation, names, "saturation")
    secs = _per_cell(datasec, names, "datasec")
    n = np.zeros(len(arrays), np.int64)
    total = np.zeros(len(arrays), np.int64)
    nsat = np.zeros(len(arrays), np.int64)
    means = np.zeros(len(arrays), np.float64)
    m2 = np.zeros(len(arrays), np.float64)
    for i, (name, arr, sat, sec) in enumerate(zip(names, arrays, sats, secs)):
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"cell {name}: expected a 2-D array, got shape {arr.shape}")
        if sec is not None:
            y0, y1, x0, x1 = (int(v) for v in sec)
            if not (0 <= y0 < y1 <= arr.shape[0] and 0 <= x0 < x1 <= arr.shape[1]):
                raise ValueError(f"cell {name}: data section {sec} outside the cell of shape "
                                 f"{arr.shape}")
            arr = arr[y0:y1, x0:x1]
        total[i] = arr.size
        if arr.dtype.kind == "f":
            finite = np.isfinite(arr)
            good = arr if finite.all() else arr[finite]
        else:
            good = arr
        n[i] = good.size
        if good.size:
            if sat is not None:
                nsat[i] = np.count_nonzero(good >= float(sat))
            d = good.astype(np.float64)  # a contiguous copy: exact two-pass statistics
            means[i] = d.mean()
            d -= means[i]
            m2[i] = np.einsum("ij,ij->", d, d) if d.ndim == 2 else np.dot(d, d)
    ntot = int(n.sum())
    nan_cells = tuple(name for name, k in zip(names, n) if k == 0)
    if ntot == 0:
        mean = stdev = sat_frac = math.nan
    else:
        mean = float(np.dot(n, means) / ntot)
        # Chan et al. (1979): M2 = sum M2_i + sum n_i (mean_i - mean)^2
        m2_all = float(m2.sum() + np.dot(n, (means - mean) ** 2))
        stdev = math.sqrt(max(m2_all, 0.0) / ntot)
        sat_frac = float(nsat.sum() / ntot)
    grand = int(total.sum())
    return ChipPixelStats(ncells=len(arrays), npix=ntot, ntotal=grand, mean=mean, stdev=stdev,
                          sat_frac=sat_frac, nan_frac=float((grand - ntot) / grand) if grand else 1.0,
                          all_nan=ntot == 0, nan_cells=nan_cells)


# ------------------------------------------------------------------------------ exposures

# keys every chip of an exposure repeats, and the tolerance within which they must agree
SHARED_KEYS = ("exp_name", "filter", "filter_id", "camera", "telescope", "mjd", "exptime",
               "airmass", "ra", "dec", "posangle")
DEFAULT_TOLERANCES = {
    "mjd": 1.0 / 86400.0,   # days (1 s)
    "exptime": 1e-3,        # s
    "airmass": 1e-3,
    "ra": 1.0 / 3600.0,     # deg (1 arcsec, measured on the sky)
    "dec": 1.0 / 3600.0,    # deg
    "posangle": 1e-3,       # deg
}


@dataclass
class ExposureMetadata:
    """An exposure described from its chips (shared values copied, derived values computed)."""

    values: dict[str, Any]          # shared keys (exp_name, filter, mjd, ra, ...)
    nchips: int                     # chips registered
    nchips_bad: int                 # chips registered with bad quality
    mean: float                     # mean of the good chips' mean pixel values (ADU)
    stdev: float                    # mean of the good chips' standard deviations (ADU)
    sat_frac: float                 # mean of the good chips' saturated fractions
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.conflicts

    def as_record(self) -> dict[str, Any]:
        """Shared and derived values in one dict (rawExp columns and more)."""
        out = dict(self.values)
        out.update(nchips=self.nchips, nchips_bad=self.nchips_bad, mean=self.mean,
                   stdev=self.stdev, sat_frac=self.sat_frac)
        return out


def _differs(key: str, a: Any, b: Any, tol: float | None, dec: float) -> bool:
    if tol is None:
        return a != b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) != math.isnan(b)
    d = abs(a - b)
    if key in ("ra", "posangle"):
        d = min(d % 360.0, 360.0 - d % 360.0)
        if key == "ra" and math.isfinite(dec):
            d *= math.cos(math.radians(dec))
    return d > tol


def merge_exposure_metadata(chips: Sequence[Mapping[str, Any]], *,
                            shared: Sequence[str] = SHARED_KEYS,
                            tolerances: Mapping[str, float] | None = None,
                            strict: bool = False) -> ExposureMetadata:
    """Merge chip-level registration metadata into exposure-level metadata.

    Shared values must agree between every chip that carries them (text exactly; numbers
    within ``tolerances``, RA measured on the sky); the value of the first chip in
    ``chips`` that has it is kept. Derived values are means over the chips with good quality:
    the mean of the chip means, the mean of the chip standard deviations and the mean
    saturated fraction (NaN when no chip is good).

    Parameters
    ----------
    chips : sequence of mappings
        One per chip: the keys of :func:`header_metadata` (those available) plus ``mean``,
        ``stdev``, ``sat_frac`` and ``quality`` (0 good; default 0). ``chip`` names the chip
        in conflict reports.
    shared : sequence of str
        Keys whose values must agree.
    tolerances : mapping key -> float, optional
        Largest allowed difference of numeric shared values (units of the key: days, s, deg);
        defaults to :data:`DEFAULT_TOLERANCES`; keys without a tolerance compare exactly.
    strict : bool
        Raise :class:`MetadataConflict` instead of reporting conflicts in the result.

    Returns
    -------
    ExposureMetadata
        With ``conflicts`` listing every shared key that differs.
    """
    if not chips:
        raise ValueError("merge_exposure_metadata: no chips given")
    tol = dict(DEFAULT_TOLERANCES if tolerances is None else tolerances)
    names = [str(c.get("chip") or f"#{i}") for i, c in enumerate(chips)]
    values: dict[str, Any] = {}
    conflicts: list[Conflict] = []
    dec_ref = next((float(c["dec"]) for c in chips if _present(c.get("dec"))), math.nan)
    for key in shared:
        have = [(name, c[key]) for name, c in zip(names, chips) if _present(c.get(key))]
        if not have:
            continue
        ref = have[0][1]
        if any(_differs(key, ref, v, tol.get(key), dec_ref) for _, v in have[1:]):
            conflicts.append(Conflict(key, dict(have)))
        values[key] = ref
    quality = np.array([int(c.get("quality", 0) or 0) for c in chips])
    good = [c for c, q in zip(chips, quality) if q == 0]

    def mean_of(key: str) -> float:
        vals = np.array([float(c.get(key, math.nan)) for c in good], np.float64)
        vals = vals[np.isfinite(vals)]
        return float(vals.mean()) if vals.size else math.nan

    result = ExposureMetadata(values=values, nchips=len(chips),
                              nchips_bad=int(np.count_nonzero(quality)),
                              mean=mean_of("mean"), stdev=mean_of("stdev"),
                              sat_frac=mean_of("sat_frac"), conflicts=conflicts)
    if strict and conflicts:
        raise MetadataConflict(str(values.get("exp_name", "?")), conflicts)
    return result


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value != ""
    if isinstance(value, (float, np.floating)):
        return not math.isnan(float(value))
    return True
