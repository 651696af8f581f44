"""Sky tessellations: declination rings of projection cells, each cut into skycells.

A tessellation of the PS1 "rings" kind (RINGS.V3 and the scaled-down test tessellations) is
a table of declination zones. Zone ``z`` has ``NBAND`` projection cells centred at
``RA = k * 360 / NBAND`` (k = 0 .. NBAND-1) and ``Dec = DEC``, numbered from ``PROJCELL``.
Every projection cell is a gnomonic (TAN) projection about its centre at the tessellation's
pixel scale, North up and East left, cut into ``nsub_x x nsub_y`` skycells of
``XCELL x YCELL`` pixels that share its tangent point. Skycell ``(col k, row j)`` is named
``skycell.PPPP.SSS`` with ``SSS = 10 j + k``; 000 is the lower-left (South-East) skycell.
Neighbouring skycells are offset by a pitch of ``XCELL - overlap`` (``YCELL - overlap``)
pixels, so they overlap by ``overlap`` pixels. The 0-based reference pixel of skycell (k, j)
is ``CRPIX1 + pitch_x * (nsub_x // 2 - k)``, ``CRPIX2 + pitch_y * (nsub_y // 2 - j)``
(FITS CRPIX one more). See ``docs/geometry.md`` and ``tessellation/README.md``.

Tessellation definitions are TOML files found in, in order: ``$PS1MPI_TESSELLATION_DIR``,
the repository's ``tessellation/`` directory, ``sys.prefix/share/ps1mpi/tessellation``.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ps1mpi.geometry.focalplane import angular_separation, gnomonic_forward, gnomonic_inverse

__all__ = [
    "Skycell",
    "Tessellation",
    "load_tessellation",
    "tessellation_dirs",
    "ring_table",
    "parse_skycell_name",
]

_DEG = math.pi / 180.0
_NAME_RE = re.compile(r"^skycell\.(\d+)\.(\d+)$")

#: Columns of a rings table (as in ps1grid_rings_v3.fits).
RING_COLUMNS = ("ZONE", "PROJCELL", "NBAND", "DEC", "DEC_MIN", "DEC_MAX", "XCELL", "YCELL",
                "CRPIX1", "CRPIX2")


def tessellation_dirs() -> list[Path]:
    """Directories searched for tessellation definitions, in order."""
    dirs = []
    env = os.environ.get("PS1MPI_TESSELLATION_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parents[2] / "tessellation")
    dirs.append(Path(sys.prefix) / "share" / "ps1mpi" / "tessellation")
    return dirs


def parse_skycell_name(name: str) -> tuple[int, int]:
    """Split ``skycell.PPPP.SSS`` into (projection cell, skycell index)."""
    m = _NAME_RE.match(str(name).strip())
    if m is None:
        raise ValueError(f"{name!r} is not a skycell name of the form skycell.PPPP.SSS")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True, eq=False)
class Skycell:
    """One skycell: a pixel grid on the sky, the unit of warps and stacks.

    Attributes
    ----------
    name : str
        ``skycell.PPPP.SSS``.
    projcell : int
        Projection cell number.
    index : int
        Skycell number in the projection cell, ``10 * row + column``.
    nx, ny : int
        Image size (pixels).
    ra_center, dec_center : float
        Sky position of the image centre ``((nx-1)/2, (ny-1)/2)`` (degrees).
    wcs : astropy.wcs.WCS
        TAN WCS (CRVAL at the projection cell centre, 0.25"/px for RINGS.V3).
    tess_id : str
        Tessellation name.
    """

    name: str
    projcell: int
    index: int
    nx: int
    ny: int
    ra_center: float
    dec_center: float
    wcs: Any
    tess_id: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(ny, nx)``."""
        return (self.ny, self.nx)

    def header(self) -> Any:
        """FITS header: image size, the WCS, and TESS_ID / SKYCELL / PROJCELL keywords.

        Returns
        -------
        astropy.io.fits.Header
        """
        from astropy.io import fits

        h = fits.Header()
        h["NAXIS"] = 2
        h["NAXIS1"] = self.nx
        h["NAXIS2"] = self.ny
        h.extend(self.wcs.to_header(), update=True)
        h["TESS_ID"] = (self.tess_id, "sky tessellation")
        h["SKYCELL"] = (self.name, "skycell name")
        h["PROJCELL"] = (self.projcell, "projection cell")
        h["SKYINDEX"] = (self.index, "skycell index 10*row+col in the projection cell")
        h["RA_CEN"] = (self.ra_center, "[deg] RA of the image centre")
        h["DEC_CEN"] = (self.dec_center, "[deg] Dec of the image centre")
        return h

    def sky_to_pixel(self, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """Sky (degrees) to 0-based skycell pixels."""
        x, y = self.wcs.wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return np.asarray(x), np.asarray(y)

    def pixel_to_sky(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """0-based skycell pixels to sky (degrees)."""
        r, d = self.wcs.wcs_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return np.asarray(r), np.asarray(d)


class Tessellation:
    """A rings tessellation (projection cells in declination zones, skycells within).

    Build one with :func:`load_tessellation`.

    Parameters
    ----------
    name : str
        Tessellation name, e.g. ``"RINGS.V3"``.
    table : dict of numpy.ndarray
        Zone table with the columns :data:`RING_COLUMNS`, zones in increasing declination;
        ``CRPIX1/2`` are 0-based.
    pixel_scale : float
        Pixel scale (arcsec / pixel).
    nsub_x, nsub_y : int
        Skycells per projection cell along x and y.
    overlap : int
        Pixels by which neighbouring skycells overlap (``XCELL - pitch``).
    """

    def __init__(self, name: str, table: dict[str, np.ndarray], *, pixel_scale: float,
                 nsub_x: int = 10, nsub_y: int = 10, overlap: int = 480) -> None:
        self.name = name
        missing = [c for c in RING_COLUMNS if c not in table]
        if missing:
            raise ValueError(f"tessellation {name}: table lacks columns {missing}")
        t = {c: np.asarray(table[c]) for c in RING_COLUMNS}
        n = len(t["ZONE"])
        if n == 0 or any(len(v) != n for v in t.values()):
            raise ValueError(f"tessellation {name}: table columns are empty or of unequal length")
        if np.any(np.diff(t["DEC_MAX"]) <= 0) or np.any(t["DEC_MIN"] >= t["DEC_MAX"]):
            raise ValueError(f"tessellation {name}: zones must be in increasing declination "
                             "with DEC_MIN < DEC_MAX")
        if np.any(t["NBAND"] < 1):
            raise ValueError(f"tessellation {name}: NBAND must be >= 1")
        if np.any(t["PROJCELL"][1:] != t["PROJCELL"][:-1] + t["NBAND"][:-1]):
            raise ValueError(f"tessellation {name}: PROJCELL must number the cells "
                             "consecutively (PROJCELL[z+1] = PROJCELL[z] + NBAND[z])")
        if not pixel_scale > 0:
            raise ValueError(f"tessellation {name}: pixel_scale must be positive")
        if nsub_x < 1 or nsub_y < 1 or nsub_x > 10 or nsub_y > 10:
            raise ValueError(f"tessellation {name}: nsub_x, nsub_y must be in 1..10")
        self.pixel_scale = float(pixel_scale)
        self.nsub_x, self.nsub_y = int(nsub_x), int(nsub_y)
        self.overlap = int(overlap)
        self.zone = t["ZONE"].astype(int)
        self.projcell0 = t["PROJCELL"].astype(int)
        self.nband = t["NBAND"].astype(int)
        self.dec = t["DEC"].astype(float)
        self.dec_min = t["DEC_MIN"].astype(float)
        self.dec_max = t["DEC_MAX"].astype(float)
        self.xcell = t["XCELL"].astype(int)
        self.ycell = t["YCELL"].astype(int)
        self.crpix1 = t["CRPIX1"].astype(float)
        self.crpix2 = t["CRPIX2"].astype(float)
        self.pitch_x = self.xcell - self.overlap
        self.pitch_y = self.ycell - self.overlap
        if np.any(self.pitch_x <= self.overlap) or np.any(self.pitch_y <= self.overlap):
            raise ValueError(f"tessellation {name}: overlap {overlap} px is too large for "
                             "the skycell sizes")
        self._rad_per_px = self.pixel_scale / 3600.0 * _DEG
        # half-diagonal of a projection cell with its skycells (degrees), an upper bound on
        # the angular distance from its centre to any of its pixels
        hx = (self.nsub_x // 2 + 1) * self.pitch_x + self.xcell
        hy = (self.nsub_y // 2 + 1) * self.pitch_y + self.ycell
        self._pc_radius = np.hypot(hx, hy) * self.pixel_scale / 3600.0

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (f"Tessellation({self.name!r}, zones={len(self.zone)}, "
                f"projcells={self.n_projcells}, pixel_scale={self.pixel_scale})")

    @property
    def n_projcells(self) -> int:
        """Number of projection cells."""
        return int(self.nband.sum())

    @property
    def first_projcell(self) -> int:
        """Lowest projection cell number."""
        return int(self.projcell0[0])

    @property
    def dec_limit(self) -> tuple[float, float]:
        """Declination range covered (degrees)."""
        return float(self.dec_min[0]), float(self.dec_max[-1])

    def _zone_of(self, projcell: Any) -> np.ndarray:
        p = np.asarray(projcell, dtype=int)
        iz = np.searchsorted(self.projcell0, p, side="right") - 1
        bad = (iz < 0) | (p >= self.projcell0[-1] + self.nband[-1])
        if np.any(bad):
            last = self.first_projcell + self.n_projcells - 1
            raise ValueError(f"tessellation {self.name}: projection cell "
                             f"{np.atleast_1d(p)[np.atleast_1d(bad)][0]} does not exist "
                             f"({self.first_projcell}..{last})")
        return iz

    def projcell_center(self, projcell: Any) -> tuple[np.ndarray, np.ndarray]:
        """Tangent point of projection cells (degrees)."""
        iz = self._zone_of(projcell)
        k = np.asarray(projcell, dtype=int) - self.projcell0[iz]
        return k * 360.0 / self.nband[iz], self.dec[iz]

    def skycell_name(self, projcell: int, index: int) -> str:
        """``skycell.PPPP.SSS`` for a projection cell and skycell index."""
        return f"skycell.{int(projcell):04d}.{int(index):03d}"

    def _crpix0(self, iz: Any, k: Any, j: Any) -> tuple[np.ndarray, np.ndarray]:
        cx = self.crpix1[iz] + self.pitch_x[iz] * (self.nsub_x // 2 - np.asarray(k))
        cy = self.crpix2[iz] + self.pitch_y[iz] * (self.nsub_y // 2 - np.asarray(j))
        return cx, cy

    def skycell(self, name: str) -> Skycell:
        """Geometry and WCS of one skycell.

        Parameters
        ----------
        name : str
            ``skycell.PPPP.SSS``.

        Returns
        -------
        Skycell
        """
        p, s = parse_skycell_name(name)
        return self._skycell(p, s)

    @functools.lru_cache(maxsize=4096)
    def _skycell(self, p: int, s: int) -> Skycell:
        from astropy.wcs import WCS

        k, j = s % 10, s // 10
        if k >= self.nsub_x or j >= self.nsub_y:
            raise ValueError(f"tessellation {self.name}: skycell index {s:03d} is outside the "
                             f"{self.nsub_x}x{self.nsub_y} grid of a projection cell")
        iz = int(self._zone_of(p))
        ra0 = (p - self.projcell0[iz]) * 360.0 / self.nband[iz]
        dec0 = float(self.dec[iz])
        cx, cy = self._crpix0(iz, k, j)
        nx, ny = int(self.xcell[iz]), int(self.ycell[iz])
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [float(ra0), dec0]
        w.wcs.crpix = [float(cx) + 1.0, float(cy) + 1.0]
        w.wcs.cdelt = [-self.pixel_scale / 3600.0, self.pixel_scale / 3600.0]
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.radesys = "ICRS"
        w.pixel_shape = (nx, ny)
        w.wcs.set()
        xc, yc = 0.5 * (nx - 1) - float(cx), 0.5 * (ny - 1) - float(cy)
        rac, decc = gnomonic_inverse(-xc * self._rad_per_px, yc * self._rad_per_px, ra0, dec0)
        return Skycell(self.skycell_name(p, s), int(p), int(s), nx, ny, float(rac),
                       float(decc), w, self.name)

    # ------------------------------------------------------------------ lookups
    def locate(self, ra: Any, dec: Any) -> dict[str, np.ndarray]:
        """Every skycell containing each position (vectorised).

        Parameters
        ----------
        ra, dec : array_like
            Sky positions (degrees).

        Returns
        -------
        dict of numpy.ndarray
            One entry per (position, containing skycell): ``pos`` (index into the flattened
            input), ``projcell``, ``index`` (skycell index), ``x``, ``y`` (0-based skycell
            pixel coordinates of the position). Sorted by position, then projection cell and
            skycell index. Positions outside the tessellation's declination range have none.
        """
        ra = np.mod(np.asarray(ra, dtype=float).ravel(), 360.0)
        dec = np.asarray(dec, dtype=float).ravel()
        if ra.shape != dec.shape:
            raise ValueError("locate: ra and dec must have the same number of elements")
        if np.any(~np.isfinite(ra) | ~np.isfinite(dec) | (np.abs(dec) > 90)):
            raise ValueError("locate: positions must be finite with |dec| <= 90 degrees")
        nz = len(self.zone)
        iz0 = np.clip(np.searchsorted(self.dec_max, dec, side="left"), 0, nz - 1)
        pos_l, pc_l, iz_l = [], [], []
        for dz in (-1, 0, 1):
            iz = iz0 + dz
            ok = (iz >= 0) & (iz < nz)
            izc = np.clip(iz, 0, nz - 1)
            nb = self.nband[izc]
            k0 = np.rint(ra * nb / 360.0).astype(int)
            for dk in (-1, 0, 1):
                kk = np.mod(k0 + dk, nb)
                pos_l.append(np.nonzero(ok)[0])
                pc_l.append((self.projcell0[izc] + kk)[ok])
                iz_l.append(izc[ok])
        pos = np.concatenate(pos_l)
        pc = np.concatenate(pc_l)
        izs = np.concatenate(iz_l)
        # unique (position, projcell) pairs
        key = pos.astype(np.int64) * (self.projcell0[-1] + self.nband[-1] + 1) + pc
        _, first = np.unique(key, return_index=True)
        pos, pc, izs = pos[first], pc[first], izs[first]
        ra0 = (pc - self.projcell0[izs]) * 360.0 / self.nband[izs]
        xi, eta, cosc = gnomonic_forward(ra[pos], dec[pos], ra0, self.dec[izs])
        good = cosc > 0
        x = -xi / self._rad_per_px
        y = eta / self._rad_per_px
        out: dict[str, list[np.ndarray]] = {"pos": [], "projcell": [], "index": [], "x": [],
                                            "y": []}
        cx = self.crpix1[izs] + 0.5
        cy = self.crpix2[izs] + 0.5
        px, py = self.pitch_x[izs], self.pitch_y[izs]
        hx, hy = self.nsub_x // 2, self.nsub_y // 2
        with np.errstate(invalid="ignore"):
            kmin = np.floor(hx - (self.xcell[izs] - x - cx) / px).astype(int) + 1
            kmax = np.floor(hx + (x + cx) / px).astype(int)
            jmin = np.floor(hy - (self.ycell[izs] - y - cy) / py).astype(int) + 1
            jmax = np.floor(hy + (y + cy) / py).astype(int)
        kmin = np.maximum(kmin, 0)
        jmin = np.maximum(jmin, 0)
        kmax = np.minimum(kmax, self.nsub_x - 1)
        jmax = np.minimum(jmax, self.nsub_y - 1)
        for dk in (0, 1):
            for dj in (0, 1):
                k = kmin + dk
                j = jmin + dj
                sel = good & (k <= kmax) & (j <= jmax)
                if not np.any(sel):
                    continue
                c1, c2 = self._crpix0(izs[sel], k[sel], j[sel])
                out["pos"].append(pos[sel])
                out["projcell"].append(pc[sel])
                out["index"].append(10 * j[sel] + k[sel])
                out["x"].append(x[sel] + c1)
                out["y"].append(y[sel] + c2)
        res = {key_: (np.concatenate(v) if v else np.zeros(0, dtype=int if key_ in
                                                           ("pos", "projcell", "index") else float))
               for key_, v in out.items()}
        order = np.lexsort((res["index"], res["projcell"], res["pos"]))
        return {k_: v[order] for k_, v in res.items()}

    def skycells_at(self, ra: float, dec: float) -> list[str]:
        """Names of all skycells containing a sky position.

        Parameters
        ----------
        ra, dec : float
            Sky position (degrees).

        Returns
        -------
        list of str
            Skycell names (several where skycells overlap), sorted; empty outside the
            tessellation's declination range.
        """
        if np.ndim(ra) or np.ndim(dec):
            raise ValueError("skycells_at takes one position; use locate() for arrays")
        r = self.locate(ra, dec)
        return [self.skycell_name(p, s) for p, s in zip(r["projcell"], r["index"])]

    def projcells_near(self, ra: float, dec: float, radius: float) -> np.ndarray:
        """Projection cells that may hold pixels within ``radius`` degrees of a position."""
        lo = dec - radius - 2.0 * float(self._pc_radius.max())
        hi = dec + radius + 2.0 * float(self._pc_radius.max())
        zones = np.nonzero((self.dec_max >= lo) & (self.dec_min <= hi))[0]
        if zones.size == 0:
            return np.zeros(0, dtype=int)
        pcs = np.concatenate([self.projcell0[z] + np.arange(self.nband[z]) for z in zones])
        izs = np.concatenate([np.full(self.nband[z], z) for z in zones])
        ra0 = (pcs - self.projcell0[izs]) * 360.0 / self.nband[izs]
        sep = angular_separation(ra, dec, ra0, self.dec[izs])
        return pcs[sep <= radius + self._pc_radius[izs]]

    def skycells_in_polygon(self, ra: Any, dec: Any) -> list[str]:
        """Names of the skycells that a sky polygon touches.

        Parameters
        ----------
        ra, dec : array_like
            Polygon vertices (degrees), in order, not closed; edges are great-circle arcs.
            The polygon must fit within 45 degrees of its centre.

        Returns
        -------
        list of str
            Skycell names whose pixel area intersects the polygon, sorted.
        """
        ra = np.asarray(ra, dtype=float).ravel()
        dec = np.asarray(dec, dtype=float).ravel()
        if ra.size != dec.size or ra.size < 3:
            raise ValueError("skycells_in_polygon: need matching ra, dec with >= 3 vertices")
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError("skycells_in_polygon: vertices must be finite")
        v = np.column_stack([np.cos(dec * _DEG) * np.cos(ra * _DEG),
                             np.cos(dec * _DEG) * np.sin(ra * _DEG), np.sin(dec * _DEG)])
        c = v.mean(axis=0)
        if np.linalg.norm(c) < 1e-6:
            raise ValueError("skycells_in_polygon: polygon has no well-defined centre")
        c /= np.linalg.norm(c)
        rac = math.atan2(c[1], c[0]) / _DEG % 360.0
        decc = math.asin(max(-1.0, min(1.0, c[2]))) / _DEG
        radius = float(np.max(angular_separation(rac, decc, ra, dec)))
        if radius > 45.0:
            raise ValueError(f"skycells_in_polygon: polygon extends {radius:.1f} deg from its "
                             "centre; at most 45 deg is supported")
        names: list[str] = []
        for p in self.projcells_near(rac, decc, radius):
            iz = int(self._zone_of(p))
            ra0 = (p - self.projcell0[iz]) * 360.0 / self.nband[iz]
            xi, eta, cosc = gnomonic_forward(ra, dec, ra0, self.dec[iz])
            if np.any(cosc <= 0.05):
                continue  # the polygon reaches ~87 deg from this cell: cannot touch it
            px = -xi / self._rad_per_px
            py = eta / self._rad_per_px
            hit = self._polygon_hits(iz, px, py)
            names.extend(self.skycell_name(p, s) for s in hit)
        return sorted(names)

    def _polygon_hits(self, iz: int, px: np.ndarray, py: np.ndarray) -> list[int]:
        """Skycell indices of zone ``iz``'s projection cell touched by a pixel polygon."""
        ks = np.arange(self.nsub_x)
        js = np.arange(self.nsub_y)
        cxk, _ = self._crpix0(iz, ks, 0)
        _, cyj = self._crpix0(iz, 0, js)
        xlo_k, xhi_k = -0.5 - cxk, -0.5 - cxk + self.xcell[iz]
        ylo_j, yhi_j = -0.5 - cyj, -0.5 - cyj + self.ycell[iz]
        kk = np.nonzero((xhi_k >= px.min()) & (xlo_k <= px.max()))[0]
        jj = np.nonzero((yhi_j >= py.min()) & (ylo_j <= py.max()))[0]
        if kk.size == 0 or jj.size == 0:
            return []
        K, J = np.meshgrid(kk, jj, indexing="ij")
        K, J = K.ravel(), J.ravel()
        x0, x1 = xlo_k[K], xhi_k[K]
        y0, y1 = ylo_j[J], yhi_j[J]
        # (a) any polygon edge meets the rectangle (Liang-Barsky clipping), vectorised (E, R)
        ax, ay = px[:, None], py[:, None]
        dx = (np.roll(px, -1) - px)[:, None]
        dy = (np.roll(py, -1) - py)[:, None]
        t0 = np.zeros((px.size, K.size))
        t1 = np.ones((px.size, K.size))
        ok = np.ones((px.size, K.size), dtype=bool)
        for d, lo, hi, a in ((dx, x0, x1, ax), (dy, y0, y1, ay)):
            d = np.broadcast_to(d, t0.shape)
            a = np.broadcast_to(a, t0.shape)
            par = d == 0
            ok &= ~par | ((a >= lo) & (a <= hi))
            with np.errstate(divide="ignore", invalid="ignore"):
                ta = (lo - a) / d
                tb = (hi - a) / d
            tn = np.where(par, -np.inf, np.minimum(ta, tb))
            tf = np.where(par, np.inf, np.maximum(ta, tb))
            t0 = np.maximum(t0, tn)
            t1 = np.minimum(t1, tf)
        edge_hit = (ok & (t0 <= t1)).any(axis=0)
        # (b) rectangle inside the polygon: its centre inside (crossing number)
        qx = 0.5 * (x0 + x1)
        qy = 0.5 * (y0 + y1)
        bx, by = np.roll(px, -1)[:, None], np.roll(py, -1)[:, None]
        cond = (ay > qy) != (by > qy)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = ax + (qy - ay) * (bx - ax) / (by - ay)
        inside = (np.count_nonzero(cond & (qx < xint), axis=0) % 2) == 1
        hit = edge_hit | inside
        return sorted((10 * J[hit] + K[hit]).tolist())


# ---------------------------------------------------------------------------- construction
def ring_table(*, zone_height: float, pixel_scale: float, nsub_x: int = 10, nsub_y: int = 10,
               overlap: int = 100, first_projcell: int = 0) -> dict[str, np.ndarray]:
    """Build a rings zone table covering the whole sky, the way RINGS.V3 is laid out.

    Zones are centred at ``Dec = -90 + i * zone_height`` (polar caps of radius
    ``zone_height / 2`` hold a single projection cell); a zone has
    ``floor(360 cos(d_eq) / zone_height)`` projection cells, ``d_eq`` its edge nearest the
    equator (the rule that reproduces RINGS.V3's NBAND column). The skycell pitch is the
    smallest whole number of pixels for which the projection cell covers its whole zone
    band, and skycells are ``pitch + overlap`` pixels; the tangent point falls on the edge
    between skycells ``nsub // 2 - 1`` and ``nsub // 2`` (CRPIX ``overlap / 2 - 0.5``,
    0-based).

    Parameters
    ----------
    zone_height : float
        Zone height and nominal projection cell size (degrees); must divide 180.
    pixel_scale : float
        Pixel scale (arcsec / pixel).
    nsub_x, nsub_y : int
        Skycells per projection cell.
    overlap : int
        Overlap between neighbouring skycells (pixels, even).
    first_projcell : int
        Number of the first (South cap) projection cell.

    Returns
    -------
    dict of numpy.ndarray
        Columns :data:`RING_COLUMNS`, 0-based CRPIX.
    """
    nzone_f = 180.0 / zone_height
    nz = int(round(nzone_f))
    if abs(nzone_f - nz) > 1e-9 or nz < 2:
        raise ValueError(f"ring_table: zone_height {zone_height} must divide 180 degrees")
    if overlap < 0 or overlap % 2:
        raise ValueError(f"ring_table: overlap must be a non-negative even number, got {overlap}")
    i = np.arange(nz + 1)
    dec = -90.0 + i * zone_height
    dmin = np.maximum(dec - zone_height / 2, -90.0)
    dmax = np.minimum(dec + zone_height / 2, 90.0)
    dmin[0], dmax[-1] = -90.0, 90.0
    d_eq = np.where((dmin <= 0) & (dmax >= 0), 0.0, np.minimum(np.abs(dmin), np.abs(dmax)))
    nband = np.floor(360.0 * np.cos(d_eq * _DEG) / zone_height + 1e-9).astype(int)
    nband[0] = nband[-1] = 1
    rad_px = pixel_scale / 3600.0 * _DEG
    half_x = np.zeros(nz + 1)
    half_y = np.zeros(nz + 1)
    for z in range(nz + 1):
        if nband[z] == 1:
            h = math.tan(zone_height / 2 * _DEG)
            half_x[z] = half_y[z] = h / rad_px
            continue
        a = 180.0 / nband[z]
        ra_s = np.array([-a, 0.0, a, -a, 0.0, a])
        de_s = np.array([dmin[z]] * 3 + [dmax[z]] * 3)
        xi, eta, _ = gnomonic_forward(ra_s, de_s, 0.0, dec[z])
        half_x[z] = np.abs(xi).max() / rad_px
        half_y[z] = np.abs(eta).max() / rad_px
    pitch_x = np.ceil(2 * half_x / nsub_x).astype(int)
    pitch_y = np.ceil(2 * half_y / nsub_y).astype(int)
    crpix = overlap / 2 - 0.5
    return {
        "ZONE": i,
        "PROJCELL": first_projcell + np.concatenate([[0], np.cumsum(nband)[:-1]]),
        "NBAND": nband,
        "DEC": dec,
        "DEC_MIN": dmin,
        "DEC_MAX": dmax,
        "XCELL": pitch_x + overlap,
        "YCELL": pitch_y + overlap,
        "CRPIX1": np.full(nz + 1, crpix),
        "CRPIX2": np.full(nz + 1, crpix),
    }


def _find(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p.resolve()
    for d in tessellation_dirs():
        cand = d / f"{name}.toml"
        if cand.is_file():
            return cand.resolve()
    searched = ", ".join(str(d) for d in tessellation_dirs())
    raise ValueError(f"unknown tessellation {name!r}: no {name}.toml in {searched}")


@functools.lru_cache(maxsize=8)
def _load(path_str: str) -> Tessellation:
    path = Path(path_str)
    try:
        with path.open("rb") as fh:
            cfg = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"tessellation file {path}: {err}") from None
    if cfg.get("kind", "rings") != "rings":
        raise ValueError(f"tessellation file {path}: kind {cfg.get('kind')!r} is not supported "
                         "(only 'rings')")
    try:
        name = str(cfg["name"])
        scale = float(cfg["pixel_scale"])
        nsx, nsy = int(cfg.get("nsub_x", 10)), int(cfg.get("nsub_y", 10))
        overlap = int(cfg["overlap"])
    except KeyError as err:
        raise ValueError(f"tessellation file {path}: missing key {err}") from None
    if "table" in cfg:
        tpath = path.parent / str(cfg["table"])
        if not tpath.is_file():
            raise ValueError(f"tessellation file {path}: table {tpath} does not exist")
        from astropy.io import fits

        with fits.open(tpath) as hdul:
            data = hdul[1].data
            cols = {c.upper(): np.array(data[c]) for c in data.columns.names}
        origin = int(cfg.get("crpix_origin", 0))
        if origin not in (0, 1):
            raise ValueError(f"tessellation file {path}: crpix_origin must be 0 or 1")
        table = {c: cols[c] for c in RING_COLUMNS if c in cols}
        if "CRPIX1" in table:
            table["CRPIX1"] = table["CRPIX1"].astype(float) - origin
            table["CRPIX2"] = table["CRPIX2"].astype(float) - origin
    elif "construction" in cfg:
        con = cfg["construction"]
        try:
            table = ring_table(zone_height=float(con["zone_height"]), pixel_scale=scale,
                               nsub_x=nsx, nsub_y=nsy, overlap=overlap,
                               first_projcell=int(con.get("first_projcell", 0)))
        except KeyError as err:
            raise ValueError(f"tessellation file {path}: [construction] lacks {err}") from None
    else:
        raise ValueError(f"tessellation file {path}: needs either 'table' or [construction]")
    return Tessellation(name, table, pixel_scale=scale, nsub_x=nsx, nsub_y=nsy, overlap=overlap)


def load_tessellation(name: str | Path) -> Tessellation:
    """Load a tessellation by name (``"RINGS.V3"``, ``"TEST.V1"``) or TOML path.

    Parameters
    ----------
    name : str or pathlib.Path
        Tessellation name, looked up as ``<name>.toml`` in :func:`tessellation_dirs`, or the
        path of a tessellation TOML file.

    Returns
    -------
    Tessellation
        Cached per definition file.
    """
    return _load(str(_find(str(name))))
