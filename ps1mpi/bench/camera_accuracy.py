"""Camera accuracy: the camera stage's calibration of simulated exposures against their truth.

The simulator (``ps1mpi.sim``, preset ``tiny`` on the test camera by default) renders every
chip of each exposure and gives its truth: the sources with their true positions and fluxes,
and a truth mask marking the pixels its optical ghosts, glints, diffraction spikes and
crosstalk images brighten by more than half the sky noise. Detections are made from the truth
stars with the errors of a PSF fit (Cramer-Rao bound of a Gaussian PSF of the exposure's
seeing on its sky: ``sigma_x^2 = s^2 / F (1 + 8 pi s^2 b / F)``, ``sigma_m = 1.0857 / SNR``),
saturated stars flagged; the reference catalog is the simulator's (``make_refcat``). Each
exposure is calibrated ``--trials`` times with the header pointing moved by a random offset of
up to ``--max-offset`` arcmin (uniform in the disc) and up to 0.3 deg of rotation, and fresh
measurement noise, through
:func:`ps1mpi.stages.camera.calibrate_exposure` (the stage's own fit, without files or MPI).

Figures:
- ``solved_fraction``: trials with quality 0;
- ``astrom_rms_mas`` / ``astrom_bias_mas``: RMS and mean (per axis) of calibrated minus true
  positions of bright unsaturated stars (S/N > 50), and ``astrom_over_crlb`` the RMS over the
  RMS of their Cramer-Rao bounds;
- ``zp_err_mmag``: RMS of ZPT_OBS minus the true zero point (mag for 1 e-/s);
- ``artefact_masked_fraction``: truth artefact pixels (ghost, glint, spike, crosstalk) covered
  by the dynamic masks; ``good_masked_fraction``: other good pixels masked (star-core circles
  excluded: masking the halo of a saturated star is intended); per kind as well
  (``good_masked_by_kind``: the wrongly masked pixels by the dynamic bit that covers them). The
  masks are the camera stage's, with its default rules (``default_rules(camera)``: the camera's
  ``<camera>_masks.toml``, the same table the simulator placed its artefacts with) and the
  bright stars and detection limits of the calibration.
JSON keys: astrom_rms_mas, astrom_over_crlb, zp_err_mmag, solved_fraction,
artefact_masked_fraction, good_masked_fraction (and details).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ..algorithms import maskbits
from ..algorithms.dynamic_masks import BrightStars, default_rules, dynamic_mask_for_chip
from ..stages.camera import DET_DTYPE, calibrate_exposure
from .common import emit

__all__ = ["run", "detections_from_truth"]

ARTEFACT_BITS = {"ghost": maskbits.GHOST, "glint": maskbits.GLINT, "spike": maskbits.SPIKE,
                 "crosstalk": maskbits.CROSSTALK}


def detections_from_truth(truth: np.ndarray, chip_index: int, *, pixel_scale: float,
                          sky_e: float, read_noise_e: float, rng: np.random.Generator,
                          snr_min: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Detections of the truth stars of one chip with PSF-fit errors.

    Returns the detections (:data:`DET_DTYPE`) and the truth rows they come from.
    """
    st = truth[(truth["KIND"] == 0) & (truth["FLUX"] > 0)]
    s = st["PSF_FWHM"].astype(float) / 2.3548 / pixel_scale
    F = st["FLUX"].astype(float)
    b = sky_e + read_noise_e ** 2
    snr = F / np.sqrt(F + 4 * math.pi * s ** 2 * b)
    keep = snr > snr_min
    st, s, F, snr = st[keep], s[keep], F[keep], snr[keep]
    pos = np.sqrt(s ** 2 / F * (1 + 8 * math.pi * s ** 2 * b / F))
    det = np.zeros(st.size, DET_DTYPE)
    det["chip"] = chip_index
    det["row"] = np.arange(st.size)
    det["x"] = st["X"] + rng.normal(0, 1, st.size) * pos
    det["y"] = st["Y"] + rng.normal(0, 1, st.size) * pos
    det["x_err"] = det["y_err"] = pos
    fm = F * (1 + rng.normal(0, 1, st.size) / snr)
    with np.errstate(invalid="ignore", divide="ignore"):
        det["mag"] = np.where(fm > 0, -2.5 * np.log10(fm), np.nan)
    det["mag_err"] = 1.0857 / snr
    det["flags"] = np.where(st["SATURATED"] != 0, 0x10, 0)
    return det, st


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark (see the module docstring); returns the JSON result."""
    p = argparse.ArgumentParser(prog="ps1mpi bench camera-accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--camera", default="testcam")
    p.add_argument("--exposures", type=int, default=4, help="exposures simulated (max)")
    p.add_argument("--trials", type=int, default=5, help="header pointings per exposure")
    p.add_argument("--max-offset", type=float, default=5.0, help="pointing error (arcmin)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    from ..sim.catalogs import make_refcat
    from ..sim.exposure import exposure_context, simulate_chip
    from ..sim.survey import survey_setup

    t_all = time.perf_counter()
    pre, cam, inst, plan, sky, dist = survey_setup(preset=args.preset, camera=args.camera,
                                                   seed=args.seed)
    refcat = make_refcat(sky, seed=args.seed)
    names = list(cam.chip_names)
    X0, X1, Y0, Y1 = cam.focal_plane_extent()
    field_deg = math.hypot(max(abs(X0), X1), max(abs(Y0), Y1)) * cam.pixel_scale / 3600.0
    fit_radius = field_deg * 1.25 + 6.0 / 60.0
    rng = np.random.default_rng([args.seed, 99])
    rows = plan[: args.exposures]
    res_ast, crlb, zp_err, solved, trials = [], [], [], 0, 0
    kinds = {k: [0, 0] for k in list(ARTEFACT_BITS) + ["all"]}
    good = [0, 0]
    good_kind = {k: 0 for k in ARTEFACT_BITS}
    t_sim = t_cal = 0.0
    for row in rows:
        band = row["band"].decode()
        t0 = time.perf_counter()
        ctx = exposure_context(row, inst=inst, sky=sky, distortion=dist)
        chips = {}
        for k, chip in enumerate(names):
            chips[chip] = simulate_chip(ctx, chip, rng=np.random.default_rng(
                [args.seed, 71, int(row["exp_index"]), k]))
        t_sim += time.perf_counter() - t0
        rn_e = cam.read_noise * cam.gain
        exptime = float(row["exptime"])
        mjd_mid = float(row["mjd"]) + 0.5 * exptime / 86400.0
        for t in range(args.trials):
            trials += 1
            parts, truths = [], []   # fresh measurement noise for every trial
            for k, chip in enumerate(names):
                d, st = detections_from_truth(chips[chip].truth, k, pixel_scale=cam.pixel_scale,
                                              sky_e=float(row["sky_e"]), read_noise_e=rn_e,
                                              rng=rng)
                parts.append(d)
                truths.append(st)
            det = np.concatenate(parts)
            tru = np.concatenate(truths)
            r = args.max_offset * 60.0 * math.sqrt(rng.uniform())
            phi = rng.uniform(0, 2 * math.pi)
            from ..geometry.focalplane import gnomonic_inverse
            hra, hdec = gnomonic_inverse(math.radians(r * math.sin(phi) / 3600.0),
                                         math.radians(r * math.cos(phi) / 3600.0),
                                         float(row["ra"]), float(row["dec"]))
            hpa = float(row["pa"]) + rng.uniform(-0.3, 0.3)
            cd = math.cos(math.radians(float(hdec)))
            sep = np.hypot((refcat["RA"] - float(hra)) * cd, refcat["DEC"] - float(hdec))
            ref = refcat[sep < fit_radius + 0.3]
            t0 = time.perf_counter()
            rules = default_rules(cam)
            cal = calibrate_exposure(det, ref, camera=cam, guess=(float(hra), float(hdec), hpa),
                                     mjd=mjd_mid, filter=band, exptime=exptime, rules=rules,
                                     astrometry_radius_deg=fit_radius)
            t_cal += time.perf_counter() - t0
            if cal.quality:
                print(f"{row['expname'].decode()} trial {t}: quality {cal.quality}: "
                      f"{cal.reason}", flush=True)
                continue
            solved += 1
            sol, zp = cal.astrometry, cal.zero_point
            zp_err.append(zp.zp_per_second - float(row["zp"]))
            # calibrated positions of bright unsaturated stars
            snr = 1.0857 / det["mag_err"]
            sel = np.flatnonzero((snr > 50) & (det["flags"] == 0))
            for c in np.unique(det["chip"][sel]):
                s = sel[det["chip"][sel] == c]
                ra, dec = sol.pixel_to_sky(names[c], det["x"][s], det["y"][s])
                cdt = np.cos(np.radians(tru["DEC"][s]))
                res_ast.append(np.column_stack([
                    ((ra - tru["RA"][s] + 180) % 360 - 180) * cdt * 3.6e6,
                    (dec - tru["DEC"][s]) * 3.6e6]))
                crlb.append(det["x_err"][s] * cam.pixel_scale * 1000.0)
            if t:
                continue    # the masks depend little on the trial: measure them once
            stars = BrightStars(cal.stars[:, 0], cal.stars[:, 1], cal.stars[:, 2])
            for k, chip in enumerate(names):
                tm = chips[chip].truth_mask
                lim = cal.limits[k]
                dyn = dynamic_mask_for_chip(chip, tm.shape, stars, camera=cam, rules=rules,
                                            filter=band,
                                            detection_limit_mag=None if not np.isfinite(lim)
                                            else float(lim)) if len(stars) else \
                    np.zeros(tm.shape, np.uint16)
                art_all = (tm & sum(ARTEFACT_BITS.values())) != 0
                covered = dyn != 0
                for kind, bit in ARTEFACT_BITS.items():
                    a = (tm & bit) != 0
                    kinds[kind][0] += int(np.count_nonzero(a & covered))
                    kinds[kind][1] += int(np.count_nonzero(a))
                kinds["all"][0] += int(np.count_nonzero(art_all & covered))
                kinds["all"][1] += int(np.count_nonzero(art_all))
                ok = ~art_all & ((tm & maskbits.STATIC) == 0)
                err = ok & ((dyn & ~np.uint16(maskbits.STARCORE)) != 0)
                good[0] += int(np.count_nonzero(err))
                good[1] += int(np.count_nonzero(ok))
                for kind, bit in ARTEFACT_BITS.items():
                    good_kind[kind] += int(np.count_nonzero(err & ((dyn & bit) != 0)))
    res = np.concatenate(res_ast) if res_ast else np.zeros((0, 2))
    bound = np.concatenate(crlb) if crlb else np.zeros(0)
    rms_axis = float(np.sqrt(np.mean(res ** 2))) if res.size else float("nan")
    crlb_axis = float(np.sqrt(np.mean(bound ** 2))) if bound.size else float("nan")
    frac = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in kinds.items()}
    good_frac = good[0] / good[1] if good[1] else float("nan")
    result = {
        "preset": args.preset, "camera": args.camera, "exposures": int(rows.size),
        "trials": trials, "max_offset_arcmin": args.max_offset,
        "solved_fraction": solved / trials if trials else float("nan"),
        "astrom_rms_mas": rms_axis, "astrom_crlb_mas": crlb_axis,
        "astrom_over_crlb": rms_axis / crlb_axis if crlb_axis > 0 else float("nan"),
        "astrom_bias_mas": [float(v) for v in res.mean(axis=0)] if res.size else None,
        "n_bright_stars": int(res.shape[0]),
        "zp_err_mmag": float(np.sqrt(np.mean(np.square(zp_err)))) * 1000 if zp_err
        else float("nan"),
        "zp_bias_mmag": float(np.mean(zp_err)) * 1000 if zp_err else float("nan"),
        "artefact_masked_fraction": frac["all"],
        "good_masked_fraction": good_frac,
        "artefact_masked_by_kind": frac,
        "artefact_pixels": {k: v[1] for k, v in kinds.items()},
        "good_masked_by_kind": {k: (v / good[1] if good[1] else float("nan"))
                                for k, v in good_kind.items()},
        "sim_s": t_sim, "calibrate_s_per_trial": t_cal / max(trials, 1),
        "wall_s": time.perf_counter() - t_all,
    }
    print(f"{trials} calibrations of {rows.size} {args.camera} exposures, pointing errors up to "
          f"{args.max_offset}': solved {result['solved_fraction']:.0%}", flush=True)
    print(f"astrometry of {result['n_bright_stars']} bright-star measurements: RMS "
          f"{rms_axis:.2f} mas per axis, bound {crlb_axis:.2f} mas, ratio "
          f"{result['astrom_over_crlb']:.3f}; zero point RMS error {result['zp_err_mmag']:.2f} "
          f"mmag", flush=True)
    print("dynamic masks (default rules): truth artefact pixels covered " + ", ".join(
        f"{k} {v:.1%} of {kinds[k][1]}" for k, v in frac.items()) + f"; good pixels masked "
        f"{good_frac:.3%} (" + ", ".join(f"{k} {v / max(good[1], 1):.3%}"
                                         for k, v in good_kind.items()) + ")", flush=True)
    return emit(result)
