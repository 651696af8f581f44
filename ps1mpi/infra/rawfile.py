"""Raw chip (OTA) FITS files: writer, reader and validation.

One FITS file holds one OTA of one exposure: a primary HDU without data carrying the exposure's
keywords, then one image extension per readout cell (``EXTNAME`` ``xy00`` .. ``xy77``), each a
raw cell with its data section and its overscan (bias) section. The format is specified in
``docs/raw-format.md``; this module is its reference implementation.

Pixel sections are given in Python as 0-based half-open ``(y0, y1, x0, x1)`` tuples and written
in the FITS headers in the IRAF 1-based inclusive notation ``[x1:x2,y1:y2]``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ps1mpi.infra.products import atomic_output

__all__ = [
    "RawChip", "RawFileError", "REQUIRED_PRIMARY", "REQUIRED_CELL", "OBSTYPES",
    "write_raw_chip", "read_raw_chip", "validate_raw_chip",
    "format_section", "parse_section", "exposure_name", "parse_exposure_name",
]

#: Primary-header keywords every raw chip file carries (name -> (python type, description)).
REQUIRED_PRIMARY: dict[str, tuple[type, str]] = {
    "EXPNAME": (str, "exposure identifier, e.g. o5432g0123o"),
    "TELESCOP": (str, "telescope name"),
    "CAMERA": (str, "camera name (gpc1, testcam)"),
    "DETECTOR": (str, "chip (OTA) name, e.g. XY01"),
    "OBSTYPE": (str, "OBJECT BIAS DARK FLAT SKYFLAT FRINGE"),
    "FILTERID": (str, "filter identifier, e.g. r.00000"),
    "FILTER": (str, "band g r i z y w (NONE: bias, dark)"),
    "RA": (float, "commanded boresight RA (deg, ICRS)"),
    "DEC": (float, "commanded boresight Dec (deg, ICRS)"),
    "POSANGLE": (float, "PA of focal-plane +Y, N through E (deg)"),
    "MJD-OBS": (float, "MJD (UTC) at exposure start (d)"),
    "EXPTIME": (float, "exposure time (s)"),
    "AIRMASS": (float, "airmass at exposure start"),
    "NCELLS": (int, "number of cell extensions"),
}

#: Keywords every cell extension carries.
REQUIRED_CELL: dict[str, tuple[type, str]] = {
    "EXTNAME": (str, "cell xyIJ (I column, J row)"),
    "DATASEC": (str, "data section, 1-based inclusive"),
    "BIASSEC": (str, "overscan section, 1-based inclusive"),
    "GAIN": (float, "gain (e-/ADU)"),
    "RDNOISE": (float, "read noise (ADU)"),
    "SATURATE": (float, "saturation level (raw ADU, bias incl.)"),
    "MAXLIN": (float, "top of calibrated linear range (raw ADU)"),
}

OBSTYPES = ("OBJECT", "BIAS", "DARK", "FLAT", "SKYFLAT", "FRINGE")

_SECTION_RE = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")
_EXPNAME_RE = re.compile(r"^([a-z])(\d{4})([a-z])(\d{4})([a-z])$")
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT",
               "GCOUNT", "BZERO", "BSCALE", "END", "COMMENT", "HISTORY", "", "CHECKSUM", "DATASUM"}
_BLOCK = 2880


class RawFileError(ValueError):
    """A raw chip file is unreadable or malformed; the message names the file."""


@dataclass
class RawChip:
    """One raw OTA file in memory.

    Attributes
    ----------
    path : str
        File it was read from.
    header : dict
        Primary-header keywords (structural FITS keywords removed).
    cells : dict[str, ndarray]
        Raw cell arrays ``(ny, nx)`` in ADU (float32), keyed by lower-case cell name, file order.
    cell_headers : dict[str, dict]
        Each cell's header keywords (structural FITS keywords removed).
    """

    path: str
    header: dict[str, Any]
    cells: dict[str, np.ndarray]
    cell_headers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def datasec(self, cell: str) -> tuple[int, int, int, int]:
        """Data section of ``cell`` as 0-based half-open ``(y0, y1, x0, x1)``."""
        return parse_section(self.cell_headers[cell]["DATASEC"], what=f"{self.path}[{cell}] DATASEC")

    def biassec(self, cell: str) -> tuple[int, int, int, int]:
        """Overscan section of ``cell`` as 0-based half-open ``(y0, y1, x0, x1)``."""
        return parse_section(self.cell_headers[cell]["BIASSEC"], what=f"{self.path}[{cell}] BIASSEC")

    @property
    def chip(self) -> str:
        """Chip (OTA) name from DETECTOR."""
        return str(self.header["DETECTOR"])


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def format_section(sec: tuple[int, int, int, int]) -> str:
    """``(y0, y1, x0, x1)`` 0-based half-open -> ``'[x0+1:x1,y0+1:y1]'`` (FITS, 1-based)."""
    y0, y1, x0, x1 = (int(v) for v in sec)
    if not (0 <= y0 < y1 and 0 <= x0 < x1):
        raise ValueError(f"section {sec!r} is empty or negative (want 0 <= y0 < y1, 0 <= x0 < x1)")
    return f"[{x0 + 1}:{x1},{y0 + 1}:{y1}]"


def parse_section(text: str, *, what: str = "section") -> tuple[int, int, int, int]:
    """``'[x1:x2,y1:y2]'`` (FITS, 1-based inclusive) -> ``(y0, y1, x0, x1)`` 0-based half-open."""
    m = _SECTION_RE.match(str(text).strip())
    if not m:
        raise RawFileError(f"{what}: {text!r} is not a section of the form [x1:x2,y1:y2]")
    x1, x2, y1, y2 = (int(g) for g in m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise RawFileError(f"{what}: {text!r} is not an increasing 1-based section")
    return y1 - 1, y2, x1 - 1, x2


def exposure_name(night_mjd: int, seq: int, *, camera_code: str = "g", obstype: str = "OBJECT") -> str:
    """IPP-style exposure identifier, e.g. ``o5432g0123o``.

    Parameters
    ----------
    night_mjd : int
        Integer MJD of the night; its last four digits are used (``MJD - 50000``).
    seq : int
        Sequence number of the exposure within the night (0..9999).
    camera_code : str
        One letter for the camera (``g`` GPC1, ``t`` test camera).
    obstype : str
        Observation type; the trailing letter is ``o`` object, ``b`` bias, ``d`` dark,
        ``f`` flat, ``s`` sky flat, ``r`` fringe frame.
    """
    code = {"OBJECT": "o", "BIAS": "b", "DARK": "d", "FLAT": "f", "SKYFLAT": "s", "FRINGE": "r"}
    if obstype not in code:
        raise ValueError(f"obstype {obstype!r} is not one of {OBSTYPES}")
    if not 0 <= seq <= 9999:
        raise ValueError(f"sequence number {seq} outside 0..9999")
    if len(camera_code) != 1 or not camera_code.isalpha():
        raise ValueError(f"camera_code {camera_code!r} must be one letter")
    return f"o{int(night_mjd) % 10000:04d}{camera_code.lower()}{seq:04d}{code[obstype]}"


def parse_exposure_name(name: str) -> dict[str, Any]:
    """Split an exposure identifier into ``night`` (last 4 MJD digits), ``camera_code``, ``seq``,
    ``type_code``; raises ``ValueError`` naming the string if it is malformed."""
    m = _EXPNAME_RE.match(str(name))
    if not m:
        raise ValueError(f"exposure name {name!r} is not of the form o5432g0123o")
    return {"night": int(m.group(2)), "camera_code": m.group(3), "seq": int(m.group(4)),
            "type_code": m.group(5)}


def _per_cell(value, cells: Iterable[str], what: str) -> dict[str, float]:
    cells = list(cells)
    if isinstance(value, Mapping):
        missing = [c for c in cells if c not in value]
        if missing:
            raise ValueError(f"{what}: no value for cells {missing}")
        return {c: float(value[c]) for c in cells}
    return {c: float(value) for c in cells}


def _clean_header(hdr: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in hdr:
        k = str(key).upper()
        if k in _STRUCTURAL or k.startswith("ZNAXIS") or k.startswith("ZTILE") or k.startswith("TTYPE") \
                or k.startswith("TFORM") or k.startswith("NAXIS") or k in ("ZIMAGE", "ZBITPIX", "ZCMPTYPE",
                                                                              "ZNAME1", "ZVAL1", "ZNAME2", "ZVAL2",
                                                                              "ZSIMPLE", "ZEXTEND", "ZQUANTIZ",
                                                                              "ZDITHER0", "TFIELDS", "ZPCOUNT",
                                                                              "ZGCOUNT", "ZHECKSUM", "ZDATASUM",
                                                                              "TZERO1", "TSCAL1", "ZTENSION"):
            continue
        out[k] = hdr[key]
    return out


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------

def write_raw_chip(path: str | os.PathLike, cells: Mapping[str, np.ndarray], *,
                   header: Mapping[str, Any], datasec: tuple[int, int, int, int],
                   biassec: tuple[int, int, int, int], gain: float | Mapping[str, float],
                   read_noise: float | Mapping[str, float], saturation: float | Mapping[str, float],
                   maxlin: float | Mapping[str, float] | None = None,
                   cell_headers: Mapping[str, Mapping[str, Any]] | None = None,
                   dtype: str = "uint16", compress: bool = False) -> Path:
    """Write one raw OTA file atomically (temporary name, renamed into place).

    Parameters
    ----------
    path : path-like
        Destination, conventionally ``<EXPNAME>.<CHIP>.fits``.
    cells : mapping cell name -> ndarray
        Raw cells ``(ny, nx)`` in ADU including the overscan, written in the given order.
    header : mapping
        Primary keywords; every key of :data:`REQUIRED_PRIMARY` except ``NCELLS`` (set here)
        must be present. Values may be ``(value, comment)`` pairs.
    datasec, biassec : tuple
        Data and overscan sections, 0-based half-open ``(y0, y1, x0, x1)``, same for all cells.
    gain : float or mapping
        Gain (e-/ADU), one value or one per cell.
    read_noise : float or mapping
        Read noise (ADU).
    saturation : float or mapping
        Saturation level (raw ADU, bias included) -> ``SATURATE``.
    maxlin : float or mapping, optional
        Top of the calibrated linear range (raw ADU) -> ``MAXLIN``; defaults to ``saturation``.
    cell_headers : mapping cell -> mapping, optional
        Extra keywords per cell.
    dtype : {"uint16", "float32"}
        Pixel type on disk. ``uint16`` (BITPIX 16, BZERO 32768, like the camera) rounds and clips
        to 0..65535; ``float32`` keeps values as given (BITPIX -32).
    compress : bool
        Tile-compress the cells (RICE_1 for uint16, lossless GZIP_2 for float32).

    Returns
    -------
    Path
        The path written.
    """
    import fitsio

    path = Path(path)
    if dtype not in ("uint16", "float32"):
        raise ValueError(f"{path}: dtype {dtype!r} must be 'uint16' or 'float32'")
    if not cells:
        raise ValueError(f"{path}: no cells to write")
    missing = [k for k in REQUIRED_PRIMARY if k != "NCELLS" and k not in header]
    if missing:
        raise ValueError(f"{path}: primary header lacks required keywords {missing}")
    names = list(cells)
    y0, y1, x0, x1 = datasec
    by0, by1, bx0, bx1 = biassec
    gains = _per_cell(gain, names, f"{path}: gain")
    rdn = _per_cell(read_noise, names, f"{path}: read_noise")
    sat = _per_cell(saturation, names, f"{path}: saturation")
    mxl = _per_cell(saturation if maxlin is None else maxlin, names, f"{path}: maxlin")
    for name, arr in cells.items():
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(f"{path}: cell {name} is {arr.ndim}-D, expected 2-D (ny, nx)")
        ny, nx = arr.shape
        if y1 > ny or x1 > nx or by1 > ny or bx1 > nx:
            raise ValueError(f"{path}: cell {name} of shape {arr.shape} is smaller than DATASEC "
                             f"{format_section(datasec)} / BIASSEC {format_section(biassec)}")
    prim = []
    for key, value in header.items():
        comment = REQUIRED_PRIMARY.get(str(key).upper(), (None, ""))[1]
        if isinstance(value, tuple):
            value, comment = value
        if isinstance(value, (np.floating,)):
            value = float(value)
        elif isinstance(value, (np.integer,)):
            value = int(value)
        prim.append({"name": str(key).upper(), "value": value, "comment": comment})
    prim.append({"name": "NCELLS", "value": len(names), "comment": REQUIRED_PRIMARY["NCELLS"][1]})

    with atomic_output(path) as tmp:
        with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
            f.write(None, header=prim)
            for name in names:
                arr = np.asarray(cells[name])
                if dtype == "uint16":
                    data = np.clip(np.rint(arr), 0, 65535).astype(np.uint16)
                else:
                    data = arr.astype(np.float32, copy=False)
                hdr = [
                    {"name": "DATASEC", "value": format_section(datasec), "comment": REQUIRED_CELL["DATASEC"][1]},
                    {"name": "BIASSEC", "value": format_section(biassec), "comment": REQUIRED_CELL["BIASSEC"][1]},
                    {"name": "GAIN", "value": gains[name], "comment": REQUIRED_CELL["GAIN"][1]},
                    {"name": "RDNOISE", "value": rdn[name], "comment": REQUIRED_CELL["RDNOISE"][1]},
                    {"name": "SATURATE", "value": sat[name], "comment": REQUIRED_CELL["SATURATE"][1]},
                    {"name": "MAXLIN", "value": mxl[name], "comment": REQUIRED_CELL["MAXLIN"][1]},
                ]
                for key, value in (cell_headers or {}).get(name, {}).items():
                    comment = ""
                    if isinstance(value, tuple):
                        value, comment = value
                    if isinstance(value, np.generic):
                        value = value.item()
                    hdr.append({"name": str(key).upper(), "value": value, "comment": comment})
                kw = {}
                if compress:
                    kw["compress"] = "RICE" if dtype == "uint16" else "GZIP_2"
                    if dtype == "float32":
                        kw["qlevel"] = None
                f.write(data, extname=name, header=hdr, **kw)
    return path


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------

def read_raw_chip(path: str | os.PathLike, *, cells: Iterable[str] | None = None) -> RawChip:
    """Read one raw OTA file.

    Parameters
    ----------
    path : path-like
        The raw chip file (plain or tile-compressed cells).
    cells : iterable of str, optional
        Read only these cells (default: all).

    Returns
    -------
    RawChip
        Header, cells as float32 ADU arrays, cell headers.

    Raises
    ------
    RawFileError
        If the file is missing, unreadable or lacks a requested cell; the message names it.
    """
    import fitsio

    path = str(path)
    if not os.path.exists(path):
        raise RawFileError(f"{path}: no such raw chip file")
    want = None if cells is None else list(cells)
    try:
        with fitsio.FITS(path) as f:
            header = _clean_header(f[0].read_header())
            out: dict[str, np.ndarray] = {}
            hdrs: dict[str, dict[str, Any]] = {}
            available = {}
            for i in range(1, len(f)):
                name = f[i].get_extname()
                if name:
                    available[name.strip().lower()] = i      # cell names are xyIJ, any case on disk
            names = list(available) if want is None else [str(w).lower() for w in want]
            for name in names:
                if name not in available:
                    raise RawFileError(f"{path}: no cell extension {name!r} (has {sorted(available)})")
                hdu = f[available[name]]
                hdrs[name] = _clean_header(hdu.read_header())
                hdrs[name]["EXTNAME"] = name
                out[name] = np.asarray(hdu.read(), dtype=np.float32)
    except RawFileError:
        raise
    except Exception as exc:  # fitsio raises OSError/ValueError for damaged files
        raise RawFileError(f"{path}: cannot read raw chip: {exc}") from exc
    return RawChip(path=path, header=header, cells=out, cell_headers=hdrs)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _parse_card_value(raw: str) -> Any:
    raw = raw.strip()
    if raw.startswith("'"):
        end = raw.find("'", 1)
        while end != -1 and end + 1 < len(raw) and raw[end + 1] == "'":
            end = raw.find("'", end + 2)
        return raw[1:end].replace("''", "'").rstrip() if end != -1 else raw[1:]
    val = raw.split("/", 1)[0].strip()
    if val in ("T", "F"):
        return val == "T"
    try:
        return int(val)
    except ValueError:
        pass
    try:
        return float(val.replace("D", "E"))
    except ValueError:
        return val


def _scan_fits(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Walk the HDUs of a FITS file block by block without reading pixel data.

    Returns the list of HDUs (``header``, ``data_offset``, ``data_bytes``) and the structural
    problems found (truncation, missing END, bad block count).
    """
    problems: list[str] = []
    hdus: list[dict[str, Any]] = []
    size = os.path.getsize(path)
    if size == 0:
        return hdus, [f"{path}: file is empty"]
    if size % _BLOCK:
        problems.append(f"{path}: size {size} bytes is not a multiple of 2880 (truncated or padded)")
    with open(path, "rb") as fh:
        if not fh.read(30).startswith(b"SIMPLE  =                    T"):
            return hdus, problems + [f"{path}: not a FITS file (no SIMPLE = T)"]
        offset = 0
        while offset < size:
            hdr: dict[str, Any] = {}
            last = ""
            end_found = False
            start = offset
            while not end_found:
                fh.seek(offset)
                block = fh.read(_BLOCK)
                if len(block) < _BLOCK:
                    problems.append(f"{path}: truncated inside the header of HDU {len(hdus)} "
                                    f"(byte {offset} of {size})")
                    return hdus, problems
                offset += _BLOCK
                for i in range(0, _BLOCK, 80):
                    card = block[i:i + 80].decode("ascii", errors="replace")
                    key = card[:8].strip()
                    if key == "END":
                        end_found = True
                        break
                    if card[8:10] == "= ":
                        hdr[key] = _parse_card_value(card[10:])
                        last = key
                    elif key == "CONTINUE" and isinstance(hdr.get(last), str) and hdr[last].endswith("&"):
                        hdr[last] = hdr[last][:-1] + str(_parse_card_value(card[8:]))
            if not hdus and hdr.get("SIMPLE") is not True:
                problems.append(f"{path}: not a FITS file (no SIMPLE = T)")
                return hdus, problems
            naxis = int(hdr.get("NAXIS", 0) or 0)
            nbytes = 0
            if naxis > 0:
                n = 1
                for k in range(1, naxis + 1):
                    n *= int(hdr.get(f"NAXIS{k}", 0) or 0)
                nbytes = abs(int(hdr.get("BITPIX", 8))) // 8 * int(hdr.get("GCOUNT", 1) or 1) \
                    * (int(hdr.get("PCOUNT", 0) or 0) + n)
            padded = -(-nbytes // _BLOCK) * _BLOCK
            hdus.append({"header": hdr, "header_offset": start, "data_offset": offset, "data_bytes": nbytes})
            if offset + padded > size:
                missing = offset + padded - size
                problems.append(f"{path}: truncated: HDU {len(hdus) - 1} "
                                f"({hdr.get('EXTNAME', 'primary')}) needs {missing} more bytes")
                return hdus, problems
            offset += padded
    return hdus, problems


def _check_type(value: Any, typ: type) -> bool:
    if typ is str:
        return isinstance(value, str) and value.strip() != ""
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def validate_raw_chip(path: str | os.PathLike, *, camera=None, check_pixels: bool = True) -> list[str]:
    """Check a raw OTA file against the raw format; return the problems found (empty = valid).

    Checks: the file exists and is a complete FITS file (no truncation); the primary header has
    every keyword of :data:`REQUIRED_PRIMARY` with the right type and a sane value; the number
    of cell extensions equals ``NCELLS`` (and the camera's cell list, if ``camera`` is given);
    every cell has the keywords of :data:`REQUIRED_CELL`, sections that fit the array and match
    the camera's; and (``check_pixels``) no cell is entirely NaN or constant.

    Parameters
    ----------
    path : path-like
        The raw chip file.
    camera : Camera, optional
        A camera from :func:`ps1mpi.geometry.camera.load_camera`: also check the chip name, the
        cell names, the raw cell shape and the sections against it.
    check_pixels : bool
        Also read the pixels (slower) and check for all-NaN / constant cells.

    Returns
    -------
    list of str
        One message per problem, each naming the file.
    """
    path = str(path)
    if not os.path.exists(path):
        return [f"{path}: no such file"]
    hdus, problems = _scan_fits(path)
    if not hdus:
        return problems
    prim = hdus[0]["header"]
    for key, (typ, desc) in REQUIRED_PRIMARY.items():
        if key not in prim:
            problems.append(f"{path}: primary header lacks {key} ({desc})")
        elif not _check_type(prim[key], typ):
            problems.append(f"{path}: primary {key} = {prim[key]!r} is not a valid {typ.__name__}")
    ra, dec = prim.get("RA"), prim.get("DEC")
    if _check_type(ra, float) and not 0.0 <= ra < 360.0:
        problems.append(f"{path}: RA = {ra} outside [0, 360) deg")
    if _check_type(dec, float) and not -90.0 <= dec <= 90.0:
        problems.append(f"{path}: DEC = {dec} outside [-90, 90] deg")
    for key in ("EXPTIME", "AIRMASS"):
        v = prim.get(key)
        if _check_type(v, float) and v < (1.0 if key == "AIRMASS" else 0.0):
            problems.append(f"{path}: {key} = {v} is not physical")
    if isinstance(prim.get("OBSTYPE"), str) and prim["OBSTYPE"] not in OBSTYPES:
        problems.append(f"{path}: OBSTYPE = {prim['OBSTYPE']!r} is not one of {OBSTYPES}")
    if isinstance(prim.get("EXPNAME"), str) and not _EXPNAME_RE.match(prim["EXPNAME"]):
        problems.append(f"{path}: EXPNAME = {prim['EXPNAME']!r} is not of the form o5432g0123o")

    cells = hdus[1:]
    names = [str(h["header"]["EXTNAME"]).strip().lower() if "EXTNAME" in h["header"] else None for h in cells]
    ncells = prim.get("NCELLS")
    if isinstance(ncells, int) and ncells != len(cells):
        problems.append(f"{path}: NCELLS = {ncells} but the file has {len(cells)} cell extensions")
    dup = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dup:
        problems.append(f"{path}: duplicate cell extensions {dup}")
    if camera is not None:
        if isinstance(prim.get("DETECTOR"), str) and prim["DETECTOR"] not in camera.chip_names:
            problems.append(f"{path}: DETECTOR = {prim['DETECTOR']!r} is not a chip of camera {camera.name}")
        expected = list(camera.cell_names)
        if sorted(n for n in names if n) != sorted(expected):
            miss = sorted(set(expected) - set(names))
            extra = sorted(set(n for n in names if n) - set(expected))
            problems.append(f"{path}: cell extensions do not match camera {camera.name} "
                            f"({len(cells)} found, {len(expected)} expected; missing {miss}, unexpected {extra})")

    for h in cells:
        hdr = h["header"]
        name = str(hdr.get("EXTNAME", f"HDU{hdus.index(h)}")).strip().lower()
        if "ZIMAGE" in hdr:
            shape = (int(hdr.get("ZNAXIS2", 0)), int(hdr.get("ZNAXIS1", 0)))
            naxis = int(hdr.get("ZNAXIS", 0))
        else:
            shape = (int(hdr.get("NAXIS2", 0) or 0), int(hdr.get("NAXIS1", 0) or 0))
            naxis = int(hdr.get("NAXIS", 0) or 0)
        if naxis != 2:
            problems.append(f"{path}: cell {name} is not a 2-D image (NAXIS = {naxis})")
            continue
        for key, (typ, desc) in REQUIRED_CELL.items():
            if key not in hdr:
                problems.append(f"{path}: cell {name} lacks {key} ({desc})")
            elif not _check_type(hdr[key], typ):
                problems.append(f"{path}: cell {name} {key} = {hdr[key]!r} is not a valid {typ.__name__}")
        for key in ("DATASEC", "BIASSEC"):
            if not isinstance(hdr.get(key), str):
                continue
            try:
                y0, y1, x0, x1 = parse_section(hdr[key], what=f"{path}[{name}] {key}")
            except RawFileError as exc:
                problems.append(str(exc))
                continue
            if y1 > shape[0] or x1 > shape[1]:
                problems.append(f"{path}: cell {name} {key} {hdr[key]} exceeds the array shape {shape}")
            if camera is not None:
                want = camera.datasec if key == "DATASEC" else camera.biassec
                if (y0, y1, x0, x1) != tuple(want):
                    problems.append(f"{path}: cell {name} {key} {hdr[key]} differs from camera "
                                    f"{camera.name} {format_section(want)}")
        if camera is not None and tuple(shape) != tuple(camera.raw_cell_shape):
            problems.append(f"{path}: cell {name} shape {shape} differs from camera raw cell shape "
                            f"{tuple(camera.raw_cell_shape)}")
        g = hdr.get("GAIN")
        if _check_type(g, float) and g <= 0:
            problems.append(f"{path}: cell {name} GAIN = {g} is not positive")

    if check_pixels and not any("truncated" in p for p in problems):
        try:
            import fitsio
            with fitsio.FITS(path) as f:
                for i in range(1, len(f)):
                    name = (f[i].get_extname() or f"HDU{i}").strip().lower()
                    data = f[i].read()
                    if data is None or data.size == 0:
                        problems.append(f"{path}: cell {name} has no pixels")
                        continue
                    data = np.asarray(data)
                    if data.dtype.kind == "f":
                        finite = np.isfinite(data)
                        if not finite.any():
                            problems.append(f"{path}: cell {name} is all NaN")
                            continue
                        if not finite.all():
                            problems.append(f"{path}: cell {name} has {int((~finite).sum())} non-finite pixels")
                        data = data[finite]
                    if data.min() == data.max():
                        problems.append(f"{path}: cell {name} is constant ({data.flat[0]})")
        except Exception as exc:
            problems.append(f"{path}: pixels unreadable: {exc}")
    return problems
