"""Camera geometry: chips (OTAs) in the focal plane, cells in a chip, raw cell layout.

A camera is described by data, not code: a TOML file in ``ps1mpi/data/cameras/`` (cell
structure, raw-cell sections, electronics defaults, pixel scale) and a layout CSV with one row
per chip (``chip,x0,y0,xparity,yparity``). Two cameras ship with the package: ``gpc1`` (the
real GPC1 layout) and ``testcam`` (2x2 OTAs of 2x2 cells, the same structure, for tests).

Coordinate systems (see ``docs/geometry.md``):

* chip pixels ``(x, y)``: 0-based, the centre of pixel ``[j, i]`` of the stitched chip image is
  at ``(x, y) = (i, j)``; the chip covers ``-0.5 <= x < chip_nx - 0.5`` (likewise y).
* layout pixels: the absolute coordinates of the layout CSV; chip pixel (0, 0) lies at
  ``(x0, y0)`` and ``X_layout = x0 + xparity * x``.
* focal-plane pixels ``(X, Y)``: layout pixels minus the optical axis, which is the centre of
  the layout's bounding box unless the TOML sets ``optical_axis``.
"""

from __future__ import annotations

import csv
import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Camera", "ChipLayout", "load_camera", "parse_fits_section", "CAMERA_DIR"]

#: Directory holding the packaged camera descriptions.
CAMERA_DIR = Path(__file__).resolve().parents[1] / "data" / "cameras"

_SECTION_RE = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")
_CELL_RE = re.compile(r"^xy(\d)(\d)$")


def parse_fits_section(text: str, *, what: str = "section") -> tuple[int, int, int, int]:
    """Convert a FITS section string to 0-based half-open numpy bounds.

    Parameters
    ----------
    text : str
        FITS 1-based inclusive section ``"[x1:x2,y1:y2]"`` (pixels), e.g. ``"[1:590,1:598]"``.
    what : str
        Name of the keyword, used in error messages.

    Returns
    -------
    tuple of int
        ``(y0, y1, x0, x1)`` such that ``image[y0:y1, x0:x1]`` is the section.
    """
    m = _SECTION_RE.match(str(text).strip())
    if m is None:
        raise ValueError(f"{what}: {text!r} is not a FITS section of the form '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(v) for v in m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValueError(f"{what}: {text!r} is empty or starts below pixel 1")
    return (y1 - 1, y2, x1 - 1, x2)


@dataclass(frozen=True)
class ChipLayout:
    """Position of one chip (OTA) in the focal plane.

    Attributes
    ----------
    name : str
        Chip name, e.g. ``"XY01"``.
    x0, y0 : float
        Layout position (pixels) of the centre of chip pixel (0, 0).
    xparity, yparity : int
        +1 if chip x (y) runs along layout X (Y), -1 if opposite.
    """

    name: str
    x0: float
    y0: float
    xparity: int
    yparity: int


@dataclass(frozen=True, eq=False)
class Camera:
    """A camera: chip layout, cell structure, raw cell format and electronics defaults.

    Build one with :func:`load_camera`. All geometric methods are vectorised over the
    coordinates (numpy broadcasting); chip names are scalars.

    Attributes
    ----------
    name : str
        Camera name (``"gpc1"``, ``"testcam"``).
    chip_names : list of str
        Chip names in layout-file order.
    ncell_x, ncell_y : int
        Cells per chip along x and y.
    cell_nx, cell_ny : int
        Data pixels per cell along x and y.
    cell_gap_x, cell_gap_y : int
        Pixels between neighbouring cells in the stitched chip.
    raw_cell_nx, raw_cell_ny : int
        Size of a raw cell image including its overscan (pixels).
    datasec_fits, biassec_fits : str
        The raw-cell DATASEC and BIASSEC in FITS notation.
    pixel_scale : float
        Nominal pixel scale at the optical axis (arcsec / pixel).
    pixel_size_um : float
        Physical pixel size (micron).
    gain : float
        Default gain (e- / ADU).
    read_noise : float
        Default read noise (ADU).
    saturation : float
        Default saturation level MAXLIN (ADU).
    bias_level : float
        Default overscan (bias) level (ADU).
    dark_current : float
        Default dark current (e- / s / pixel).
    axis_x, axis_y : float
        Optical axis in layout pixels.
    """

    name: str
    description: str
    chips: dict[str, ChipLayout]
    ncell_x: int
    ncell_y: int
    cell_nx: int
    cell_ny: int
    cell_gap_x: int
    cell_gap_y: int
    raw_cell_nx: int
    raw_cell_ny: int
    datasec_fits: str
    biassec_fits: str
    pixel_scale: float
    pixel_size_um: float
    gain: float
    read_noise: float
    saturation: float
    bias_level: float
    dark_current: float
    axis_x: float
    axis_y: float
    source: str = ""
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ structure
    @property
    def chip_names(self) -> list[str]:
        """Chip names in layout order."""
        return list(self.chips)

    @property
    def chip_nx(self) -> int:
        """Width of the stitched chip image (pixels)."""
        return self.ncell_x * self.cell_nx + (self.ncell_x - 1) * self.cell_gap_x

    @property
    def chip_ny(self) -> int:
        """Height of the stitched chip image (pixels)."""
        return self.ncell_y * self.cell_ny + (self.ncell_y - 1) * self.cell_gap_y

    @property
    def cell_names(self) -> list[str]:
        """Cell names ``xyIJ`` (I = column along x, J = row along y), I outer, J inner."""
        return [f"xy{i}{j}" for i in range(self.ncell_x) for j in range(self.ncell_y)]

    @property
    def raw_cell_shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of a raw cell image including overscan (pixels)."""
        return (self.raw_cell_ny, self.raw_cell_nx)

    @property
    def datasec(self) -> tuple[int, int, int, int]:
        """Raw-cell data section ``(y0, y1, x0, x1)``, 0-based half-open."""
        return parse_fits_section(self.datasec_fits, what=f"camera {self.name} DATASEC")

    @property
    def biassec(self) -> tuple[int, int, int, int]:
        """Raw-cell overscan (bias) section ``(y0, y1, x0, x1)``, 0-based half-open."""
        return parse_fits_section(self.biassec_fits, what=f"camera {self.name} BIASSEC")

    @property
    def npix_exposure(self) -> int:
        """Number of data pixels in one exposure (all chips, gaps excluded)."""
        return len(self.chips) * self.ncell_x * self.ncell_y * self.cell_nx * self.cell_ny

    def chip(self, name: str) -> ChipLayout:
        """Layout of one chip.

        Parameters
        ----------
        name : str
            Chip name (case-insensitive), e.g. ``"XY01"``.
        """
        try:
            return self.chips[str(name).upper()]
        except KeyError:
            raise KeyError(f"camera {self.name}: no chip named {name!r} "
                           f"(chips are {self.chip_names[0]}..{self.chip_names[-1]})") from None

    def _cell_ij(self, cell: str) -> tuple[int, int]:
        m = _CELL_RE.match(str(cell).lower())
        if m is None:
            raise KeyError(f"camera {self.name}: {cell!r} is not a cell name of the form xyIJ")
        i, j = int(m.group(1)), int(m.group(2))
        if i >= self.ncell_x or j >= self.ncell_y:
            raise KeyError(f"camera {self.name}: no cell {cell!r} "
                           f"(cells are xy00..xy{self.ncell_x - 1}{self.ncell_y - 1})")
        return i, j

    def cell_origin(self, cell: str) -> tuple[int, int]:
        """Stitched-chip position of the cell's data pixel (0, 0).

        Parameters
        ----------
        cell : str
            Cell name ``xyIJ``.

        Returns
        -------
        (x0, y0) : tuple of int
            Chip pixel coordinates of the cell's first data pixel; the cell's data occupy
            ``chip[y0:y0 + cell_ny, x0:x0 + cell_nx]``.
        """
        i, j = self._cell_ij(cell)
        return (i * (self.cell_nx + self.cell_gap_x), j * (self.cell_ny + self.cell_gap_y))

    def cell_at(self, x: Any, y: Any) -> np.ndarray:
        """Name of the cell holding chip pixel position ``(x, y)``.

        Parameters
        ----------
        x, y : array_like
            Chip pixel coordinates (pixels).

        Returns
        -------
        numpy.ndarray of str
            Cell names, ``''`` for positions in a cell gap or off the chip.
        """
        x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        px, py = self.cell_nx + self.cell_gap_x, self.cell_ny + self.cell_gap_y
        i = np.floor((x + 0.5) / px).astype(int)
        j = np.floor((y + 0.5) / py).astype(int)
        inside = ((i >= 0) & (i < self.ncell_x) & (j >= 0) & (j < self.ncell_y)
                  & (x + 0.5 - i * px < self.cell_nx) & (y + 0.5 - j * py < self.cell_ny))
        out = np.full(x.shape, "", dtype="<U4")
        names = np.array([[f"xy{a}{b}" for b in range(self.ncell_y)] for a in range(self.ncell_x)])
        out[inside] = names[i[inside], j[inside]]
        return out

    # ------------------------------------------------------------------ focal plane
    def chip_to_focal(self, chip: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Chip pixel coordinates to focal-plane coordinates.

        Parameters
        ----------
        chip : str
            Chip name.
        x, y : array_like
            Chip pixel coordinates (pixels).

        Returns
        -------
        X, Y : numpy.ndarray
            Focal-plane coordinates relative to the optical axis (pixels).
        """
        c = self.chip(chip)
        X = c.x0 + c.xparity * np.asarray(x, dtype=float) - self.axis_x
        Y = c.y0 + c.yparity * np.asarray(y, dtype=float) - self.axis_y
        return X, Y

    def focal_to_chip(self, chip: str, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane coordinates to chip pixel coordinates (inverse of :meth:`chip_to_focal`).

        Parameters
        ----------
        chip : str
            Chip name.
        X, Y : array_like
            Focal-plane coordinates relative to the optical axis (pixels).

        Returns
        -------
        x, y : numpy.ndarray
            Chip pixel coordinates (pixels); not restricted to the chip.
        """
        c = self.chip(chip)
        x = (np.asarray(X, dtype=float) + self.axis_x - c.x0) * c.xparity
        y = (np.asarray(Y, dtype=float) + self.axis_y - c.y0) * c.yparity
        return x, y

    def chip_extent(self, chip: str) -> tuple[float, float, float, float]:
        """Focal-plane rectangle covered by a chip's pixels.

        Returns
        -------
        (Xmin, Xmax, Ymin, Ymax) : tuple of float
            Pixel-edge bounds relative to the optical axis (pixels).
        """
        X, Y = self.chip_to_focal(chip, np.array([-0.5, self.chip_nx - 0.5]),
                                  np.array([-0.5, self.chip_ny - 0.5]))
        return (float(X.min()), float(X.max()), float(Y.min()), float(Y.max()))

    def chip_at_focal(self, X: Any, Y: Any) -> np.ndarray:
        """Chip holding each focal-plane position.

        Parameters
        ----------
        X, Y : array_like
            Focal-plane coordinates relative to the optical axis (pixels).

        Returns
        -------
        numpy.ndarray of str
            Chip names, ``''`` where no chip covers the position (gaps, outside).
        """
        X, Y = np.broadcast_arrays(np.asarray(X, dtype=float), np.asarray(Y, dtype=float))
        ext = self._arrays["extent"]
        width = max(len(n) for n in self.chip_names)
        out = np.full(X.shape, "", dtype=f"<U{width}")
        for k, name in enumerate(self.chip_names):
            xmin, xmax, ymin, ymax = ext[k]
            sel = (X >= xmin) & (X < xmax) & (Y >= ymin) & (Y < ymax)
            out[sel] = name
        return out

    def focal_plane_extent(self) -> tuple[float, float, float, float]:
        """Bounding box of all chips in the focal plane.

        Returns
        -------
        (Xmin, Xmax, Ymin, Ymax) : tuple of float
            Pixel-edge bounds relative to the optical axis (pixels).
        """
        ext = self._arrays["extent"]
        return (float(ext[:, 0].min()), float(ext[:, 1].max()),
                float(ext[:, 2].min()), float(ext[:, 3].max()))

    def focal_plane_outline(self, *, grow: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Outer outline of the union of the chips, as one closed rectilinear polygon.

        The chips are grown by ``grow`` pixels on every side so that the gaps between chips
        close; the outline is the outer boundary of the union of the grown chips (holes are
        ignored), counter-clockwise in (X, Y), without a repeated first vertex.

        Parameters
        ----------
        grow : float, optional
            Growth of each chip (pixels). Default: half the largest gap between neighbouring
            chips along x or y, plus one pixel.

        Returns
        -------
        X, Y : numpy.ndarray
            Outline vertices relative to the optical axis (pixels).
        """
        ext = self._arrays["extent"]
        if grow is None:
            grow = self._default_grow()
        g = float(grow)
        rx0, rx1 = ext[:, 0] - g, ext[:, 1] + g
        ry0, ry1 = ext[:, 2] - g, ext[:, 3] + g
        xs = np.unique(np.concatenate([rx0, rx1]))
        ys = np.unique(np.concatenate([ry0, ry1]))
        # occupancy of the compressed grid cells (padded by one empty cell on each side)
        occ = np.zeros((len(ys) + 1, len(xs) + 1), dtype=bool)
        for a0, a1, b0, b1 in zip(rx0, rx1, ry0, ry1):
            i0, i1 = np.searchsorted(xs, [a0, a1])
            j0, j1 = np.searchsorted(ys, [b0, b1])
            occ[j0 + 1:j1 + 1, i0 + 1:i1 + 1] = True
        from scipy import ndimage

        _, ncomp = ndimage.label(occ)
        if ncomp != 1:
            raise ValueError(f"camera {self.name}: the chips grown by {g:g} px form {ncomp} "
                             "separate regions; no single outline exists")
        verts = _trace_outline(occ)
        # lattice vertex (i, j) -> coordinate xs[i-1], ys[j-1] (padding shifts by one)
        X = xs[verts[:, 0] - 1]
        Y = ys[verts[:, 1] - 1]
        return X, Y

    def _default_grow(self) -> float:
        ext = self._arrays["extent"]
        n = len(ext)
        if n < 2:
            return 0.0
        x0, x1, y0, y1 = ext[:, 0], ext[:, 1], ext[:, 2], ext[:, 3]
        dx = np.maximum(x0[None, :] - x1[:, None], x0[:, None] - x1[None, :])
        dy = np.maximum(y0[None, :] - y1[:, None], y0[:, None] - y1[None, :])
        big = np.inf
        eye = np.eye(n, dtype=bool)
        # horizontal neighbours overlap in y; vertical neighbours overlap in x
        gx = np.where((dy < 0) & ~eye & (dx >= 0), dx, big).min(axis=1)
        gy = np.where((dx < 0) & ~eye & (dy >= 0), dy, big).min(axis=1)
        gaps = np.concatenate([gx[np.isfinite(gx)], gy[np.isfinite(gy)]])
        return float(gaps.max() / 2.0 + 1.0) if gaps.size else 0.0

    def describe(self) -> dict[str, Any]:
        """Summary of the camera as plain values (for headers and logs)."""
        return {
            "name": self.name, "nchip": len(self.chips), "chip_nx": self.chip_nx,
            "chip_ny": self.chip_ny, "ncell_x": self.ncell_x, "ncell_y": self.ncell_y,
            "cell_nx": self.cell_nx, "cell_ny": self.cell_ny, "pixel_scale": self.pixel_scale,
            "axis": (self.axis_x, self.axis_y),
        }


def _trace_outline(occ: np.ndarray) -> np.ndarray:
    """Outer boundary of the True region of a padded boolean grid, as lattice vertices.

    Cell ``occ[j, i]`` spans lattice points ``i..i+1`` by ``j..j+1``. Boundary edges are
    directed with the region on their left (counter-clockwise outer boundary); the loop
    through the lowest-leftmost edge is followed and collinear vertices are dropped.
    """
    ny, nx = occ.shape
    pad = np.zeros((ny + 2, nx + 2), dtype=bool)
    pad[1:-1, 1:-1] = occ
    c = pad[1:-1, 1:-1]
    below = pad[:-2, 1:-1]
    above = pad[2:, 1:-1]
    left = pad[1:-1, :-2]
    right = pad[1:-1, 2:]
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts: np.ndarray, d: tuple[int, int]) -> None:
        for i, j in zip(*starts):
            nxt.setdefault((int(i), int(j)), []).append((int(i) + d[0], int(j) + d[1]))

    jj, ii = np.nonzero(c & ~below)   # bottom edge, going +x
    add((ii, jj), (1, 0))
    jj, ii = np.nonzero(c & ~right)   # right edge, going +y
    add((ii + 1, jj), (0, 1))
    jj, ii = np.nonzero(c & ~above)   # top edge, going -x
    add((ii + 1, jj + 1), (-1, 0))
    jj, ii = np.nonzero(c & ~left)    # left edge, going -y
    add((ii, jj + 1), (0, -1))
    if not nxt:
        raise ValueError("outline: the occupancy grid is empty")
    start = min(nxt, key=lambda p: (p[1], p[0]))
    loop = [start]
    prev_dir = None
    cur = start
    for _ in range(4 * occ.size + 4):
        options = nxt[cur]
        if len(options) > 1:
            # pinch vertex: keep the region on the left by taking the leftmost turn
            def turn(p: tuple[int, int]) -> int:
                d = (p[0] - cur[0], p[1] - cur[1])
                if prev_dir is None:
                    return 0
                cross = prev_dir[0] * d[1] - prev_dir[1] * d[0]
                return -cross
            options = sorted(options, key=turn)
        nb = options[0]
        prev_dir = (nb[0] - cur[0], nb[1] - cur[1])
        cur = nb
        if cur == start:
            break
        loop.append(cur)
    else:  # pragma: no cover - defensive, the loop always closes on a finite grid
        raise RuntimeError("outline: boundary tracing did not close")
    v = np.array(loop, dtype=int)
    # drop collinear vertices
    prev = np.roll(v, 1, axis=0)
    post = np.roll(v, -1, axis=0)
    d1 = v - prev
    d2 = post - v
    keep = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) != 0
    return v[keep]


def _read_layout(path: Path) -> dict[str, ChipLayout]:
    chips: dict[str, ChipLayout] = {}
    with path.open(newline="") as fh:
        rows = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(rows)
    need = {"chip", "x0", "y0", "xparity", "yparity"}
    if reader.fieldnames is None or not need <= {f.strip() for f in reader.fieldnames}:
        raise ValueError(f"camera layout {path}: header must have columns {sorted(need)}, "
                         f"found {reader.fieldnames}")
    for lineno, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items()}
        try:
            name = row["chip"].upper()
            xp, yp = int(row["xparity"]), int(row["yparity"])
            x0, y0 = float(row["x0"]), float(row["y0"])
        except ValueError as err:
            raise ValueError(f"camera layout {path}: data row {lineno - 1}: {err}") from None
        if xp not in (1, -1) or yp not in (1, -1):
            raise ValueError(f"camera layout {path}: chip {name}: parities must be +1 or -1, "
                             f"got {xp}, {yp}")
        if name in chips:
            raise ValueError(f"camera layout {path}: chip {name} is listed twice")
        chips[name] = ChipLayout(name, x0, y0, xp, yp)
    if not chips:
        raise ValueError(f"camera layout {path}: no chips")
    return chips


def _get(table: dict, key: str, kind: type, source: str) -> Any:
    if key not in table:
        raise ValueError(f"camera file {source}: missing key {key!r}")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"camera file {source}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


@functools.lru_cache(maxsize=16)
def _load(path_str: str) -> Camera:
    path = Path(path_str)
    src = str(path)
    try:
        with path.open("rb") as fh:
            cfg = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"camera file {src}: {err}") from None
    for section in ("cells", "raw_cell", "electronics"):
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"camera file {src}: missing table [{section}]")
    cells, raw, el = cfg["cells"], cfg["raw_cell"], cfg["electronics"]
    layout = path.parent / _get(cfg, "layout", str, src)
    if not layout.is_file():
        raise ValueError(f"camera file {src}: layout file {layout} does not exist")
    chips = _read_layout(layout)
    kw: dict[str, Any] = dict(
        name=_get(cfg, "name", str, src),
        description=str(cfg.get("description", "")),
        chips=chips,
        ncell_x=_get(cells, "ncell_x", int, src), ncell_y=_get(cells, "ncell_y", int, src),
        cell_nx=_get(cells, "cell_nx", int, src), cell_ny=_get(cells, "cell_ny", int, src),
        cell_gap_x=_get(cells, "gap_x", int, src), cell_gap_y=_get(cells, "gap_y", int, src),
        raw_cell_nx=_get(raw, "nx", int, src), raw_cell_ny=_get(raw, "ny", int, src),
        datasec_fits=_get(raw, "datasec", str, src), biassec_fits=_get(raw, "biassec", str, src),
        pixel_scale=_get(cfg, "pixel_scale", float, src),
        pixel_size_um=_get(cfg, "pixel_size_um", float, src),
        gain=_get(el, "gain", float, src), read_noise=_get(el, "read_noise", float, src),
        saturation=_get(el, "saturation", float, src),
        bias_level=_get(el, "bias_level", float, src),
        dark_current=_get(el, "dark_current", float, src),
        source=src,
    )
    for key in ("ncell_x", "ncell_y", "cell_nx", "cell_ny", "raw_cell_nx", "raw_cell_ny"):
        if kw[key] <= 0:
            raise ValueError(f"camera file {src}: {key} must be positive, got {kw[key]}")
    if kw["ncell_x"] > 10 or kw["ncell_y"] > 10:
        raise ValueError(f"camera file {src}: at most 10x10 cells per chip (names xyIJ)")
    for key in ("cell_gap_x", "cell_gap_y"):
        if kw[key] < 0:
            raise ValueError(f"camera file {src}: {key} must be >= 0")
    for key in ("pixel_scale", "pixel_size_um", "gain", "saturation"):
        if not kw[key] > 0:
            raise ValueError(f"camera file {src}: {key} must be positive, got {kw[key]}")
    # raw-cell sections
    dy0, dy1, dx0, dx1 = parse_fits_section(kw["datasec_fits"], what=f"camera file {src} datasec")
    by0, by1, bx0, bx1 = parse_fits_section(kw["biassec_fits"], what=f"camera file {src} biassec")
    if (dy1 - dy0, dx1 - dx0) != (kw["cell_ny"], kw["cell_nx"]):
        raise ValueError(f"camera file {src}: datasec {kw['datasec_fits']} is "
                         f"{dx1 - dx0}x{dy1 - dy0}, cells are {kw['cell_nx']}x{kw['cell_ny']}")
    for sec, (a0, a1, b0, b1) in (("datasec", (dy0, dy1, dx0, dx1)),
                                  ("biassec", (by0, by1, bx0, bx1))):
        if a1 > kw["raw_cell_ny"] or b1 > kw["raw_cell_nx"]:
            raise ValueError(f"camera file {src}: {sec} extends beyond the raw cell "
                             f"{kw['raw_cell_nx']}x{kw['raw_cell_ny']}")
    if max(dy0, by0) < min(dy1, by1) and max(dx0, bx0) < min(dx1, bx1):
        raise ValueError(f"camera file {src}: datasec and biassec overlap")
    # optical axis
    cam_nx = kw["ncell_x"] * kw["cell_nx"] + (kw["ncell_x"] - 1) * kw["cell_gap_x"]
    cam_ny = kw["ncell_y"] * kw["cell_ny"] + (kw["ncell_y"] - 1) * kw["cell_gap_y"]
    edges = np.array([[c.x0 + c.xparity * e for e in (-0.5, cam_nx - 0.5)] +
                      [c.y0 + c.yparity * e for e in (-0.5, cam_ny - 0.5)]
                      for c in chips.values()])
    abs_ext = np.column_stack([edges[:, :2].min(1), edges[:, :2].max(1),
                               edges[:, 2:].min(1), edges[:, 2:].max(1)])
    if "optical_axis" in cfg:
        axis = cfg["optical_axis"]
        if (not isinstance(axis, list) or len(axis) != 2
                or not all(isinstance(a, (int, float)) for a in axis)):
            raise ValueError(f"camera file {src}: optical_axis must be [X, Y] in layout pixels")
        ax, ay = float(axis[0]), float(axis[1])
    else:
        ax = 0.5 * (abs_ext[:, 0].min() + abs_ext[:, 1].max())
        ay = 0.5 * (abs_ext[:, 2].min() + abs_ext[:, 3].max())
    ext = abs_ext - np.array([ax, ax, ay, ay])
    # chips must not overlap
    n = len(ext)
    ox = np.minimum(ext[:, None, 1], ext[None, :, 1]) - np.maximum(ext[:, None, 0], ext[None, :, 0])
    oy = np.minimum(ext[:, None, 3], ext[None, :, 3]) - np.maximum(ext[:, None, 2], ext[None, :, 2])
    bad = (ox > 0) & (oy > 0) & ~np.eye(n, dtype=bool)
    if bad.any():
        a, b = np.argwhere(bad)[0]
        names = list(chips)
        raise ValueError(f"camera layout {layout}: chips {names[a]} and {names[b]} overlap")
    ext.setflags(write=False)
    return Camera(axis_x=ax, axis_y=ay, _arrays={"extent": ext}, **kw)


def load_camera(name: str | Path) -> Camera:
    """Load a camera description.

    Parameters
    ----------
    name : str or pathlib.Path
        A packaged camera name (``"gpc1"``, ``"testcam"``; case-insensitive) or the path of
        a camera TOML file (its layout CSV is looked up next to it).

    Returns
    -------
    Camera
        The camera (cached: loading the same file twice returns the same object).
    """
    p = Path(name)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"camera file {p} does not exist")
        return _load(str(p.resolve()))
    cand = CAMERA_DIR / f"{str(name).lower()}.toml"
    if not cand.is_file():
        known = sorted(f.stem for f in CAMERA_DIR.glob("*.toml") if not f.stem.endswith("_masks"))
        raise ValueError(f"unknown camera {name!r}: known cameras are {known}, "
                         "or give the path of a camera TOML file")
    return _load(str(cand))
