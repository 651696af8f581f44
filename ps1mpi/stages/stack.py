"""stack: co-add the warps of a skycell and filter (ppStack), assembled across a group of ranks.

One unit of work is one stack: skycell x filter x kind x label (``stackRun`` with one
``stackSumSkyfile`` element). See ``docs/warp-stack-stages.md``.

define (rank 0)
    For every skycell and filter whose warps are all finished (every ``warpRun`` holding one of
    its warps is DONE, so nothing is pending or faulted), create the stacks of the kinds the
    campaign asks for (``stack_kinds`` of the campaign definition) from the good-quality warps
    (:func:`stack_sets`): ``deep`` (all, label ``all``), ``nightly`` (one per night, label the
    night's MJD), ``best_seeing`` (the best-FWHM part, label ``all``) and ``out_of_season``
    (everything but one season, label ``s<first night of the season>``). Warps whose PSF FWHM
    exceeds ``stack.max_fwhm_pixels`` skycell pixels are left out of every kind; a stack needs
    ``stack.min_inputs`` inputs. A stack is defined once.
process (a group of ``stack.group_size`` ranks)
    The leader reads the inputs' headers (weights ``1 / MEDVAR``, exposure times) and
    broadcasts them; every rank reads only its band of rows of every input (plus ``grow`` rows
    of context) with fitsio, rejects outliers (:func:`ps1mpi.algorithms.combine.reject_outliers`);
    the per-input rejected counts are summed over the group (Allreduce) so that the inputs to
    drop are decided once; each rank combines its band
    (:func:`ps1mpi.algorithms.combine.combine_images`) and the leader gathers the bands
    (Gatherv, buffers) and writes image, variance, mask, number map, exposure-time map, the
    inputs table and a PNG preview, image last. Every pixel's value depends only on the inputs
    at that pixel (and the ``grow`` neighbours of rejections), with sums in a fixed order, so the
    stack is bit-for-bit the same whatever the number of ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..algorithms import maskbits
from ..algorithms.combine import (combine_images, compute_input_weights, inputs_to_drop,
                                  reject_outliers)
from ..infra.config import RecipeError, Recipe
from ..infra.ledger import Ledger
from ..infra.products import atomic_outputs
from ..infra.runtime import DataError, Outcome, WorkUnit
from ..infra.schema import State
from ..infra.world import World
from .base import Stage, StageContext
from .warp import WarpStage, fits_cards, read_image, write_image

__all__ = ["StackStage", "StackAssembly", "STACK_KINDS", "stack_sets", "assemble_stack",
           "stack_depth", "preview_image", "build_stage"]

STACK_KINDS = ("nightly", "deep", "best_seeing", "out_of_season")

_BYTES_PER_INPUT_PIXEL = 16  # image + variance + mask as read, plus the rejection flags


# ------------------------------------------------------------------------------ input sets

def stack_sets(mjd: np.ndarray, fwhm: np.ndarray, *, kinds: Sequence[str] = STACK_KINDS,
               night_boundary_day: float = 0.0, season_gap_days: float = 90.0,
               best_seeing_fraction: float = 0.5, best_seeing_max_fwhm: float = 1.3,
               min_inputs: int = 2) -> dict[tuple[str, str], np.ndarray]:
    """Which inputs go into which stack.

    Parameters
    ----------
    mjd : ndarray
        MJD of each (good) input warp (days).
    fwhm : ndarray
        PSF FWHM of each input (arcsec).
    kinds : sequence of str, optional
        Stack kinds wanted (``nightly``, ``deep``, ``best_seeing``, ``out_of_season``).
    night_boundary_day : float, optional
        A night is ``floor(mjd - night_boundary_day)`` (days).
    season_gap_days : float, optional
        Nights more than this apart (days) belong to different seasons.
    best_seeing_fraction : float, optional
        Best-seeing stacks keep the ``ceil(fraction * n)`` inputs of smallest FWHM ...
    best_seeing_max_fwhm : float, optional
        ... whose FWHM is at most this (arcsec).
    min_inputs : int, optional
        Stacks with fewer inputs are not made.

    Returns
    -------
    dict
        ``(kind, label) -> sorted input indices``. Labels: ``all`` (deep, best_seeing), the
        night (nightly), ``s<first night of the season>`` (out_of_season: all inputs *not* in
        that season; only when there are at least two seasons).
    """
    mjd = np.asarray(mjd, dtype=np.float64)
    fwhm = np.asarray(fwhm, dtype=np.float64)
    if mjd.shape != fwhm.shape or mjd.ndim != 1:
        raise ValueError(f"stack_sets: mjd {mjd.shape} and fwhm {fwhm.shape} must be 1-D "
                         "arrays of one length")
    unknown = [k for k in kinds if k not in STACK_KINDS]
    if unknown:
        raise RecipeError(f"stack kinds {unknown} unknown; known: {', '.join(STACK_KINDS)}")
    if not 0 < best_seeing_fraction <= 1:
        raise RecipeError(f"stack.best_seeing_fraction must be in (0, 1], got "
                          f"{best_seeing_fraction}")
    if not season_gap_days > 0:
        raise RecipeError(f"stack.season_gap_days must be positive, got {season_gap_days}")
    out: dict[tuple[str, str], np.ndarray] = {}
    n = mjd.size
    if n == 0:
        return out
    idx = np.arange(n)
    nights = np.floor(mjd - night_boundary_day).astype(np.int64)
    if "deep" in kinds:
        out[("deep", "all")] = idx
    if "nightly" in kinds:
        for night in np.unique(nights):
            out[("nightly", str(int(night)))] = idx[nights == night]
    if "best_seeing" in kinds:
        ok = np.flatnonzero(np.isfinite(fwhm))
        order = ok[np.argsort(fwhm[ok], kind="stable")]
        keep = order[:int(math.ceil(best_seeing_fraction * ok.size))]
        keep = keep[fwhm[keep] <= best_seeing_max_fwhm]
        out[("best_seeing", "all")] = np.sort(keep)
    if "out_of_season" in kinds:
        un = np.unique(nights)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(un) > season_gap_days) + 1])
        if starts.size >= 2:
            first_night = un[starts]
            season = np.searchsorted(first_night, nights, side="right") - 1
            for s, first in enumerate(first_night):
                out[("out_of_season", f"s{int(first)}")] = idx[season != s]
    return {k: v for k, v in out.items() if v.size >= max(1, int(min_inputs))}


# ------------------------------------------------------------------------------ assembly

@dataclass
class StackAssembly:
    """A stack assembled by :func:`assemble_stack` (arrays on the root rank only).

    Attributes
    ----------
    image, variance, mask, n_inputs, exptime_map : ndarray or None
        Stack products (``combine_images`` conventions); None on other ranks.
    dropped : tuple of int
        Inputs dropped for too many rejected pixels.
    reject_fraction : ndarray
        First-pass rejected fraction of each input's usable pixels, whole image.
    rejected_pixels, valid_pixels : ndarray of int64
        Final rejected and usable pixel counts per input, whole image.
    rejected : ndarray of bool or None
        Per-input final rejection masks (only with ``keep_rejected``, on the root).
    t_read, t_combine : float
        Seconds reading and rejecting/combining, slowest rank.
    t_gather : float
        Seconds in the collectives on this rank (counts and bands).
    n_ranks : int
        Ranks that assembled the stack.
    """

    image: np.ndarray | None
    variance: np.ndarray | None
    mask: np.ndarray | None
    n_inputs: np.ndarray | None
    exptime_map: np.ndarray | None
    dropped: tuple[int, ...]
    reject_fraction: np.ndarray
    rejected_pixels: np.ndarray
    valid_pixels: np.ndarray
    rejected: np.ndarray | None
    t_read: float
    t_combine: float
    t_gather: float
    n_ranks: int


def _band_bounds(ny: int, nparts: int, part: int) -> tuple[int, int]:
    edges = np.linspace(0, ny, nparts + 1).round().astype(int)
    return int(edges[part]), int(edges[part + 1])


def _agree_or_raise(world: World, error: BaseException | None, what: str) -> None:
    if not world.agree(error is None):
        if error is not None:
            raise error
        raise DataError(f"stack: a peer rank failed while {what}")


def assemble_stack(world: World, read_rows: Callable[[int, int, int], tuple], n_inputs: int,
                   shape: tuple[int, int], *, weights: np.ndarray,
                   exptimes: np.ndarray | None = None, reject_sigma: float = 3.5,
                   grow: int = 1, max_reject_fraction: float = 0.1, sys_error: float = 0.1,
                   discard_fraction: float = 0.2, iterations_per_input: float = 0.5,
                   safe: bool = True, max_band_mb: float = 2048.0,
                   bad_bits: int = maskbits.BAD, keep_rejected: bool = False,
                   root: int = 0) -> StackAssembly:
    """Combine inputs across the ranks of ``world``, each rank a band of rows (collective).

    Parameters
    ----------
    world : World
        The ranks assembling this stack (a group; one rank is fine).
    read_rows : callable
        ``read_rows(i, r0, r1) -> (image, variance, mask)``: rows ``r0:r1`` of input ``i``.
    n_inputs : int
        Number of inputs.
    shape : (ny, nx)
        Image size (pixels).
    weights : ndarray, shape (n_inputs,)
        One weight per input (1 / median variance), identical on every rank.
    exptimes : ndarray, optional
        Exposure times (s) for the exposure-time map.
    reject_sigma, grow, max_reject_fraction, sys_error, discard_fraction, iterations_per_input, safe
        Rejection options (see :func:`ps1mpi.algorithms.combine.combine_images`).
    max_band_mb : float, optional
        Memory budget (MB) for the input rows a rank holds at once; a larger band is processed
        in pieces.
    bad_bits : int, optional
        Mask bits of unusable input pixels.
    keep_rejected : bool, optional
        Also gather the per-input rejection masks on the root (for tests and benchmarks).
    root : int, optional
        Rank that receives the stack.

    Returns
    -------
    StackAssembly
    """
    ny, nx = (int(v) for v in shape)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n_inputs,):
        raise ValueError(f"assemble_stack: {weights.size} weights for {n_inputs} inputs")
    grow = int(grow)
    r0, r1 = _band_bounds(ny, world.size, world.rank)
    rows_per_piece = max(1, int(max_band_mb * 1e6 // (_BYTES_PER_INPUT_PIXEL * n_inputs * nx)))
    pieces = [(a, min(a + rows_per_piece, r1)) for a in range(r0, r1, rows_per_piece)]
    opts = dict(weights=weights, reject_sigma=reject_sigma, sys_error=sys_error,
                discard_fraction=discard_fraction, iterations_per_input=iterations_per_input,
                grow=grow, safe=safe, bad_bits=bad_bits)

    def read(p0: int, p1: int):
        lo, hi = max(p0 - grow, 0), min(p1 + grow, ny)
        imgs, vars_, msks = [], [], []
        for i in range(n_inputs):
            a, v, m = read_rows(i, lo, hi)
            if a.shape != (hi - lo, nx) or v.shape != a.shape or m.shape != a.shape:
                raise DataError(f"input {i}: rows {lo}:{hi} read with shapes {a.shape}, "
                                f"{v.shape}, {m.shape}; expected {(hi - lo, nx)}")
            imgs.append(np.asarray(a, np.float32))
            vars_.append(np.asarray(v, np.float32))
            msks.append(np.asarray(m).astype(np.uint16, copy=False))
        return imgs, vars_, msks, (p0 - lo, hi - p1)

    t_read = t_comb = t_coll = 0.0
    # pass 1: rejection on every piece, per-input counts
    n_rej = np.zeros(n_inputs, np.int64)
    n_val = np.zeros(n_inputs, np.int64)
    kept = None
    error: BaseException | None = None
    try:
        for p0, p1 in pieces:
            t = time.perf_counter()
            imgs, vars_, msks, halo = read(p0, p1)
            t_read += time.perf_counter() - t
            t = time.perf_counter()
            first = reject_outliers(imgs, vars_, msks, halo=halo, **opts)
            t_comb += time.perf_counter() - t
            n_rej += first.n_rejected
            n_val += first.n_valid
            if len(pieces) == 1:
                kept = (imgs, vars_, msks, halo, first)
    except Exception as err:  # noqa: BLE001 - every rank must learn of it (agree below)
        error = err
    t = time.perf_counter()
    _agree_or_raise(world, error, "reading and rejecting")
    counts = world.allreduce(np.concatenate([n_rej, n_val]))
    t_coll += time.perf_counter() - t
    n_rej, n_val = counts[:n_inputs], counts[n_inputs:]
    drop = inputs_to_drop(n_rej, n_val, max_reject_fraction=max_reject_fraction)

    # pass 2: combination of every piece with the drop decision taken over the whole image
    band = {k: [] for k in ("image", "variance", "mask", "n", "exp")}
    rej_bands: list[np.ndarray] = []
    fin_rej = np.zeros(n_inputs, np.int64)
    fin_val = np.zeros(n_inputs, np.int64)
    try:
        for p0, p1 in pieces:
            if kept is not None:
                imgs, vars_, msks, halo, first = kept
            else:
                t = time.perf_counter()
                imgs, vars_, msks, halo = read(p0, p1)
                t_read += time.perf_counter() - t
                first = None
            t = time.perf_counter()
            res = combine_images(imgs, vars_, msks, exptimes=exptimes, dropped=drop,
                                 rejection=first, halo=halo,
                                 max_reject_fraction=max_reject_fraction, **opts)
            t_comb += time.perf_counter() - t
            band["image"].append(res.image)
            band["variance"].append(res.variance)
            band["mask"].append(res.mask)
            band["n"].append(res.n_inputs)
            band["exp"].append(res.exptime_map if res.exptime_map is not None
                               else np.zeros(res.image.shape, np.float32))
            fin_rej += res.rejected_mask.reshape(n_inputs, -1).sum(axis=1)
            ok = np.zeros(n_inputs, np.int64)
            for i in range(n_inputs):
                if i in drop or weights[i] <= 0:
                    continue
                m = msks[i][halo[0]:msks[i].shape[0] - halo[1]]
                v = vars_[i][halo[0]:vars_[i].shape[0] - halo[1]]
                a = imgs[i][halo[0]:imgs[i].shape[0] - halo[1]]
                ok[i] = np.count_nonzero(((m & bad_bits) == 0) & (v > 0) & np.isfinite(v)
                                         & np.isfinite(a))
            fin_val += ok
            if keep_rejected:
                rej_bands.append(res.rejected_mask)
        kept = None
    except Exception as err:  # noqa: BLE001
        error = err
    t = time.perf_counter()
    _agree_or_raise(world, error, "combining")

    def stacked(key: str, dtype) -> np.ndarray:
        parts = band[key]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, nx), dtype)

    out = {}
    for key, dtype in (("image", np.float32), ("variance", np.float32), ("mask", np.uint16),
                       ("n", np.uint16), ("exp", np.float32)):
        out[key] = world.gatherv(stacked(key, dtype).astype(dtype, copy=False), root=root)
    rejected = None
    if keep_rejected:
        mine = (np.concatenate(rej_bands, axis=1) if rej_bands
                else np.zeros((n_inputs, 0, nx), bool))
        flat = np.ascontiguousarray(np.moveaxis(mine, 1, 0)).astype(np.uint8)
        full = world.gatherv(flat, root=root)
        if full is not None:
            rejected = np.moveaxis(full.astype(bool), 0, 1)
    totals = world.allreduce(np.concatenate([fin_rej, fin_val]))
    t_coll += time.perf_counter() - t
    times = world.allreduce(np.array([t_read, t_comb]), op="max")
    is_root = world.rank == root
    return StackAssembly(
        image=out["image"] if is_root else None, variance=out["variance"] if is_root else None,
        mask=out["mask"] if is_root else None, n_inputs=out["n"] if is_root else None,
        exptime_map=out["exp"] if (is_root and exptimes is not None) else None,
        dropped=drop, reject_fraction=n_rej / np.maximum(n_val, 1),
        rejected_pixels=totals[:n_inputs], valid_pixels=totals[n_inputs:], rejected=rejected,
        t_read=float(times[0]), t_combine=float(times[1]), t_gather=t_coll, n_ranks=world.size)


# ------------------------------------------------------------------------------ products

def stack_depth(variance: np.ndarray, mask: np.ndarray, *, fwhm_pixels: float,
                covariance_factor: float = 1.0, zero_point: float = 25.0,
                bad_bits: int = maskbits.BAD) -> float:
    """5-sigma point-source depth of an image.

    The flux error of optimal (PSF-weighted) photometry of a Gaussian PSF of width ``sigma``
    on a background of per-pixel variance ``v`` is ``sqrt(4 pi sigma**2 v)`` (noise-equivalent
    area ``4 pi sigma**2``); ``covariance_factor`` corrects the per-pixel variance of a
    resampled image to the variance seen on the PSF's scale.

    Parameters
    ----------
    variance, mask : ndarray
        Variance (flux squared at ``zero_point``) and mask of the image.
    fwhm_pixels : float
        PSF FWHM (pixels).
    covariance_factor : float, optional
        Large-scale to per-pixel noise variance ratio.
    zero_point : float, optional
        Zero point (mag for one unit of flux).
    bad_bits : int, optional
        Mask bits of unusable pixels.

    Returns
    -------
    float
        Magnitude of a point source detected at 5 sigma (median variance); NaN if undefined.
    """
    good = ((mask & bad_bits) == 0) & (variance > 0) & np.isfinite(variance)
    if not good.any() or not (fwhm_pixels > 0) or not (covariance_factor > 0):
        return float("nan")
    sigma = fwhm_pixels / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    nea = 4.0 * math.pi * sigma * sigma
    noise = math.sqrt(nea * float(np.median(variance[good])) * covariance_factor)
    return zero_point - 2.5 * math.log10(5.0 * noise)


def preview_image(image: np.ndarray, mask: np.ndarray, *, size: int = 512,
                  bad_bits: int = maskbits.BAD) -> np.ndarray:
    """An 8-bit preview: block-averaged to at most ``size`` pixels a side, asinh-stretched
    between the sky (median - 2 sigma) and the 99.8th percentile, North up (row 0 at the top
    is the highest skycell row), unusable blocks dark grey.

    Returns
    -------
    ndarray of uint8, shape (py, px)
    """
    ny, nx = image.shape
    f = max(1, int(math.ceil(max(ny, nx) / max(1, int(size)))))
    py, px = -(-ny // f), -(-nx // f)
    good = ((mask & bad_bits) == 0) & np.isfinite(image)
    val = np.zeros((py * f, px * f))
    cnt = np.zeros((py * f, px * f))
    val[:ny, :nx] = np.where(good, image, 0.0)
    cnt[:ny, :nx] = good
    s = val.reshape(py, f, px, f).sum(axis=(1, 3))
    c = cnt.reshape(py, f, px, f).sum(axis=(1, 3))
    have = c > 0
    blk = np.where(have, s / np.maximum(c, 1), 0.0)
    out = np.full((py, px), 40, np.uint8)
    if have.any():
        v = blk[have]
        med = float(np.median(v))
        sig = 1.4826 * float(np.median(np.abs(v - med))) or float(np.std(v)) or 1.0
        lo = med - 2.0 * sig
        hi = max(float(np.percentile(v, 99.8)), lo + 10.0 * sig)
        t = np.arcsinh((blk - lo) / sig) / np.arcsinh((hi - lo) / sig)
        out[have] = (np.clip(t[have], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out[::-1]


# ------------------------------------------------------------------------------ the stage

class StackStage(Stage):
    """Stack the warps of each skycell and filter (see the module docstring).

    Parameters
    ----------
    group_size : int, optional
        Ranks per stack (default: the packaged recipe's ``stack.group_size``).
    """

    name = "stack"
    run_table = "stackRun"
    element_table = "stackSumSkyfile"
    inputs = ("warpRun", "warpSkyfile")
    _stem = "stack/{skycell}/{skycell}.{filter}.{kind}.{label}"
    outputs = {
        "variance": _stem + ".stk.wt.fits",
        "mask": _stem + ".stk.mk.fits",
        "num": _stem + ".stk.num.fits",
        "exp": _stem + ".stk.exp.fits",
        "inputs": _stem + ".inputs.fits",
        "preview": _stem + ".png",
        "image": _stem + ".stk.fits",
    }
    group_size = 2

    def __init__(self, group_size: int | None = None) -> None:
        if group_size is None:
            from ..infra.config import default_recipe
            group_size = int(default_recipe().get("stack.group_size"))
        if int(group_size) != group_size or group_size < 1:
            raise RecipeError(f"stack.group_size must be a positive integer, got {group_size!r}")
        self.group_size = int(group_size)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "StackStage":
        """The stage with the recipe's ``stack.group_size``."""
        return cls(group_size=int(recipe.get("stack.group_size")))

    # ------------------------------------------------------------------ input selection
    @staticmethod
    def _kinds(ledger: Ledger) -> tuple[str, ...]:
        kinds = tuple(ledger.campaign.get("stack_kinds", STACK_KINDS))
        unknown = [k for k in kinds if k not in STACK_KINDS]
        if unknown:
            raise RecipeError(f"{ledger.path}: campaign stack_kinds {unknown} unknown; known: "
                              f"{', '.join(STACK_KINDS)}")
        return kinds

    def _groups(self, ledger: Ledger, ctx: StageContext, skycells: np.ndarray | None = None):
        """Good warps grouped by (skycell, filter), with whether each group is ready; only
        the warps of ``skycells`` when given."""
        rows = None
        if skycells is not None:
            rows = np.flatnonzero(np.isin(ledger.column("warpSkyfile", "skycell"), skycells))
        ws = ledger.read("warpSkyfile", rows, ["run", "state", "quality", "skycell", "filter",
                                               "mjd", "fwhm", "exp_name", "exptime", "ra",
                                               "dec"])
        ws["row"] = rows if rows is not None else np.arange(ws["run"].size)
        if ws["run"].size == 0:
            return ws, []
        run_state = ledger.column("warpRun", "state")
        run_quality = ledger.column("warpRun", "quality")
        run_done = run_state[ws["run"]] == State.DONE
        tess = WarpStage._tessellation(ctx)
        max_px = float(ctx.recipe.get("stack.max_fwhm_pixels"))
        with np.errstate(invalid="ignore"):
            seeing_ok = np.isfinite(ws["fwhm"]) & (ws["fwhm"] / tess.pixel_scale <= max_px)
        usable = ((ws["state"] == State.DONE) & (ws["quality"] == 0)
                  & (run_quality[ws["run"]] == 0) & run_done & seeing_ok)
        keys = np.char.add(np.char.add(ws["skycell"], b"|"), ws["filter"])
        order = np.argsort(keys, kind="stable")
        uk, start = np.unique(keys[order], return_index=True)
        ends = np.append(start[1:], order.size)
        groups = []
        for k, a, b in zip(uk, start, ends):
            members = order[a:b]
            ready = bool(run_done[members].all())
            groups.append((k, ready, members[usable[members]]))
        return ws, groups

    def _sets(self, ctx: StageContext, kinds, mjd, fwhm) -> dict:
        r = ctx.recipe["stack"]
        return stack_sets(mjd, fwhm, kinds=kinds, night_boundary_day=r["night_boundary_day"],
                          season_gap_days=r["season_gap_days"],
                          best_seeing_fraction=r["best_seeing_fraction"],
                          best_seeing_max_fwhm=r["best_seeing_max_fwhm"],
                          min_inputs=r["min_inputs"])

    # ------------------------------------------------------------------ define (rank 0)
    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Create the stacks of every skycell and filter whose warps are all finished."""
        if ledger.nrows("warpSkyfile") == 0:
            return 0
        kinds = self._kinds(ledger)
        ws, groups = self._groups(ledger, ctx)
        sr = ledger.read(self.run_table, None, ["skycell", "filter", "kind", "label"])
        existing = set(zip(sr["skycell"].tolist(), sr["filter"].tolist(), sr["kind"].tolist(),
                           sr["label"].tolist()))
        new: dict[str, list] = {c: [] for c in ("skycell", "filter", "kind", "label", "ra",
                                                 "dec", "n")}
        for key, ready, members in groups:
            if not ready or members.size == 0:
                continue
            cell, filt = key.split(b"|", 1)
            sets = self._sets(ctx, kinds, ws["mjd"][members], ws["fwhm"][members])
            for (kind, label), sel in sorted(sets.items()):
                k = (cell, filt, kind.encode(), label.encode())
                if k in existing:
                    continue
                existing.add(k)
                for col, val in zip(new, (cell, filt, kind, label, ws["ra"][members[0]],
                                          ws["dec"][members[0]], sel.size)):
                    new[col].append(val)
        n = len(new["skycell"])
        if n == 0:
            return 0
        cols = {c: new[c] for c in ("skycell", "filter", "kind", "label", "ra", "dec")}
        runs = ledger.append(self.run_table, n, **cols)
        ledger.transition(self.run_table, runs, State.RUN,
                          message=[f"{k} input warps" for k in new["n"]])
        rows = ledger.append(self.element_table, n, run=runs, **cols)
        ledger.transition(self.element_table, rows, State.NEW, message="defined")
        return n

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending stacks with their inputs (the same selection as :meth:`define`)."""
        rows = ledger.pending(self.element_table,
                              retry_cap=int(ctx.recipe.get("runtime.retry_cap")))
        if rows.size == 0:
            return []
        el = ledger.read(self.element_table, rows, ["skycell", "filter", "kind", "label", "ra",
                                                    "dec"])
        kinds = self._kinds(ledger)
        ws, groups = self._groups(ledger, ctx, np.unique(el["skycell"]))
        by_key = {key: members for key, _, members in groups}
        cache: dict[bytes, dict] = {}
        out = []
        for i, r in enumerate(rows):
            key = el["skycell"][i] + b"|" + el["filter"][i]
            members = by_key.get(key, np.zeros(0, np.int64))
            if key not in cache:
                cache[key] = self._sets(ctx, kinds, ws["mjd"][members], ws["fwhm"][members])
            kind, label = el["kind"][i].decode(), el["label"][i].decode()
            sel = members[cache[key].get((kind, label), np.zeros(0, np.int64))]
            sel = sel[np.lexsort((ws["exp_name"][sel], ws["mjd"][sel]))]
            cell, filt = el["skycell"][i].decode(), el["filter"][i].decode()
            inputs = [{"exp_name": ws["exp_name"][j].decode(), "mjd": float(ws["mjd"][j]),
                       "warp_row": int(ws["row"][j])} for j in sel]
            out.append(WorkUnit(self.element_table, int(r), f"{cell}.{filt}.{kind}.{label}",
                                float(el["ra"][i]), float(el["dec"][i]),
                                cost=float(max(1, len(inputs))),
                                info={"skycell": cell, "filter": filt, "kind": kind,
                                      "label": label, "inputs": inputs}))
        return out

    # ------------------------------------------------------------------ process (group)
    def _warp_paths(self, ctx: StageContext, exp_name: str, skycell: str) -> dict[str, Path]:
        keys = dict(exp_name=exp_name, skycell=skycell)
        return {k: ctx.root / WarpStage.outputs[k].format(**keys)
                for k in ("image", "variance", "mask")}

    def _input_meta(self, ctx: StageContext, info: dict) -> dict:
        """Leader: the inputs' header values (weights, exposure times, FWHM, ...)."""
        import fitsio

        if not info["inputs"]:
            raise DataError(f"stack {info['skycell']} {info['filter']} {info['kind']} "
                            f"{info['label']}: no input warp is left")
        rows = []
        shape = None
        for inp in info["inputs"]:
            paths = self._warp_paths(ctx, inp["exp_name"], info["skycell"])
            if not paths["image"].is_file():
                raise FileNotFoundError(f"{paths['image']}: input warp is missing")
            h = fitsio.read_header(str(paths["image"]), 0)
            s = (int(h["NAXIS2"]), int(h["NAXIS1"]))
            if shape is None:
                shape = s
            elif s != shape:
                raise DataError(f"{paths['image']}: {s[1]}x{s[0]} pixels, other inputs are "
                                f"{shape[1]}x{shape[0]}")
            if float(h.get("ZPT", float("nan"))) != float(ctx.recipe.get("warp.zero_point")):
                raise DataError(f"{paths['image']}: zero point ZPT {h.get('ZPT')} is not "
                                f"warp.zero_point {ctx.recipe.get('warp.zero_point')}")
            medvar = float(h.get("MEDVAR", -1.0))
            if not medvar > 0:  # not recorded: measure it on the whole warp
                w = compute_input_weights([read_image(paths["variance"])],
                                          [read_image(paths["mask"])])[0]
                medvar = 1.0 / w if w > 0 else float("inf")
            rows.append({"exp_name": inp["exp_name"], "warp": str(paths["image"].relative_to(ctx.root)),
                         "mjd": float(h.get("MJD-OBS", inp["mjd"])),
                         "exptime": float(h.get("EXPTIME", 0.0)),
                         "fwhm": float(h.get("FWHM", -1.0)), "medvar": medvar,
                         "covfact": float(h.get("COVFACT", 1.0))})
        return {"shape": shape, "inputs": rows}

    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Assemble one stack across the group and write it on the leader."""
        group = ctx.world
        rec = ctx.recipe["stack"]
        info = unit.info
        meta = None
        local_error: BaseException | None = None
        if group.rank == 0:
            try:
                meta = self._input_meta(ctx, info)
            except Exception as err:  # noqa: BLE001 - shared with the group below
                local_error = err
                meta = {"error": f"{type(err).__name__}: {err}"}
        meta = group.bcast_object(meta)
        if "error" in meta:
            raise local_error if local_error is not None else DataError(
                f"stack leader could not read the inputs: {meta['error']}")
        rows = meta["inputs"]
        n = len(rows)
        shape = tuple(meta["shape"])
        weights = np.array([1.0 / r["medvar"] if np.isfinite(r["medvar"]) else 0.0
                            for r in rows])
        exptimes = np.array([r["exptime"] for r in rows])
        files = [self._warp_paths(ctx, r["exp_name"], info["skycell"]) for r in rows]

        def read_rows(i: int, r0: int, r1: int):
            return (read_image(files[i]["image"], (r0, r1)),
                    read_image(files[i]["variance"], (r0, r1)),
                    read_image(files[i]["mask"], (r0, r1)))

        asm = assemble_stack(group, read_rows, n, shape, weights=weights, exptimes=exptimes,
                             reject_sigma=float(rec["reject_sigma"]), grow=int(rec["grow"]),
                             max_reject_fraction=float(rec["max_reject_fraction"]),
                             sys_error=float(rec["sys_error"]),
                             discard_fraction=float(rec["discard_fraction"]),
                             iterations_per_input=float(rec["iterations_per_input"]),
                             safe=bool(rec["safe"]), max_band_mb=float(rec["max_band_mb"]))
        if group.rank != 0:
            return Outcome()
        return self._write(ctx, info, rows, weights, asm)

    def _write(self, ctx: StageContext, info: dict, rows: list[dict], weights: np.ndarray,
               asm: StackAssembly) -> Outcome:
        import fitsio
        from PIL import Image

        t0 = time.perf_counter()
        rec = ctx.recipe["stack"]
        tess = WarpStage._tessellation(ctx)
        cell = tess.skycell(info["skycell"])
        zp = float(ctx.recipe.get("warp.zero_point"))
        n = len(rows)
        used = np.ones(n, bool)
        used[list(asm.dropped)] = False
        used &= weights > 0
        w = np.where(used, weights, 0.0)
        fwhm = np.array([r["fwhm"] for r in rows])
        cov = np.array([r["covfact"] for r in rows])
        okf = used & (fwhm > 0)
        fwhm_st = float(np.sum(w[okf] * fwhm[okf]) / np.sum(w[okf])) if okf.any() else float("nan")
        okc = used & (cov > 0)
        cov_st = float(np.sum(w[okc] * cov[okc]) / np.sum(w[okc])) if okc.any() else 1.0
        depth = stack_depth(asm.variance, asm.mask, fwhm_pixels=fwhm_st / tess.pixel_scale,
                            covariance_factor=cov_st, zero_point=zp)
        good_frac = float(np.mean((asm.mask & maskbits.BAD) == 0))
        mjds = np.array([r["mjd"] for r in rows])[used]
        meta = dict(
            FILTER=(info["filter"], "filter"), STK_KIND=(info["kind"], "stack kind"),
            STK_LBL=(info["label"], "night, season or all"),
            ZPT=(zp, "[mag] m = ZPT - 2.5 log10(flux)"),
            NINPUTS=(int(used.sum()), "input warps combined"),
            NDROPPED=(len(asm.dropped), "inputs dropped: too many rejected pixels"),
            EXPTIME=(float(np.sum(np.array([r["exptime"] for r in rows])[used])),
                     "[s] total exposure time of the inputs"),
            MJD_OBS=(float(mjds.min()) if mjds.size else float("nan"), "[d] first input"),
            MJD_END=(float(mjds.max()) if mjds.size else float("nan"), "[d] last input"),
            FWHM=(fwhm_st, "[arcsec] weighted mean input PSF FWHM"),
            COVFACT=(cov_st, "large-scale/per-pixel noise variance"),
            DEPTH5=(depth, "[mag] 5-sigma point-source depth"),
            GOODFRAC=(good_frac, "fraction of good pixels"),
            NRANKS=(asm.n_ranks, "ranks that assembled the stack"),
        )
        cards = fits_cards(cell.header(), **meta)
        keys = dict(skycell=info["skycell"], filter=info["filter"], kind=info["kind"],
                    label=info["label"])
        paths = {k: self.product_path(ctx, k, **keys) for k in self.outputs}
        table = np.zeros(n, dtype=[("EXP_NAME", "S24"), ("WARP", "S160"), ("MJD", "f8"),
                                   ("EXPTIME", "f4"), ("FWHM", "f4"), ("WEIGHT", "f8"),
                                   ("MEDVAR", "f8"), ("COVFACT", "f4"), ("USED", "i2"),
                                   ("DROPPED", "i2"), ("REJ_FRAC1", "f4"), ("REJ_PIX", "i8"),
                                   ("VALID_PIX", "i8")])
        for j, r in enumerate(rows):
            table[j] = (r["exp_name"], r["warp"], r["mjd"], r["exptime"], r["fwhm"], weights[j],
                        r["medvar"], r["covfact"], int(used[j]), int(j in asm.dropped),
                        asm.reject_fraction[j], asm.rejected_pixels[j], asm.valid_pixels[j])
        with atomic_outputs(paths) as tmp:
            write_image(tmp["variance"], asm.variance, cards + [{"name": "BUNIT", "value": "flux^2 (ZPT)"}])
            write_image(tmp["mask"], asm.mask, cards + [{"name": "BUNIT", "value": "mask bits"}])
            write_image(tmp["num"], asm.n_inputs, cards + [{"name": "BUNIT", "value": "inputs"}])
            write_image(tmp["exp"], asm.exptime_map, cards + [{"name": "BUNIT", "value": "s"}])
            fitsio.write(str(tmp["inputs"]), table, extname="INPUTS",
                         header=fits_cards(None, SKYCELL=info["skycell"], **meta), clobber=True)
            Image.fromarray(preview_image(asm.image, asm.mask, size=int(rec["preview_size"])),
                            "L").save(tmp["preview"], format="PNG")
            write_image(tmp["image"], asm.image, cards + [{"name": "BUNIT", "value": "flux (ZPT)"}])
        t_write = time.perf_counter() - t0
        summary = {"n_inputs": int(used.sum()), "n_rejected_inputs": int(n - used.sum()),
                   "depth_5sigma": depth, "good_frac": good_frac, "label": info["label"],
                   "fwhm": fwhm_st, "n_ranks": asm.n_ranks, "t_read": asm.t_read,
                   "t_combine": asm.t_combine, "t_gather": asm.t_gather, "t_write": t_write}
        return Outcome(summary=summary)


def build_stage(campaign: Any, recipe: Recipe) -> StackStage:
    """Campaign builder: the stack stage with the recipe's group size."""
    return StackStage.from_recipe(recipe)
