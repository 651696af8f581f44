"""Simulator rendering and camera model: PSF, galaxies, artefacts, detector signatures."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits, masters
from ps1mpi.geometry.camera import load_camera
from ps1mpi.sim import psf as P
from ps1mpi.algorithms.dynamic_masks import (BrightStars, artifacts_for_chip, default_rules,
                                             paint_artifacts)
from ps1mpi.sim.artefacts import (ArtefactLight, CosmicRayModel, add_cosmic_rays, bleed_columns,
                                  crosstalk_rules, placement_rules, render_artifact)
from ps1mpi.sim.instrument import Instrument, expose_chip

CAM = load_camera("testcam")


def _moments(st):
    n = st.shape[0]
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    f = st.sum()
    cx, cy = (st * xx).sum() / f, (st * yy).sum() / f
    ixx = (st * (xx - cx) ** 2).sum() / f
    iyy = (st * (yy - cy) ** 2).sum() / f
    ixy = (st * (xx - cx) * (yy - cy)).sum() / f
    return cx, cy, ixx, iyy, ixy


def test_psf_stamp_flux_centroid_and_fwhm():
    psf = P.ExposurePSF(seeing=1.1, beta=3.0, wing_frac=0.06, field_radius=1000.0)
    fw = psf.core_fwhm / psf.pixel_scale
    st, ix, iy = P.render_point_stamps(np.array([50.3, 60.0]), np.array([40.8, 61.5]), np.array([fw, fw]),
                                       np.zeros(2), np.zeros(2), psf=psf, radius=320)
    # unit total flux (the wing beyond 320 px holds < 1e-4)
    np.testing.assert_allclose(st.sum(axis=(1, 2)), 1.0, atol=4e-4)
    cx, cy, *_ = _moments(st[0][300:341, 300:341] * 0 + st[0][300:341, 300:341])
    assert ix[0] + cx == pytest.approx(50.3, abs=0.02) and iy[0] + cy == pytest.approx(40.8, abs=0.02)
    # composite FWHM: half-maximum radius of the pixel-integrated profile ~ seeing (pixel
    # integration broadens it slightly)
    fine = P.render_point_stamps(np.array([0.0]), np.array([0.0]), np.array([fw]), np.zeros(1), np.zeros(1),
                                 psf=psf, radius=20)[0][0]
    prof = fine[20, 20:]
    r_half = np.interp(0.5 * prof[0], prof[::-1], np.arange(prof.size)[::-1])
    assert 2 * r_half * psf.pixel_scale == pytest.approx(1.1, rel=0.06)
    assert P.composite_fwhm(psf.core_fwhm, beta=3.0, wing_frac=0.06, wing_scale=2.5, wing_beta=2.5) == \
        pytest.approx(1.1, rel=1e-6)


def test_psf_ellipticity_orientation_and_field_dependence():
    psf = P.ExposurePSF(seeing=1.0, e1=0.0, e2=0.0, astig=0.05, fwhm_radial=0.2, field_radius=1000.0)
    fw0, e1, e2 = psf.at_focal(np.array([0.0, 1000.0, 0.0]), np.array([0.0, 0.0, 1000.0]))
    assert fw0[1] == pytest.approx(1.2 * fw0[0]) and e1[1] == pytest.approx(0.05) and e1[2] == pytest.approx(-0.05)
    st, _, _ = P.render_point_stamps(np.zeros(2), np.zeros(2), np.full(2, 4.0), np.array([0.2, 0.0]),
                                     np.array([0.0, 0.2]), psf=psf, radius=25)
    _, _, ixx, iyy, ixy = _moments(st[0])
    assert ixx > 1.3 * iyy and abs(ixy) < 0.02 * ixx          # e1 > 0: elongated along x
    _, _, ixx, iyy, ixy = _moments(st[1])
    assert ixy > 0.2 * ixx and abs(ixx - iyy) < 0.05 * ixx     # e2 > 0: along x = y
    # a chip with one flipped axis sees e2 reversed
    assert P.shape_to_chip(0.1, 0.05, -1, 1)[1] == pytest.approx(-0.05)
    assert P.shape_to_chip(0.1, 0.05, -1, -1)[1] == pytest.approx(0.05)


def test_galaxy_stamps():
    psf = P.ExposurePSF(seeing=1.0, field_radius=1000.0)
    fw = psf.core_fwhm / psf.pixel_scale
    n = np.array([1.0, 4.0, 1.0])
    re = np.array([6.0, 3.0, 0.05])
    q = np.array([0.4, 0.8, 1.0])
    theta = np.array([np.pi / 2, 0.0, 0.0])
    st, ix, iy, trunc = P.render_galaxy_stamps(np.zeros(3), np.zeros(3), n, re, q, theta, np.full(3, fw),
                                               np.zeros(3), np.zeros(3), psf=psf, radius=64)
    # flux: the truncated profile is normalised; the PSF beyond the stamp is lost (~1e-3)
    np.testing.assert_allclose(st.sum(axis=(1, 2)), 1.0, atol=3e-3)
    assert trunc[0] == pytest.approx(30.0) and trunc[1] == pytest.approx(24.0)
    _, _, ixx, iyy, _ = _moments(st[0])
    assert iyy > 2.5 * ixx                                    # major axis along y (theta = 90 deg)
    # an unresolved galaxy is the PSF
    pt, _, _ = P.render_point_stamps(np.zeros(1), np.zeros(1), np.array([fw]), np.zeros(1), np.zeros(1),
                                     psf=psf, radius=64)
    assert np.abs(st[2] - pt[0]).max() < 0.01 * pt[0].max()
    assert P.sersic_bn(1.0) == pytest.approx(1.678, abs=1e-3) and P.sersic_bn(4.0) == pytest.approx(7.669, abs=1e-3)


def test_bleed_conserves_charge_and_stays_in_column():
    cell = np.full((200, 50), 1000.0)
    cell[95:105, 20] = 150000.0                    # a saturated core, 10 px long
    cell[100, 21] = 80000.0                        # a small overflow next to it
    cell[150, 40] = 61000.0                        # just over the full well
    total = cell.sum()
    fw = 60000.0
    sat, bled = bleed_columns(cell, fw)
    assert cell.max() <= fw + 1e-6
    assert cell.sum() == pytest.approx(total)
    assert sat[95:105, 20].all() and sat[100, 21] and sat[150, 40]
    # 10 x 90000 e- of excess fill 900000 / 59000 = 15.3 px at 59000 e- of room each, half above
    # and half below the saturated run
    col = cell[:, 20]
    assert (col >= fw - 1e-3).sum() in (24, 25)          # 7 full pixels each side + partial ones
    assert bled[88:95, 20].all() and bled[105:112, 20].all()
    assert not bled[:85, 20].any() and not bled[116:, 20].any()
    assert not bled[:, 0:19].any() and not bled[:, 23:39].any()


def test_cosmic_rays_deposit_their_charge():
    img = np.zeros((300, 300), np.float32)
    rng = np.random.default_rng(3)
    model = CosmicRayModel(rate=5.0)
    idx, dep, tab = add_cosmic_rays(img, rng, exptime=100.0, pixel_size_um=10.0, model=model)
    expect = 5.0 * 300 * 300 * 1e-6 * 100
    assert abs(tab.size - expect) < 5 * np.sqrt(expect)
    inside = ((tab["x"] > 1) & (tab["x"] < 298) & (tab["y"] > 1) & (tab["y"] < 298) & (tab["x2"] > 1)
              & (tab["x2"] < 298) & (tab["y2"] > 1) & (tab["y2"] < 298))
    assert img.sum() <= tab["charge"].sum() * (1 + 1e-5)
    assert img.sum() >= tab["charge"][inside].sum() * (1 - 1e-5)
    np.testing.assert_allclose(img.flat[idx], dep)
    # ~80 e- per micron through 75 micron: several thousand e- per hit
    assert 3000 < np.median(tab["charge"]) < 20000


def test_artefacts_are_placed_by_the_rule_table_and_drawn_inside_their_footprints():
    """The simulator's ghosts, glints and spikes sit where the camera's rule table (the camera
    stage's masks) puts them, carry the light ArtefactLight gives them, and no light falls
    outside the masked shapes."""
    rules = default_rules(CAM)
    place = placement_rules(rules)
    light = ArtefactLight()
    xmin, xmax, ymin, ymax = CAM.focal_plane_extent()
    # a bright star in the field (spikes, ghost at -p) and one 100 px beyond the top edge (glint)
    X = np.array([450.0, 300.0])
    Y = np.array([-400.0, ymax + 100.0])
    m = np.array([-21.0, -22.0])
    F = 10 ** (-0.4 * m)
    stars = BrightStars(X, Y, m)
    drawn = {"ghost": 0.0, "glint": 0.0, "spike": 0.0}
    glint_peak = 0.0
    for chip in CAM.chip_names:
        img = np.zeros((CAM.chip_ny, CAM.chip_nx), np.float32)
        for a in artifacts_for_chip(chip, img.shape, stars, camera=CAM, rules=place, filter="r"):
            pieces = render_artifact(img, a, F[a.source], light=light, band="r")
            painted = paint_artifacts(np.zeros(img.shape, np.uint16), [a]) != 0
            for sy, sx, add in pieces:
                assert painted[sy, sx][add > 0].all(), f"{a.kind} light outside its mask on {chip}"
                if a.kind in drawn and (a.kind != "spike" or a.source == 0):
                    drawn[a.kind] += float(add.sum(dtype=np.float64))
        xx, yy = np.meshgrid(np.arange(CAM.chip_nx, dtype=float), np.arange(CAM.chip_ny, dtype=float))
        Xc, Yc = CAM.chip_to_focal(chip, xx, yy)
        # the glint runs straight down from the star, 80 px wide: nothing beyond 40 px of X = 300
        # (away from the spikes: star 0's at Y = -400, star 1's reach 459 px below it)
        streak = (np.abs(Xc - 300.0) < 30) & (Yc > 0) & (Yc < ymax - 470)
        if streak.any():
            glint_peak = max(glint_peak, float(img[streak].max()))
        far = (np.abs(Xc - 300.0) > 40.5) & (np.hypot(Xc - 450.0, Yc + 400.0) > 700) \
            & (np.hypot(Xc + 450.0, Yc - 400.0) > 50)
        assert not img[far].any()
    # ghost: the testcam's fixed doughnut (r 20-45 px) at -p holds its flux fraction, less the
    # soft edges (3 px ramps inside the annulus lose half their light)
    area = np.pi * (45.0 ** 2 - 20.0 ** 2)
    edge_loss = np.pi * light.ghost_edge * (45.0 + 20.0) / area
    assert drawn["ghost"] == pytest.approx(F[0] * light.ghost_flux_fraction["r"] * (1 - edge_loss), rel=0.02)
    # glint: flat top at glint_sb times the star's flux per px^2
    assert glint_peak == pytest.approx(light.glint_sb * F[1], rel=1e-3)
    # star 0's spikes: four rays of the rule's length (all on the chips), line density
    # k F / (d + d0)^2 from d0, less the taper
    L = 10 ** (0.096 * (7.35 + 21.0)) - 200.0
    d = np.arange(light.spike_d0, L, 0.01)
    t = np.clip((L - d) / (light.spike_taper * L), 0, 1)
    line = np.sum(light.spike_k * F[0] / (d + light.spike_d0) ** 2 * t * t * (3 - 2 * t)) * 0.01
    assert drawn["spike"] == pytest.approx(4 * line, rel=0.05)


def test_instrument_signatures():
    inst = Instrument(CAM, seed=4)
    live = inst.live_mask()
    means = []
    for chip in CAM.chip_names:
        s = inst.chip(chip)
        good = s.flat[live & (s.defects == 0)]
        means.append(good.mean())
        assert (s.flat[~live] == 0).all() and (s.defects[~live] == maskbits.GAP).all()
        for cell in s.dead_cells:
            sy, sx = inst.cell_slices()[cell]
            assert (s.flat[sy, sx] == 0).all() and (s.defects[sy, sx] & maskbits.DEAD_CELL).all()
    # the flat is normalised to a mean of 1 over the camera
    assert np.mean(means) == pytest.approx(1.0, abs=0.01)
    assert sum(len(inst.dead_cells(c)) for c in CAM.chip_names) >= 1
    rules = crosstalk_rules(CAM)
    assert ("xy00", "xy01", 5e-4) in rules and ("xy11", "xy10", 5e-4) in rules and len(rules) == 4
    fr = inst.fringe_pattern("XY00", "y")
    assert fr.std() > 0.015 and inst.fringe_pattern("XY00", "r") is None
    # the same thickness map in z, with the phase scaled by the wavelength: correlated, not equal
    fz = inst.fringe_pattern("XY00", "z")
    assert 0.005 < fz.std() < fr.std()


def test_expose_chip_signal_chain():
    inst = Instrument(CAM, seed=5)
    chip = "XY10"
    sig = inst.chip(chip)
    light = np.full((CAM.chip_ny, CAM.chip_nx), 2000.0, np.float32)
    cy, cx = CAM.cell_origin("xy00")[1] + 200, CAM.cell_origin("xy00")[0] + 200
    light[cy - 3:cy + 4, cx - 3:cx + 4] = 4e5             # saturating blob in cell xy00
    res = expose_chip(inst, chip, light.copy(), exptime=30.0, dark_time=30.0, rng=np.random.default_rng(1),
                      cosmic_rays=False)
    cam = CAM
    assert all(v.dtype == np.uint16 and v.shape == cam.raw_cell_shape for v in res.cells.values())
    el = sig.cells["xy10"]
    # overscan-corrected, linearised, in electrons, flat-fielded: the light comes back
    d = masters.overscan_correct(res.cells["xy10"].astype(np.float32), datasec=cam.datasec, biassec=cam.biassec)
    s_adu = d - sig.bias_pattern["xy10"][0:400, 0:400]
    # invert m = s (1 - a (s/S)^2) by iteration
    s = s_adu.copy()
    for _ in range(5):
        s = s_adu / (1 - el.nonlin * (s / el.linear_range) ** 2)
    x0, y0 = cam.cell_origin("xy10")
    flat = sig.flat[y0:y0 + 400, x0:x0 + 400]
    e = s * el.gain - sig.dark[y0:y0 + 400, x0:x0 + 400] * 30.0
    ok = flat > 0.5
    ratio = e[ok] / flat[ok] / 2000.0
    assert np.median(ratio) == pytest.approx(1.0, abs=0.005)
    # noise: Poisson + read noise (+ 1 ADU quantisation) + the row pattern left by the 3-row overscan
    expect = np.sqrt(2000.0 * np.median(flat) + (el.read_noise * el.gain) ** 2) / 2000.0
    assert np.std(ratio) == pytest.approx(expect, rel=0.15)
    # saturation: the blob is clipped at the full well and bleeds along its columns
    raw00 = res.cells["xy00"].astype(np.float32)
    assert raw00[200, 200] >= inst.electronics(chip)["xy00"].saturate
    assert res.mask[cy, cx] & maskbits.SAT
    assert (res.mask[cy - 30:cy + 30, cx] & maskbits.BLEED).sum() > 20
    # crosstalk: the blob appears in the paired cell xy01 at the same cell coordinates
    d01 = masters.overscan_correct(res.cells["xy01"].astype(np.float32), datasec=cam.datasec, biassec=cam.biassec)
    bump = np.median(d01[197:204, 197:204]) - np.median(d01[150:170, 150:170])
    src = np.median(raw00[197:204, 197:204]) - inst.electronics(chip)["xy00"].bias_level
    assert bump == pytest.approx(5e-4 * src, rel=0.3)
    ys, xs = CAM.cell_origin("xy01")[1] + 200, CAM.cell_origin("xy01")[0] + 200
    assert res.mask[ys, xs] & maskbits.CROSSTALK


def test_crosstalk_between_chips_is_drawn_where_the_rules_put_it():
    """A coupling the instrument cannot apply cell by cell (from chip column 1 into chip column
    0) is drawn as the image of the bright stars, at the place and strength of the rule, and
    the camera stage's mask from the same rule covers it."""
    from dataclasses import replace

    from ps1mpi.algorithms.dynamic_masks import CrosstalkRule, dynamic_mask_for_chip
    from ps1mpi.sim.exposure import exposure_context, simulate_chip
    from ps1mpi.sim.survey import survey_setup

    _, cam, inst, plan, sky, dist = survey_setup(preset="tiny", seed=1)
    base = default_rules(cam)
    md = base.crosstalk.rules[0].magdiff            # the testcam's coupling strength, 5e-4
    rule = CrosstalkRule(1, -1, -1, 0, md)
    rules = replace(base, crosstalk=replace(base.crosstalk, rules=(rule,)))
    quiet = replace(base, crosstalk=replace(base.crosstalk, rules=()))
    row = plan[0]
    ctx = exposure_context(row, inst=inst, sky=sky, distortion=dist, rules=rules)
    ref = exposure_context(row, inst=inst, sky=sky, distortion=dist, rules=quiet)
    assert not ctx.instrument_crosstalk and not ref.instrument_crosstalk
    ct = ctx.crosstalk
    assert set(ct["src_chip"]) <= {"XY10", "XY11"} and set(ct["chip"]) <= {"XY00", "XY01"}
    j = int(np.argmin(ct["mag"]))
    chip = str(ct["chip"][j])
    k = cam.chip_names.index(chip)
    a = simulate_chip(ctx, chip, rng=np.random.default_rng(7 + k))
    b = simulate_chip(ref, chip, rng=np.random.default_rng(7 + k))
    cell = str(ct["cell"][j])
    y0, y1, x0, x1 = cam.datasec
    diff = a.cells[cell].astype(float)[y0:y1, x0:x1] - b.cells[cell].astype(float)[y0:y1, x0:x1]
    cx0, cy0 = cam.cell_origin(cell)
    # the image sits at the source's cell coordinates; its peak is the source's read-out peak
    # (saturated at the full well) times 10^(-0.4 magdiff)
    u, v = ct["x"][j] - cx0, ct["y"][j] - cy0
    w = np.where(diff > 0.5 * diff.max(), diff, 0.0)
    yy, xx = np.mgrid[0:cam.cell_ny, 0:cam.cell_nx]
    assert (w * xx).sum() / w.sum() == pytest.approx(u, abs=0.3)
    assert (w * yy).sum() / w.sum() == pytest.approx(v, abs=0.3)
    src_cell = str(cam.cell_at(ct["src_x"][j], ct["src_y"][j]))
    el = inst.electronics(str(ct["src_chip"][j]))[src_cell]
    flux = float(ctx.sources["flux"][ct["source"][j]])
    fw, _, _ = ctx.psf.at_focal(np.array([ctx.sources["X"][ct["source"][j]]]),
                                np.array([ctx.sources["Y"][ct["source"][j]]]))
    peak_e = min(flux * float(P.psf_image(ctx.psf, float(ctx.sources["X"][ct["source"][j]]),
                                          float(ctx.sources["Y"][ct["source"][j]]), size=11).max()),
                 el.full_well)
    assert diff.max() == pytest.approx(5e-4 * peak_e / el.gain, rel=0.1, abs=1.5)
    # nothing changed away from the images in this cell; the truth marks them and the rule's
    # mask covers what the truth marks
    here = np.flatnonzero((ct["chip"] == chip) & (ct["cell"] == cell))
    near = np.zeros(diff.shape, bool)
    for i in here:
        near |= np.hypot(xx - (ct["x"][i] - cx0), yy - (ct["y"][i] - cy0)) < 60
    assert diff[near].max() > 10 and not np.any(np.abs(diff[~near]) > 1)
    xt = (a.truth_mask & maskbits.CROSSTALK) != 0
    assert xt[int(round(ct["y"][j])), int(round(ct["x"][j]))]
    assert not ((b.truth_mask & maskbits.CROSSTALK) != 0).any()
    src = ctx.sources
    stars = BrightStars(src["X"][ctx.bright], src["Y"][ctx.bright], ctx.m_inst[ctx.bright])
    dyn = dynamic_mask_for_chip(chip, xt.shape, stars, camera=cam, rules=rules, filter="r",
                                detection_limit_mag=-5.0)
    assert ((dyn & maskbits.CROSSTALK) != 0)[xt].all()
