"""Dynamic masks cover the artefacts of constructed bright stars; the focal-plane picture."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.dynamic_masks import (BrightStars, CrosstalkModel, DynamicMaskRules,
                                             GhostModel, crosstalk_targets, default_rules,
                                             dynamic_mask_for_chip, ghost_geometry,
                                             spike_geometry, starcore_radius)
from ps1mpi.algorithms.jpeg import focal_plane_mosaic, mosaic_binned_chips, stretch_to_uint8
from ps1mpi.geometry.camera import load_camera


@pytest.fixture(scope="module")
def cam():
    return load_camera("testcam")


def chip_grid(cam, chip):
    yy, xx = np.mgrid[0:cam.chip_ny, 0:cam.chip_nx]
    return xx.astype(float), yy.astype(float)


def only(rules, *kinds):
    from dataclasses import replace
    return replace(rules, enabled=tuple(kinds))


def test_saturated_star_circle_has_the_ipp_radius(cam):
    rules = only(default_rules(cam), "starcore")
    X, Y = cam.chip_to_focal("XY10", 300.0, 420.0)
    mag = -18.0
    stars = BrightStars(X, Y, [mag])
    mask = dynamic_mask_for_chip("XY10", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                 rules=rules, filter="r")
    R = 17.631 + 1.493 ** (-11.363 - mag)                 # ~32.5 px
    assert starcore_radius(np.array([mag]))[0] == pytest.approx(R)
    xx, yy = chip_grid(cam, "XY10")
    d = np.hypot(xx - 300.0, yy - 420.0)
    assert np.all(mask[d <= R - 0.01] == maskbits.STARCORE)
    assert np.all(mask[d > R + 0.01] == 0)
    # fainter than the limit (-15): nothing
    faint = dynamic_mask_for_chip("XY10", (cam.chip_ny, cam.chip_nx), BrightStars(X, Y, [-14.0]),
                                  camera=cam, rules=rules)
    assert not faint.any()


@pytest.mark.parametrize("chip", ["XY00", "XY11"])
def test_diffraction_spikes_cover_their_rays(cam, chip):
    rules = only(default_rules(cam), "spike")
    x0, y0 = 404.0, 400.0
    X, Y = cam.chip_to_focal(chip, x0, y0)
    mag = -22.0
    L, W = spike_geometry(np.array([mag]))
    L, W = float(L[0]), float(W[0])
    assert L == pytest.approx(10 ** (0.096 * (7.35 - mag)) - 200.0)
    assert W == pytest.approx(8.0 + 0.01 * (L - 200.0))
    mask = dynamic_mask_for_chip(chip, (cam.chip_ny, cam.chip_nx), BrightStars(X, Y, [mag]),
                                 camera=cam, rules=rules, spike_angle=30.0)
    xx, yy = chip_grid(cam, chip)
    spike = (mask & maskbits.SPIKE) != 0
    assert spike.sum() == pytest.approx(4 * L * W, rel=0.08)
    c = cam.chip(chip)
    for k in range(4):
        a = np.radians(30.0 + 90.0 * k)
        # the focal-plane direction seen in chip pixels (parities)
        ux, uy = c.xparity * np.cos(a), c.yparity * np.sin(a)
        along = (xx - x0) * ux + (yy - y0) * uy
        across = -(xx - x0) * uy + (yy - y0) * ux
        ray = (along > 1) & (along < L - 1) & (np.abs(across) < 0.5 * W - 0.6)
        onchip = ray.sum()
        assert onchip > 100 and spike[ray].all()
        beyond = (along > L + 1.5) & (np.abs(across) < 0.5 * W - 0.6)
        assert not spike[beyond].any()
    # nothing far from the rays
    dist_to_rays = np.min([np.abs(-(xx - x0) * (c.yparity * np.sin(np.radians(30 + 90 * k)))
                                  + (yy - y0) * (c.xparity * np.cos(np.radians(30 + 90 * k))))
                           for k in range(2)], axis=0)
    assert not spike[dist_to_rays > 0.5 * W + 1].any()


def test_ghost_annulus_is_reflected_through_the_axis(cam):
    from dataclasses import replace
    model = GhostModel(mirror_rad=(0.0, 2.0), center_x=(), center_y=(), inner_major=(30.0,),
                       inner_minor=(20.0,), outer_major=(80.0, 0.01), outer_minor=(60.0,),
                       max_mag={"g": -16.5, "r": -20.0, "i": -22.0, "z": -22.0, "y": -21.5,
                                "w": -20.4})
    rules = replace(only(default_rules(cam), "ghost"), ghost=model)
    # a star on XY10 at (X, Y) = (450, -400): its ghost lies at (-450, 400) on XY01
    stars = BrightStars([450.0], [-400.0], [-21.0])
    g = ghost_geometry(stars.X, stars.Y, model)
    assert g["X"][0] == pytest.approx(-450.0) and g["Y"][0] == pytest.approx(400.0)
    r = np.hypot(450.0, 400.0)
    assert g["a_out"][0] == pytest.approx(80.0 + 0.01 * r)
    mask = dynamic_mask_for_chip("XY01", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                 rules=rules, filter="r")
    xx, yy = chip_grid(cam, "XY01")
    X, Y = cam.chip_to_focal("XY01", xx, yy)
    t = np.arctan2(-400.0, 450.0)                     # major axis along the source's radius
    u = (X + 450.0) * np.cos(t) + (Y - 400.0) * np.sin(t)
    v = -(X + 450.0) * np.sin(t) + (Y - 400.0) * np.cos(t)
    a_out = 80.0 + 0.01 * r
    inner = (u / 30.0) ** 2 + (v / 20.0) ** 2
    outer = (u / a_out) ** 2 + (v / 60.0) ** 2
    ghost = mask == maskbits.GHOST
    assert ghost[(inner > 1.05) & (outer < 0.95)].all()
    assert not ghost[inner < 0.95].any()
    assert not ghost[outer > 1.05].any()
    assert ghost.sum() == pytest.approx(np.pi * (a_out * 60 - 30 * 20), rel=0.03)
    # per-filter limits: the same star makes no ghost in i (limit -22)
    none = dynamic_mask_for_chip("XY01", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                 rules=rules, filter="i")
    assert not none.any()


def test_default_ghost_model_is_near_the_reflection(cam):
    X = np.array([3000.0, -8000.0, 15000.0])
    Y = np.array([2000.0, 9000.0, -12000.0])
    g = ghost_geometry(X, Y)
    # the GPC1 model puts ghosts within ~8% of the radius (plus ~100 px) of -p
    d = np.hypot(g["X"] + X, g["Y"] + Y)
    assert np.all(d < 0.08 * np.hypot(X, Y) + 120.0)
    assert np.all(g["a_out"] > g["a_in"]) and np.all(g["b_out"] > g["b_in"])


def test_glint_streak_from_a_star_beyond_the_top_edge(cam):
    rules = only(default_rules(cam), "glint")
    xmin, xmax, ymin, ymax = cam.focal_plane_extent()
    Xs, Ys = 430.0, ymax + 120.0                     # inside the testcam's 0-200 px glint band
    mag = -23.5
    stars = BrightStars([Xs], [Ys], [mag])
    L = 1901.0 * (-16.8 - mag)
    for chip in ("XY11", "XY10"):                     # the right column of chips
        mask = dynamic_mask_for_chip(chip, (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                     rules=rules, filter="r")
        xx, yy = chip_grid(cam, chip)
        X, Y = cam.chip_to_focal(chip, xx, yy)
        glint = (mask & maskbits.GLINT) != 0
        inside = (np.abs(X - Xs) < 39.5) & (Ys - Y < L)
        assert inside.any() and glint[inside].all()
        assert not glint[np.abs(X - Xs) > 40.5].any()
    # left-column chips are untouched; a star beyond the band (too far) gives nothing
    left = dynamic_mask_for_chip("XY01", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                 rules=rules)
    assert not left.any()
    far = BrightStars([Xs], [ymax + 250.0], [mag])
    assert not dynamic_mask_for_chip("XY11", (cam.chip_ny, cam.chip_nx), far, camera=cam,
                                     rules=rules).any()
    # the testcam's glints come from every side: a star left of the focal plane streaks right
    side = BrightStars([xmin - 50.0], [300.0], [mag])
    m = dynamic_mask_for_chip("XY00", (cam.chip_ny, cam.chip_nx), side, camera=cam,
                              rules=rules) | dynamic_mask_for_chip(
        "XY01", (cam.chip_ny, cam.chip_nx), side, camera=cam, rules=rules)
    assert m.any()
    # too faint in r (testcam limit -20.05): nothing
    faint = BrightStars([Xs], [Ys], [-19.9])
    assert not dynamic_mask_for_chip("XY11", (cam.chip_ny, cam.chip_nx), faint, camera=cam,
                                     rules=rules).any()
    # the GPC1 rule only knows the bands 3428-17428 px above and below its focal plane
    g = default_rules("gpc1").glint
    assert (g.region_min, g.region_max, g.sides) == (3428.0, 17428.0, ("top", "bottom"))


def test_crosstalk_image_at_the_same_cell_coordinates(cam):
    rules = only(default_rules(cam), "crosstalk")
    # testcam: cell xyIJ leaks 5e-4 of its signal into xyI(J xor 1) on every chip
    md = -2.5 * np.log10(5e-4)
    cell_x0, cell_y0 = cam.cell_origin("xy01")
    u, v = 123.0, 250.0
    X, Y = cam.chip_to_focal("XY10", cell_x0 + u, cell_y0 + v)
    mag = -14.5                                       # unsaturated: no bleed image
    stars = BrightStars(X, Y, [mag])
    limit = -5.0                                      # the chip's measured detection limit
    ct = crosstalk_targets(stars, camera=cam, model=rules.crosstalk)
    assert list(ct["chip"]) == ["XY10"] and list(ct["cell"]) == ["xy00"]
    tx, ty = cam.cell_origin("xy00")
    assert ct["x"][0] == pytest.approx(tx + u) and ct["y"][0] == pytest.approx(ty + v)
    assert ct["flux_ratio"][0] == pytest.approx(5e-4)
    assert ct["image_mag"][0] == pytest.approx(mag + md)
    mask = dynamic_mask_for_chip("XY10", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                 rules=rules, detection_limit_mag={"XY10": limit})
    xx, yy = chip_grid(cam, "XY10")
    R = 2.5 * (-13.0 - mag)                           # the testcam's linear radius law, aspect 1
    d = np.hypot(xx - tx - u, yy - ty - v)
    assert np.all(mask[d < R - 0.01] == maskbits.CROSSTALK)
    assert not mask[d > R + 0.01].any()
    # with the table's default limit (-7.2) the image (-6.25) is too faint to be masked
    assert not dynamic_mask_for_chip("XY10", (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                     rules=rules).any()
    # and so is a fainter star's with the chip's limit
    faint = BrightStars(X, Y, [limit - md + 0.1])
    assert not dynamic_mask_for_chip("XY10", (cam.chip_ny, cam.chip_nx), faint, camera=cam,
                                     rules=rules, detection_limit_mag=limit).any()
    # GPC1's current IPP shape: an ellipse 0.5 R x R, R the saturated-star radius
    g = default_rules("gpc1").crosstalk
    assert (g.radius_law, g.aspect) == ("starcore", 0.5)


def test_crosstalk_images_of_bleed_trails(cam):
    """A saturated source's bleed trail images as a column box in the target cell: the
    testcam's reaches 10^(0.4 (-14.5 - m)) px up and down, GPC1's (the IPP's) the whole cell."""
    rules = only(default_rules(cam), "crosstalk")
    x0, y0 = cam.cell_origin("xy11")
    X, Y = cam.chip_to_focal("XY01", x0 + 200.0, y0 + 200.0)
    mag = -17.2
    mask = dynamic_mask_for_chip("XY01", (cam.chip_ny, cam.chip_nx), BrightStars(X, Y, [mag]),
                                 camera=cam, rules=rules)
    tx, ty = cam.cell_origin("xy10")
    xx, yy = chip_grid(cam, "XY01")
    w = 5.0 * (-15.0 - mag)
    half = 10 ** (0.4 * (-14.5 - mag))
    box = (np.abs(xx - tx - 200.0) <= 0.5 * w) & (np.abs(yy - ty - 200.0) <= half)
    circle = np.hypot(xx - tx - 200.0, yy - ty - 200.0) <= 2.5 * (-13.0 - mag)
    xt = (mask & maskbits.CROSSTALK) != 0
    np.testing.assert_array_equal(xt, box | circle)
    # GPC1: OTA2y cell 5 -> cell 6 (6.83 mag): the bleed box spans the target cell's height
    gpc1 = load_camera("gpc1")
    g = only(default_rules(gpc1), "crosstalk")
    cx, cy = gpc1.cell_origin("xy53")
    X, Y = gpc1.chip_to_focal("XY23", cx + 100.0, cy + 300.0)
    m = dynamic_mask_for_chip("XY23", (gpc1.chip_ny, gpc1.chip_nx), BrightStars(X, Y, [-18.0]),
                              camera=gpc1, rules=g)
    tx, ty = gpc1.cell_origin("xy63")
    col = (m[:, int(tx + 100)] & maskbits.CROSSTALK) != 0
    assert np.flatnonzero(col).min() == ty and np.flatnonzero(col).max() == ty + gpc1.cell_ny - 1
    # 5 (-15 - m) = 15 px wide, far from the image's ellipse
    assert np.count_nonzero(m[ty + 5, :] & maskbits.CROSSTALK) == pytest.approx(15.0, abs=1.0)


def test_the_simulator_uses_the_testcam_table(cam):
    """One description: the simulator's crosstalk is the table's, and the table's magnitude
    limits are where the simulated ghosts and glints become visible (0.5 sky sigma on the
    darkest sky the simulator makes)."""
    import math

    from ps1mpi.sim.artefacts import ArtefactLight, crosstalk_rules
    from ps1mpi.sim.instrument import EXPTIME, FILTER_ZP, SKY_MAG, Instrument

    rules = default_rules(cam)
    assert rules.crosstalk.rules == CrosstalkModel.row_pairs(cam.ncell_y, coeff=5e-4)
    sim = crosstalk_rules(cam)
    assert sorted(sim) == sorted([(f"xy{i}{j}", f"xy{i}{j ^ 1}", 5e-4)
                                  for i in range(cam.ncell_x) for j in range(cam.ncell_y)])
    assert Instrument(cam, seed=1).crosstalk == sim
    with pytest.raises(ValueError, match="disagrees with the testcam rule table"):
        crosstalk_rules(cam, coeff=1e-3)
    # GPC1's couplings are all tied to chip columns: none is a cell-to-cell coefficient
    assert crosstalk_rules(load_camera("gpc1")) == []
    light = ArtefactLight()
    g = ghost_geometry(np.array([0.0, 800.0]), np.array([0.0, -600.0]), rules.ghost)
    area = np.pi * (g["a_out"] * g["b_out"] - g["a_in"] * g["b_in"])
    np.testing.assert_allclose(area, np.pi * (45.0 ** 2 - 20.0 ** 2))     # a fixed doughnut
    rn = cam.read_noise * cam.gain
    for band in "grizyw":
        sky = EXPTIME[band] * cam.pixel_scale ** 2 * 10 ** (-0.4 * (SKY_MAG[band] + 0.2
                                                                     - FILTER_ZP[band]))
        thr = 0.5 * math.sqrt(sky + rn ** 2)
        ghost_lim = -2.5 * math.log10(thr * area[0] / light.ghost_flux_fraction[band])
        glint_lim = -2.5 * math.log10(thr / light.glint_sb)
        # the table's limits are these, rounded towards fainter stars by less than 0.05 mag
        assert 0.0 <= rules.ghost.max_mag[band] - ghost_lim < 0.05, band
        assert 0.0 <= rules.glint.max_mag[band] - glint_lim < 0.05, band


def test_rule_tables_are_data_next_to_the_camera_files(tmp_path):
    import shutil

    from ps1mpi.algorithms.dynamic_masks import RULES_DIR, load_rules, rules_path
    from ps1mpi.geometry.camera import CAMERA_DIR

    gpc1 = load_camera("gpc1")
    assert rules_path(gpc1) == CAMERA_DIR / "gpc1_masks.toml" == RULES_DIR / "gpc1_masks.toml"
    r = default_rules(gpc1)
    # the public IPP psastro values
    assert (r.starcore.max_mag, r.starcore.rad_offset, r.starcore.rad_exp,
            r.starcore.mag_ref) == (-15.0, 17.631, 1.493, -11.363)
    assert (r.spike.mag_slope, r.spike.mag_zero, r.spike.offset, r.spike.width, r.spike.l0,
            r.spike.width_slope) == (0.096, 7.35, 200.0, 8.0, 200.0, 0.01)
    assert (r.glint.length_slope, r.glint.length_zero, r.glint.width) == (1901.0, -16.8, 80.0)
    assert dict(r.ghost.max_mag) == {"g": -16.5, "r": -20.0, "i": -22.0, "z": -22.0,
                                     "y": -21.5, "w": -20.4}
    assert len(r.crosstalk.rules) == 10 and default_rules("GPC1") == r
    # a camera file elsewhere finds the table next to it; without one the error names the files
    for f in ("testcam.toml", "testcam_focal_plane.csv"):
        shutil.copy(CAMERA_DIR / f, tmp_path / f.replace("testcam", "mycam"))
    text = (tmp_path / "mycam.toml").read_text().replace('name = "testcam"', 'name = "mycam"')
    (tmp_path / "mycam.toml").write_text(text.replace("testcam_focal_plane", "mycam_focal_plane"))
    mycam = load_camera(tmp_path / "mycam.toml")
    with pytest.raises(ValueError, match="mycam_masks.toml"):
        default_rules(mycam)
    table = (CAMERA_DIR / "testcam_masks.toml").read_text().replace("angle_deg = 0.0",
                                                                   "angle_deg = 12.0")
    (tmp_path / "mycam_masks.toml").write_text(table)
    assert default_rules(mycam).spike.angle_deg == 12.0
    # an incomplete or malformed table names the file and the key
    (tmp_path / "bad_masks.toml").write_text(table.replace("rad_exp = 1.493\n", ""))
    with pytest.raises(ValueError, match=r"bad_masks.toml.*missing keys \['rad_exp'\]"):
        load_rules(tmp_path / "bad_masks.toml")
    (tmp_path / "bad_masks.toml").write_text(table.replace('radius_law = "linear"',
                                                           'radius_law = "cubic"'))
    with pytest.raises(ValueError, match="bad_masks.toml.*radius_law 'cubic'"):
        load_rules(tmp_path / "bad_masks.toml")


def test_gpc1_crosstalk_rules_follow_the_ipp_table():
    gpc1 = load_camera("gpc1")
    rules = default_rules(gpc1)
    x0, y0 = gpc1.cell_origin("xy34")
    X, Y = gpc1.chip_to_focal("XY23", x0 + 10.0, y0 + 20.0)
    ct = crosstalk_targets(BrightStars(X, Y, [-20.0]), camera=gpc1, model=rules.crosstalk)
    # OTA2y xy3v -> OTA3y xy3v
    assert list(zip(ct["chip"], ct["cell"])) == [("XY33", "xy34")]


def test_rules_round_trip_and_validation(cam):
    rules = default_rules(cam)
    again = DynamicMaskRules.from_mapping(rules.to_mapping())
    assert again == rules
    tweaked = DynamicMaskRules.from_mapping({"starcore": {"max_mag": -14.0},
                                             "crosstalk": {"rules": [[0, 0, 0, 1, 7.0]]}},
                                            base=rules)
    assert tweaked.starcore.max_mag == -14.0 and tweaked.crosstalk.rules[0].magdiff == 7.0
    assert tweaked.glint == rules.glint
    with pytest.raises(ValueError, match=r"unknown keys \['radius'\] in \[starcore\]"):
        DynamicMaskRules.from_mapping({"starcore": {"radius": 3}})
    with pytest.raises(ValueError, match="unknown sections"):
        DynamicMaskRules.from_mapping({"ghosts": {}})
    with pytest.raises(ValueError, match="filter"):
        dynamic_mask_for_chip("XY01", (806, 808), BrightStars([0.0], [0.0], [-20.0]),
                              camera=cam, filter="u")
    with pytest.raises(ValueError, match="chip: 'XY77'"):
        dynamic_mask_for_chip("XY77", (806, 808), BrightStars([0.0], [0.0], [-20.0]), camera=cam)


def test_all_kinds_together_set_only_dynamic_bits(cam):
    rng = np.random.default_rng(3)
    X = rng.uniform(-800, 800, 40)
    Y = rng.uniform(-800, 800, 40)
    mag = rng.uniform(-24, -12, 40)
    stars = BrightStars(X, Y, mag).locate(cam)
    assert set(stars.chip) <= set(cam.chip_names) | {""}
    on = stars.chip != ""
    for c in np.unique(stars.chip[on]):
        X2, Y2 = cam.chip_to_focal(c, stars.x[stars.chip == c], stars.y[stars.chip == c])
        np.testing.assert_allclose(X2, X[stars.chip == c])
    for chip in cam.chip_names:
        m = dynamic_mask_for_chip(chip, (cam.chip_ny, cam.chip_nx), stars, camera=cam,
                                  filter="r")
        assert m.dtype == np.uint16 and m.shape == (cam.chip_ny, cam.chip_nx)
        assert not (m & ~np.uint16(maskbits.DYNAMIC)).any()
        assert (m & maskbits.STARCORE).any()


# ---------------------------------------------------------------------- focal-plane picture

def test_mosaic_places_binned_chips_with_their_parities(cam):
    b = 16
    ny, nx = -(-cam.chip_ny // b), -(-cam.chip_nx // b)
    binned = {}
    for k, c in enumerate(cam.chip_names):
        img = np.full((ny, nx), 100.0 * (k + 1), np.float32)
        img[0, 0] = -1.0                         # marks the chip's pixel (0, 0) corner
        binned[c] = img
    mosaic, (x0, y0) = mosaic_binned_chips(binned, camera=cam, binning=b)
    for k, c in enumerate(cam.chip_names):
        # the binned pixel [0, 0] lands where the chip's first pixels are in the focal plane
        X, Y = cam.chip_to_focal(c, 0.5 * (b - 1), 0.5 * (b - 1))
        j, i = int((Y - y0) // b), int((X - x0) // b)
        assert mosaic[j, i] == -1.0
        # the chip runs away from it along the focal-plane axes as its parities say
        lay = cam.chip(c)
        jf, i_f = j + lay.yparity * (ny - 1), i + lay.xparity * (nx - 1)
        assert mosaic[jf, i_f] == 100.0 * (k + 1)
        X2, Y2 = cam.chip_to_focal(c, (nx - 1) * b, (ny - 1) * b)
        assert abs((X2 - x0) / b - i_f) < 1.5 and abs((Y2 - y0) / b - jf) < 1.5
        assert np.sum(mosaic == 100.0 * (k + 1)) == nx * ny - 1
    assert np.isnan(mosaic).any()                 # the gaps between chips
    # display: +Y up, gaps black (grey) or in the no-data colour (RGB)
    grey = focal_plane_mosaic(binned, camera=cam, binning=b, stretch="linear",
                              percentiles=(0, 100))
    assert grey.dtype == np.uint8 and grey.shape == mosaic.shape
    np.testing.assert_array_equal(grey[::-1] == 0, ~np.isfinite(mosaic) | (mosaic == -1.0))
    rgb = focal_plane_mosaic(binned, camera=cam, binning=b, rgb=True)
    assert rgb.shape == mosaic.shape + (3,)
    assert np.all(rgb[::-1][~np.isfinite(mosaic)] == [0, 0, 48])
    with pytest.raises(ValueError, match=r"binned\['XY01'\]: shape"):
        mosaic_binned_chips({"XY01": np.zeros((5, 5))}, camera=cam)


def test_asinh_stretch_is_monotonic_and_uses_the_percentiles():
    img = np.linspace(0.0, 1000.0, 9999).reshape(101, 99)
    out, (lo, hi) = stretch_to_uint8(img, percentiles=(1.0, 99.0))
    assert lo == pytest.approx(np.percentile(img, 1))
    assert hi == pytest.approx(np.percentile(img, 99))
    flat = out.ravel()[np.argsort(img.ravel())]
    assert np.all(np.diff(flat.astype(int)) >= 0) and flat[0] == 0 and flat[-1] == 255
    # asinh lifts the faint end compared with a linear stretch
    lin, _ = stretch_to_uint8(img, stretch="linear", percentiles=(1.0, 99.0))
    mid = (img > lo) & (img < lo + 0.1 * (hi - lo))
    assert np.all(out[mid] >= lin[mid])
