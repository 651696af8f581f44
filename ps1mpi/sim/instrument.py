"""The simulated camera's signatures and the exposure of one chip through them.

:class:`Instrument` holds everything about the camera that does not change from exposure to
exposure, deterministic from (camera, seed): per-cell electronics (gain, read noise, bias
level, nonlinearity, full well), the pixel response (flat field: vignetting, chip and cell
quantum efficiency, low-frequency structure, pixel-to-pixel noise, bad columns, dead cells),
the dark current (with amplifier glow, hot pixels and hot columns), the residual 2-D bias
pattern, the fringe pattern of every chip and the crosstalk rules.

:func:`expose_chip` turns the light falling on a chip (electrons per pixel for a detector of
unit response, stitched-chip coordinates) into raw cells, in this order:

1. times the flat field (response), plus dark current x dark time;
2. Poisson noise (exact below 30 e-, Gaussian above);
3. cosmic rays;
4. saturation: charge above the full well bleeds along the columns, within each cell;
5. electrons -> ADU with the cell's gain; nonlinearity ``m = s (1 - a (s / S)^2)`` with ``S``
   the linear range (MAXLIN - bias level);
6. crosstalk between cells (linear, ADU);
7. bias level (per cell, drifting from exposure to exposure) + fixed 2-D bias pattern + row
   noise common to the data and the overscan of a row + read noise.

The flat field is normalised so that its mean over all the camera's live pixels is 1: the
electrons a source puts on a detector of unit response are what the chip stage recovers after
dividing by a master flat normalised the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ps1mpi.algorithms import maskbits
from ps1mpi.sim.artefacts import CosmicRayModel, add_cosmic_rays, bleed_columns, crosstalk_rules

__all__ = [
    "FILTER_ZP", "EXTINCTION", "SKY_MAG", "FRINGE_AMP", "FILTER_ID", "EXPTIME", "FILTER_WAVELENGTH",
    "CellElectronics", "ChipSignature", "Instrument", "ExposeResult", "expose_chip",
]

#: Zero point: magnitude of a source giving 1 e-/s at airmass 1 on a detector of unit response.
FILTER_ZP = {"g": 24.60, "r": 24.80, "i": 24.70, "z": 24.30, "y": 23.40, "w": 25.90}
#: Extinction coefficient (mag per airmass).
EXTINCTION = {"g": 0.15, "r": 0.09, "i": 0.05, "z": 0.04, "y": 0.07, "w": 0.10}
#: Dark-sky surface brightness (mag / arcsec^2).
SKY_MAG = {"g": 21.9, "r": 21.0, "i": 20.2, "z": 19.4, "y": 18.3, "w": 20.9}
#: Peak fringe amplitude as a fraction of the sky level.
FRINGE_AMP = {"g": 0.0, "r": 0.0, "i": 0.002, "z": 0.008, "y": 0.03, "w": 0.0}
#: FILTERID keyword values.
FILTER_ID = {b: f"{b}.00000" for b in "grizyw"}
#: Nominal exposure times (s) of the 3pi survey.
EXPTIME = {"g": 43.0, "r": 40.0, "i": 45.0, "z": 30.0, "y": 30.0, "w": 45.0}
#: Effective wavelength (nm), used to scale the fringe phase between filters.
FILTER_WAVELENGTH = {"g": 481.0, "r": 617.0, "i": 752.0, "z": 866.0, "y": 962.0, "w": 608.0}


@dataclass(frozen=True)
class CellElectronics:
    """Electronics of one readout cell.

    Attributes
    ----------
    gain : float
        e-/ADU.
    read_noise : float
        ADU rms.
    bias_level : float
        Mean overscan level (ADU).
    nonlin : float
        Nonlinearity coefficient ``a``: measured = s (1 - a (s/S)^2), s in ADU above bias.
    linear_range : float
        ``S`` = MAXLIN - bias level (ADU).
    full_well : float
        Pixel capacity (e-).
    maxlin : float
        MAXLIN header value (raw ADU).
    saturate : float
        SATURATE header value (raw ADU): pixels at the full well read above it.
    """

    gain: float
    read_noise: float
    bias_level: float
    nonlin: float
    linear_range: float
    full_well: float
    maxlin: float
    saturate: float

    def to_adu(self, s_e: np.ndarray) -> np.ndarray:
        """Electrons -> measured ADU above bias (gain and nonlinearity)."""
        s = np.asarray(s_e, dtype=np.float32) / np.float32(self.gain)
        return s * (np.float32(1.0) - np.float32(self.nonlin) * (s / np.float32(self.linear_range)) ** 2)


@dataclass
class ChipSignature:
    """Static signatures of one chip in stitched-chip coordinates ``(chip_ny, chip_nx)``.

    Attributes
    ----------
    chip : str
    cells : dict[str, CellElectronics]
    flat : ndarray
        True response (float32; 0 in gaps and dead cells).
    dark : ndarray
        Dark current (e-/s, float32).
    defects : ndarray
        uint16 truth of the static defects: DETECTOR (response < 0.5 or dark > 1 e-/s),
        DEAD_CELL, GAP.
    bias_pattern : dict[str, ndarray]
        Fixed 2-D bias structure of each raw cell (ADU, raw-cell shape; 0 in the overscan).
    live : ndarray
        Bool, pixels belonging to a cell (not gap).
    dead_cells : list[str]
    bad_columns : list[tuple]
        ``(cell, x_in_cell, y_start, response)`` for each bad column segment.
    """

    chip: str
    cells: dict[str, CellElectronics]
    flat: np.ndarray
    dark: np.ndarray
    defects: np.ndarray
    bias_pattern: dict[str, np.ndarray]
    live: np.ndarray
    dead_cells: list[str] = field(default_factory=list)
    bad_columns: list[tuple] = field(default_factory=list)


class Instrument:
    """The simulated camera (GPC1 or the test camera) with its signatures.

    Parameters
    ----------
    camera : Camera
        Geometry from :func:`ps1mpi.geometry.camera.load_camera`.
    seed : int
        Seed of every signature.
    dead_cell_fraction : float
        Fraction of the camera's cells that are dead (at least one).
    crosstalk_coeff : float
        Crosstalk coefficient of the rules of :func:`crosstalk_rules`.
    """

    def __init__(self, camera, *, seed: int = 1, dead_cell_fraction: float = 0.01,
                 crosstalk_coeff: float = 5e-4, cosmic_rays: CosmicRayModel | None = None) -> None:
        self.camera = camera
        self.seed = int(seed)
        self.cosmic_rays = cosmic_rays or CosmicRayModel()
        self.crosstalk = crosstalk_rules(camera, coeff=crosstalk_coeff)
        cam = camera
        nchip, ncell = len(cam.chip_names), len(cam.cell_names)
        rng = np.random.default_rng([self.seed, 11])
        gain = cam.gain * np.clip(rng.normal(1.0, 0.05, (nchip, ncell)), 0.8, 1.2)
        rdn = cam.read_noise * np.clip(rng.normal(1.0, 0.08, (nchip, ncell)), 0.7, 1.3)
        bias = cam.bias_level + rng.normal(0.0, 40.0, (nchip, ncell))
        nonlin = rng.uniform(0.01, 0.04, (nchip, ncell))
        qe_cell = rng.normal(1.0, 0.03, (nchip, ncell))
        qe_chip = rng.normal(1.0, 0.02, (nchip, 1))
        qe = qe_cell * qe_chip
        n_dead = max(1, int(round(dead_cell_fraction * nchip * ncell)))
        dead = np.zeros(nchip * ncell, bool)
        dead[rng.choice(nchip * ncell, n_dead, replace=False)] = True
        dead = dead.reshape(nchip, ncell)
        qe /= qe[~dead].mean()
        self._qe = qe
        self._dead = dead
        self._cells: dict[str, dict[str, CellElectronics]] = {}
        for c, chip in enumerate(cam.chip_names):
            d = {}
            for k, cell in enumerate(cam.cell_names):
                S = cam.saturation - bias[c, k]
                fw_adu = 1.06 * S
                fw_e = fw_adu * gain[c, k]
                meas_fw = fw_adu * (1 - nonlin[c, k] * (fw_adu / S) ** 2)
                d[cell] = CellElectronics(
                    gain=float(gain[c, k]), read_noise=float(rdn[c, k]), bias_level=float(bias[c, k]),
                    nonlin=float(nonlin[c, k]), linear_range=float(S), full_well=float(fw_e),
                    maxlin=float(cam.saturation), saturate=float(bias[c, k] + meas_fw - 6 * rdn[c, k]))
            self._cells[chip] = d
        # field radius: the farthest chip corner from the optical axis
        ext = np.array([cam.chip_extent(ch) for ch in cam.chip_names])
        self.field_radius = float(np.max(np.hypot(np.maximum(np.abs(ext[:, 0]), np.abs(ext[:, 1])),
                                                  np.maximum(np.abs(ext[:, 2]), np.abs(ext[:, 3])))))
        # vignetting normalisation: mean over the live focal plane (coarse grid over every chip)
        vals = []
        for ch in cam.chip_names:
            gx = np.linspace(0, cam.chip_nx - 1, 24)
            gy = np.linspace(0, cam.chip_ny - 1, 24)
            X, Y = cam.chip_to_focal(ch, gx[None, :], gy[:, None])
            vals.append(self._vignetting_raw(X, Y))
        self._vnorm = float(np.mean(vals))
        self._cache: dict[str, ChipSignature] = {}

    # ------------------------------------------------------------------ helpers
    def chip_index(self, chip: str) -> int:
        """Index of ``chip`` in the camera's chip list."""
        return self.camera.chip_names.index(self.camera.chip(chip).name)

    def electronics(self, chip: str) -> dict[str, CellElectronics]:
        """Per-cell electronics of ``chip``."""
        return self._cells[self.camera.chip(chip).name]

    def dead_cells(self, chip: str) -> list[str]:
        """Dead cells of ``chip``."""
        c = self.chip_index(chip)
        return [cell for k, cell in enumerate(self.camera.cell_names) if self._dead[c, k]]

    def _vignetting_raw(self, X, Y):
        rho2 = (np.asarray(X) ** 2 + np.asarray(Y) ** 2) / self.field_radius ** 2
        return 1.0 - 0.06 * rho2 - 0.03 * rho2 ** 2 + 0.01 * np.asarray(X) / self.field_radius

    def _vignetting_separable(self, X, Y) -> np.ndarray:
        """Vignetting on the grid X (columns) x Y (rows), float32, without full float64 temporaries."""
        # 1 - 0.06 rho^2 - 0.03 rho^4 + 0.01 X/R with rho^2 = ax + ay is the rank-3 product
        # [1 + u(y), 1, ay] @ [1; v(x); -0.06 ax]
        R = self.field_radius
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        ax, ay = X ** 2 / R ** 2, Y ** 2 / R ** 2
        u = -0.06 * ay - 0.03 * ay ** 2
        v = -0.06 * ax - 0.03 * ax ** 2 + 0.01 * X / R
        left = np.stack([1.0 + u, np.ones_like(ay), ay], axis=1) / self._vnorm
        right = np.stack([np.ones_like(ax), v, -0.06 * ax], axis=0)
        return left.astype(np.float32) @ right.astype(np.float32)

    def vignetting(self, X, Y):
        """Large-scale response (illumination x optics) at focal-plane positions, mean 1."""
        return self._vignetting_raw(X, Y) / self._vnorm

    def cell_slices(self) -> dict[str, tuple[slice, slice]]:
        """Cell name -> (y slice, x slice) of its data in the stitched chip."""
        cam = self.camera
        out = {}
        for cell in cam.cell_names:
            x0, y0 = cam.cell_origin(cell)
            out[cell] = (slice(y0, y0 + cam.cell_ny), slice(x0, x0 + cam.cell_nx))
        return out

    def live_mask(self) -> np.ndarray:
        """Bool stitched-chip array, True on cell pixels."""
        cam = self.camera
        if getattr(self, "_live", None) is None:
            live = np.zeros((cam.chip_ny, cam.chip_nx), bool)
            for sy, sx in self.cell_slices().values():
                live[sy, sx] = True
            live.setflags(write=False)
            self._live = live
        return self._live

    # ------------------------------------------------------------------ chip signatures
    def chip(self, chip: str) -> ChipSignature:
        """Signatures of ``chip`` (generated on first use and cached: up to 8 chips of a small
        camera, one chip of a large one)."""
        name = self.camera.chip(chip).name
        if name not in self._cache:
            # keep every chip of a small camera; one at a time of a big one (memory)
            keep = 8 if self.camera.chip_nx * self.camera.chip_ny < 4_000_000 else 1
            while len(self._cache) >= keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = self._make_chip(name)
        return self._cache[name]

    def _make_chip(self, chip: str) -> ChipSignature:
        cam = self.camera
        c = self.chip_index(chip)
        rng = np.random.default_rng([self.seed, 12, c])
        ny, nx = cam.chip_ny, cam.chip_nx
        live = self.live_mask()
        slices = self.cell_slices()
        # ---- flat: vignetting x QE x low-frequency structure x pixel noise
        X, _ = cam.chip_to_focal(chip, np.arange(nx, dtype=np.float64), np.zeros(1))
        _, Y = cam.chip_to_focal(chip, np.zeros(1), np.arange(ny, dtype=np.float64))
        flat = self._vignetting_separable(X, Y)
        xs = np.arange(nx, dtype=np.float64)
        ys = np.arange(ny, dtype=np.float64)
        # low-frequency structure: 1 + sum_k amp_k cos(a_k(x) + b_k(y)); with
        # cos(a + b) = cos a cos b - sin a sin b it is one matrix product (rank 13)
        rows, cols = [np.ones(ny)], [np.ones(nx)]
        for _ in range(6):
            lam = rng.uniform(0.3, 1.5) * max(nx, ny)
            ang = rng.uniform(0, np.pi)
            ph = rng.uniform(0, 2 * np.pi)
            amp = rng.normal(0, 0.004)
            a = 2 * np.pi * np.cos(ang) / lam * xs + ph
            b = 2 * np.pi * np.sin(ang) / lam * ys
            rows += [amp * np.cos(b), -amp * np.sin(b)]
            cols += [np.cos(a), np.sin(a)]
        L = np.stack(rows, axis=1).astype(np.float32)
        Rm = np.stack(cols, axis=0).astype(np.float32)
        band = 512                          # row bands: small temporaries on a GPC1 chip
        for a in range(0, ny, band):
            flat[a:a + band] *= L[a:a + band] @ Rm
            noise = rng.standard_normal((min(band, ny - a), nx), dtype=np.float32)
            noise *= np.float32(0.008)
            noise += np.float32(1.0)
            flat[a:a + band] *= noise
        del noise
        for k, cell in enumerate(cam.cell_names):
            flat[slices[cell]] *= np.float32(self._qe[c, k])
        # ---- dark current (e-/s): log-normal pixel scatter + amplifier glow + hot pixels/columns
        dark = np.empty((ny, nx), np.float32)
        for a in range(0, ny, band):
            d = dark[a:a + band]
            d[...] = rng.standard_normal(d.shape, dtype=np.float32)
            d *= np.float32(0.3)
            np.exp(d, out=d)
        dark *= np.float32(cam.dark_current)
        cy, cx = np.mgrid[0:cam.cell_ny, 0:cam.cell_nx]
        glow = (0.3 * np.exp(-np.hypot(cx, cy) / 40.0)).astype(np.float32)
        for cell in cam.cell_names:
            dark[slices[cell]] += glow
        n_hot = rng.poisson(1e-4 * live.sum())
        hy, hx = rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot)
        dark[hy, hx] += (10 ** rng.uniform(np.log10(2.0), 2.0, n_hot)).astype(np.float32)
        for _ in range(rng.poisson(0.3)):
            cell = cam.cell_names[rng.integers(len(cam.cell_names))]
            sy, sx = slices[cell]
            dark[sy, sx.start + rng.integers(cam.cell_nx)] += np.float32(rng.uniform(1.5, 5.0))
        # ---- bad columns: from a trap to the top of the cell the response is low
        bad_columns = []
        for cell in cam.cell_names:
            for _ in range(rng.poisson(0.15)):
                xc = int(rng.integers(cam.cell_nx))
                ys0 = int(rng.integers(0, cam.cell_ny // 2))
                resp = float(rng.uniform(0.0, 0.3))
                sy, sx = slices[cell]
                flat[sy.start + ys0:sy.stop, sx.start + xc] *= np.float32(resp)
                bad_columns.append((cell, xc, ys0, resp))
        # ---- dead cells and gaps
        dead = self.dead_cells(chip)
        for cell in dead:                   # a dead cell records neither light nor dark current
            flat[slices[cell]] = 0.0
            dark[slices[cell]] = 0.0
        flat[~live] = 0.0
        dark[~live] = 0.0
        defects = np.zeros((ny, nx), np.uint16)
        for a in range(0, ny, band):
            sl = slice(a, a + band)
            defects[sl][((flat[sl] < 0.5) | (dark[sl] > 1.0)) & live[sl]] |= maskbits.DETECTOR
        for cell in dead:
            defects[slices[cell]] |= maskbits.DEAD_CELL
        defects[~live] = maskbits.GAP
        # ---- residual bias pattern per raw cell (ADU)
        rny, rnx = cam.raw_cell_shape
        y0, y1, x0, x1 = cam.datasec
        bias_pattern = {}
        for cell in cam.cell_names:
            pat = np.zeros((rny, rnx), np.float32)
            amp = rng.uniform(4.0, 15.0)
            colpat = rng.normal(0.0, 0.7, x1 - x0)
            ramp = amp * np.exp(-np.arange(x1 - x0) / 15.0) + colpat
            pat[y0:y1, x0:x1] = ramp[None, :].astype(np.float32)
            bias_pattern[cell] = pat
        return ChipSignature(chip=chip, cells=self.electronics(chip), flat=flat, dark=dark, defects=defects,
                             bias_pattern=bias_pattern, live=live, dead_cells=dead, bad_columns=bad_columns)

    def _thickness(self, chip: str) -> np.ndarray:
        """Fringe phase map (cycles) of a chip: its detector-thickness variations (cached)."""
        cache = self.__dict__.setdefault("_thick", {})
        if chip not in cache:
            keep = 8 if self.camera.chip_nx * self.camera.chip_ny < 4_000_000 else 1
            while len(cache) >= keep:
                cache.pop(next(iter(cache)))
            cache[chip] = self._make_thickness(chip)
        return cache[chip]

    def _make_thickness(self, chip: str) -> np.ndarray:
        cam = self.camera
        c = self.chip_index(chip)
        rng = np.random.default_rng([self.seed, 13, c])
        ny, nx = cam.chip_ny, cam.chip_nx
        xs = np.arange(nx, dtype=np.float64)
        ys = np.arange(ny, dtype=np.float64)
        # a thickness wedge (fringes 60-120 px apart) plus smooth bumps; the phase is in cycles
        spacing = rng.uniform(60.0, 120.0)
        ang = rng.uniform(0, 2 * np.pi)
        rows = [np.ones(ny), ys * np.sin(ang) / spacing]
        cols = [xs * np.cos(ang) / spacing, np.ones(nx)]
        for _ in range(5):
            lam = rng.uniform(300.0, 3000.0)
            ang = rng.uniform(0, np.pi)
            ph = rng.uniform(0, 2 * np.pi)
            amp = lam / rng.uniform(150.0, 300.0) / (2 * np.pi) / np.sqrt(5.0)
            a = 2 * np.pi * np.cos(ang) / lam * xs + ph
            b = 2 * np.pi * np.sin(ang) / lam * ys
            # amp cos(a + b) = amp (cos a cos b - sin a sin b): a low-rank product
            rows += [amp * np.cos(b), -amp * np.sin(b)]
            cols += [np.cos(a), np.sin(a)]
        return (np.stack(rows, axis=1) @ np.stack(cols, axis=0)).astype(np.float32)

    def fringe_pattern(self, chip: str, band: str) -> np.ndarray:
        """Fringe pattern of ``chip`` in ``band`` as a fraction of the sky level (float32), or
        None for a filter without fringes.

        ``amp * cos(2 pi phase(x, y) * 962 nm / lambda)``: the same detector-thickness map for
        every filter, the phase scaled by the wavelength; 0 in gaps.
        """
        amp = FRINGE_AMP.get(band, 0.0)
        cam = self.camera
        if amp == 0.0:
            return None
        scale = FILTER_WAVELENGTH["y"] / FILTER_WAVELENGTH[band]
        pat = np.float32(amp) * np.cos(np.float32(2 * np.pi * scale) * self._thickness(cam.chip(chip).name))
        pat[~self.live_mask()] = 0.0
        return pat.astype(np.float32)


@dataclass
class ExposeResult:
    """Raw cells of one chip exposure and the truth of the detector effects.

    Attributes
    ----------
    cells : dict[str, ndarray]
        Raw cells (ADU, uint16 as digitised, raw-cell shape including overscan).
    mask : ndarray
        uint16 stitched-chip truth bits: SAT, BLEED, CR, CROSSTALK (plus the static defects).
    cosmic_rays : ndarray
        Table of the cosmic-ray hits.
    """

    cells: dict[str, np.ndarray]
    mask: np.ndarray
    cosmic_rays: np.ndarray


def expose_chip(inst: Instrument, chip: str, light_e: np.ndarray, *, exptime: float, dark_time: float,
                rng: np.random.Generator, cosmic_rays: bool = True, crosstalk: bool = True,
                mask_threshold: float = 10.0, bias_drift: float = 3.0, row_noise: float = 2.0) -> ExposeResult:
    """Expose one chip: light (e-, unit response) -> raw cells (ADU). ``light_e`` is overwritten.

    Parameters
    ----------
    inst : Instrument
    chip : str
    light_e : ndarray
        ``(chip_ny, chip_nx)`` float32 electrons a unit-response detector would collect (sky,
        sources, fringes, scattered light); used as work space (overwritten).
    exptime : float
        Exposure time (s) (the light is already integrated over it).
    dark_time : float
        Dark time (s) for the dark current and cosmic rays.
    rng : Generator
        Noise source for this exposure and chip.
    cosmic_rays, crosstalk : bool
        Include these effects.
    mask_threshold : float
        Crosstalk images adding more than this many ADU are marked CROSSTALK in the truth mask.
    bias_drift : float
        Rms change of each cell's bias level from exposure to exposure (ADU).
    row_noise : float
        Rms of the row-to-row bias pattern (ADU), correlated over ~5 rows, common to the data
        and the overscan of the row.

    Returns
    -------
    ExposeResult
    """
    cam = inst.camera
    sig = inst.chip(chip)
    if light_e.shape != (cam.chip_ny, cam.chip_nx):
        raise ValueError(f"light_e: shape {light_e.shape} is not the chip shape {(cam.chip_ny, cam.chip_nx)}")
    e = light_e
    e *= sig.flat
    e += sig.dark * np.float32(dark_time)
    np.maximum(e, 0.0, out=e)
    # Poisson noise: exact for small means, Gaussian for large ones (in bands of rows, to keep
    # the temporaries small on a full GPC1 chip)
    band = 512
    for a in range(0, e.shape[0], band):
        eb = e[a:a + band]
        small = eb < 30.0
        lam_small = eb[small]
        z = rng.standard_normal(eb.shape, dtype=np.float32)
        z *= np.sqrt(eb)
        eb += z
        eb[small] = rng.poisson(lam_small).astype(np.float32)
    del z, small, lam_small
    np.maximum(e, 0.0, out=e)
    mask = sig.defects.copy()
    cr_tab = np.zeros(0, dtype=[("x", "f4"), ("y", "f4"), ("x2", "f4"), ("y2", "f4"), ("charge", "f4")])
    if cosmic_rays:
        thr_cr = 5.0 * float(np.median([c.read_noise * c.gain for c in sig.cells.values()]))
        idx, dep, cr_tab = add_cosmic_rays(e, rng, exptime=dark_time, pixel_size_um=cam.pixel_size_um,
                                           model=inst.cosmic_rays, live=sig.live)
        mask.flat[idx[dep > thr_cr]] |= maskbits.CR
    slices = inst.cell_slices()
    adu = {}
    for cell in cam.cell_names:
        sy, sx = slices[cell]
        el = sig.cells[cell]
        block = e[sy, sx]
        sat, bled = bleed_columns(block, el.full_well)
        mask[sy, sx][sat] |= maskbits.SAT
        mask[sy, sx][bled] |= maskbits.BLEED
        # electrons -> ADU in place (the chip array is not needed in electrons any more)
        block[...] = el.to_adu(block)
        adu[cell] = block
    if crosstalk:
        # victims receive coeff x the source's signal; a source that is itself a victim has
        # already received its own crosstalk, a second-order (coeff^2 ~ 1e-7) effect
        for dst in cam.cell_names:
            rules = [(src, c) for src, d, c in inst.crosstalk if d == dst]
            if not rules:
                continue
            a = np.zeros((cam.cell_ny, cam.cell_nx), np.float32)
            for src, coeff in rules:
                a += np.float32(coeff) * adu[src]
            med = np.float32(np.median(a[::4, ::4]))
            sy, sx = slices[dst]
            mask[sy, sx][(a - med) > mask_threshold] |= maskbits.CROSSTALK
            adu[dst] += a
    rny, rnx = cam.raw_cell_shape
    y0, y1, x0, x1 = cam.datasec
    cells = {}
    for cell in cam.cell_names:
        el = sig.cells[cell]
        raw = np.empty((rny, rnx), np.float32)
        raw[:] = np.float32(el.bias_level + rng.normal(0.0, bias_drift))
        raw += sig.bias_pattern[cell]
        rows = ndimage.gaussian_filter1d(rng.normal(0.0, 1.0, rny + 40), 3.0)[20:-20]
        rows *= row_noise / max(float(np.std(rows)), 1e-6)
        raw += rows.astype(np.float32)[:, None]
        raw += np.float32(el.read_noise) * rng.standard_normal((rny, rnx), dtype=np.float32)
        raw[y0:y1, x0:x1] += adu[cell]
        # digitise: the ADC rounds to integers in 0..65535
        np.rint(raw, out=raw)
        np.clip(raw, 0.0, 65535.0, out=raw)
        cells[cell] = raw.astype(np.uint16)
    del adu, e
    return ExposeResult(cells=cells, mask=mask, cosmic_rays=cr_tab)
