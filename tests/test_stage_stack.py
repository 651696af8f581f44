"""The stack stage: which stacks are defined, rank-collective assembly equal to one rank bit
for bit, rejection of a planted artefact, and the products.

Warps are built directly on a small tessellation (0.5"/px, ~265 px skycells): known stars plus
Gaussian noise drawn from the variance map; one input carries cosmic rays and a satellite
streak, one a masked strip.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.geometry.tessellation import load_tessellation
from ps1mpi.infra.config import load_recipe
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.log import unit_logger
from ps1mpi.infra.schema import State
from ps1mpi.stages.base import StageContext
from ps1mpi.stages.stack import StackStage, stack_depth, stack_sets
from ps1mpi.stages.warp import fits_cards, read_image, write_image

from .mpi_util import ps1mpi

FILTER = "r"
TESS_TOML = """name = "TINY.V1"
kind = "rings"
pixel_scale = 0.5
nsub_x = 10
nsub_y = 10
overlap = 40
[construction]
zone_height = 0.3125
"""
# exposure: (name, mjd, fwhm arcsec, quality); the last two are not stackable
EXPOSURES = [
    ("o5576r0001o", 55576.30, 0.90, 0), ("o5576r0002o", 55576.35, 1.20, 0),
    ("o5577r0001o", 55577.30, 1.00, 0), ("o5577r0002o", 55577.36, 1.40, 0),
    ("o5941r0001o", 55941.31, 0.95, 0), ("o5941r0002o", 55941.33, 1.10, 0),
    ("o5941r0003o", 55941.40, 6.00, 0),   # FWHM 12 px > stack.max_fwhm_pixels: left out
    ("o5941r0004o", 55941.45, 1.00, 1),   # bad quality: left out
]
ARTEFACT_INPUT = 1
GAP_INPUT = 0
STARS = [(60.3, 70.7, 900.0), (150.2, 180.6, 2500.0), (200.8, 60.1, 400.0), (100.5, 220.4, 1500.0)]


def _truth(shape, fwhm_px):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    s = fwhm_px / 2.3548
    img = np.zeros(shape)
    for x0, y0, f in STARS:
        img += f / (2 * math.pi * s * s) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    return img


def artefact_pixels(shape):
    """Pixels of the planted cosmic rays and streak (in input ARTEFACT_INPUT)."""
    art = np.zeros(shape)
    art[120, 40] = art[121, 40] = art[121, 41] = 300.0         # a cosmic ray
    art[30, 210] = 150.0
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    d = np.abs(0.35 * xx - yy + 90.0) / math.hypot(0.35, 1.0)   # a satellite streak
    art += np.where(d < 1.2, 25.0, 0.0)
    return art


def build_campaign(root: Path, *, seed: int = 11):
    root.mkdir(parents=True, exist_ok=True)
    (root / "TINY.V1.toml").write_text(TESS_TOML)
    tess = load_tessellation(root / "TINY.V1.toml")
    cell = tess.skycell(tess.skycells_at(120.0, 20.0)[0])
    shape = cell.shape
    rng = np.random.default_rng(seed)
    for k, (exp, mjd, fwhm, quality) in enumerate(EXPOSURES):
        truth = _truth(shape, fwhm / tess.pixel_scale)
        var = (1.0 + 0.02 * truth).astype(np.float32)
        img = (truth + rng.normal(0.0, 1.0, shape) * np.sqrt(var)).astype(np.float32)
        mask = np.zeros(shape, np.uint16)
        if k == ARTEFACT_INPUT:
            img += artefact_pixels(shape).astype(np.float32)
        if k == GAP_INPUT:
            mask[:, :30] = maskbits.GAP
            img[:, :30] = 0.0
            var[:, :30] = 0.0
        cards = fits_cards(cell.header(), EXPNAME=exp, FILTER=FILTER, MJD_OBS=mjd,
                           EXPTIME=30.0 + k, ZPT=25.0, MEDVAR=float(np.median(var[mask == 0])),
                           FWHM=fwhm, COVFACT=1.3)
        d = root / "warp" / exp
        d.mkdir(parents=True, exist_ok=True)
        stem = d / f"{exp}.{cell.name}"
        write_image(f"{stem}.wrp.fits", img, cards)
        write_image(f"{stem}.wrp.wt.fits", var, cards)
        write_image(f"{stem}.wrp.mk.fits", mask, cards)
    n = len(EXPOSURES)
    exps, mjds, fwhms, quals = (list(c) for c in zip(*EXPOSURES))
    exptimes = [30.0 + k for k in range(n)]
    with Ledger.create(root / "ledger.h5", campaign={"name": "t"}) as led:
        run = led.append("warpRun", n, exp_name=exps, filter=FILTER, mjd=mjds, exptime=exptimes)
        led.transition("warpRun", run, State.DONE, quality=quals)
        el = led.append("warpSkyfile", n, run=run, exp_name=exps, skycell=cell.name,
                        filter=FILTER, mjd=mjds, fwhm=fwhms, exptime=exptimes, zero_point=25.0,
                        ra=cell.ra_center, dec=cell.dec_center, good_frac=1.0)
        led.transition("warpSkyfile", el, State.DONE, quality=quals)
    return cell


EXPECTED = {("deep", "all"): 6, ("nightly", "55576"): 2, ("nightly", "55577"): 2,
            ("nightly", "55941"): 2, ("best_seeing", "all"): 3,
            ("out_of_season", "s55576"): 2, ("out_of_season", "s55941"): 4}
PRODUCTS = ("stk", "stk.wt", "stk.mk", "stk.num", "stk.exp")


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    base = tmp_path_factory.mktemp("stack")
    runs = {}
    # "two": a group of two ranks, each doing its band in pieces of a few rows (read twice)
    for name, nranks, extra in (("one", 1, []),
                                ("two", 2, ["--set", "stack.group_size=2",
                                            "--set", "stack.max_band_mb=0.15"])):
        root = base / name
        cell = build_campaign(root)
        proc = ps1mpi(nranks, ["stack", "--ledger", root / "ledger.h5",
                               "--set", f"warp.tessellation={root / 'TINY.V1.toml'}"] + extra,
                      timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[name] = root
    return runs, cell


def _path(root, cell, kind, label, product):
    return root / "stack" / cell.name / f"{cell.name}.{FILTER}.{kind}.{label}.{product}.fits"


def test_defined_stacks_and_inputs(stacks):
    runs, cell = stacks
    with Ledger.open(runs["one"] / "ledger.h5") as led:
        sr = led.read("stackRun")
        el = led.read("stackSumSkyfile")
    got = {(k.decode(), l.decode()): n for k, l, n in zip(el["kind"], el["label"], el["n_inputs"])}
    assert got == EXPECTED
    assert np.all(sr["state"] == State.DONE) and np.all(el["state"] == State.DONE)
    assert np.all(el["n_rejected_inputs"] == 0) and np.all(el["fault"] == 0)
    assert np.all(np.isfinite(el["depth_5sigma"]))
    # depth grows with the inputs: deep (6) deeper than a nightly stack (2) by ~0.6 mag
    depth = {(k.decode(), l.decode()): d for k, l, d in zip(el["kind"], el["label"],
                                                             el["depth_5sigma"])}
    assert 0.3 < depth[("deep", "all")] - depth[("nightly", "55577")] < 1.0
    import fitsio
    tab = fitsio.read(str(runs["one"] / "stack" / cell.name /
                          f"{cell.name}.{FILTER}.deep.all.inputs.fits"))
    names = sorted(str(n) for n in tab["EXP_NAME"])
    assert names == sorted(e[0] for e in EXPOSURES[:6])
    assert np.all(tab["USED"] == 1)
    art = tab["EXP_NAME"] == EXPOSURES[ARTEFACT_INPUT][0]
    assert tab["REJ_PIX"][art][0] > tab["REJ_PIX"][~art].max()
    png = runs["one"] / "stack" / cell.name / f"{cell.name}.{FILTER}.deep.all.png"
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (cell.nx, cell.ny) and im.mode == "L"


def test_group_of_two_in_pieces_equals_one_rank_bit_for_bit(stacks):
    runs, cell = stacks
    for (kind, label) in EXPECTED:
        for product in PRODUCTS:
            ref = read_image(_path(runs["one"], cell, kind, label, product))
            for other in ("two",):
                arr = read_image(_path(runs[other], cell, kind, label, product))
                assert arr.dtype == ref.dtype and np.array_equal(arr, ref), (other, kind, label,
                                                                            product)
    with Ledger.open(runs["two"] / "ledger.h5") as led:
        el = led.read("stackSumSkyfile")
    assert np.all(el["n_ranks"] == 2)
    assert np.all(np.isfinite(el["t_gather"])) and np.all(np.isfinite(el["t_read"]))


def test_artefact_rejected_and_variance_right(stacks):
    runs, cell = stacks
    root = runs["one"]
    img = read_image(_path(root, cell, "deep", "all", "stk")).astype(np.float64)
    var = read_image(_path(root, cell, "deep", "all", "stk.wt")).astype(np.float64)
    msk = read_image(_path(root, cell, "deep", "all", "stk.mk"))
    num = read_image(_path(root, cell, "deep", "all", "stk.num"))
    exp = read_image(_path(root, cell, "deep", "all", "stk.exp"))
    tess = load_tessellation(root / "TINY.V1.toml")
    art = artefact_pixels(cell.shape) > 0
    # every artefact pixel rejected, the stack there consistent with the sky (no streak left)
    assert np.all(msk[art] & maskbits.REJECTED)
    good = (msk & maskbits.BAD) == 0
    assert np.all(good[art])
    # residuals against the truth: weighted mean of the inputs' true images
    fw = np.array([e[2] for e in EXPOSURES[:6]])
    wts = np.array([1.0] * 6)
    truth = sum(w * _truth(cell.shape, f / tess.pixel_scale) for w, f in zip(wts, fw)) / wts.sum()
    far = np.ones(cell.shape, bool)
    yy, xx = np.mgrid[0:cell.ny, 0:cell.nx]
    for x0, y0, _ in STARS:   # the weights differ a little near stars; compare on the sky
        far &= (xx - x0) ** 2 + (yy - y0) ** 2 > 12 ** 2
    z = (img - truth)[good & far] / np.sqrt(var[good & far])
    width = 1.4826 * np.median(np.abs(z - np.median(z)))
    assert abs(width - 1.0) < 0.05
    assert np.all(np.abs((img - truth)[art] / np.sqrt(var[art])) < 5.0)
    # the masked strip of one input: one input fewer there, and its exposure time missing
    inner = (slice(5, -5), slice(35, -5))
    strip = (slice(5, -5), slice(0, 30))
    rej = (msk & maskbits.REJECTED) != 0
    assert np.all(num[strip][~rej[strip]] == 5) and np.all(num[inner][~rej[inner]] == 6)
    all_exp = sum(30.0 + k for k in range(6))
    assert np.allclose(exp[inner][~rej[inner]], all_exp)
    assert np.allclose(exp[strip][~rej[strip]], all_exp - (30.0 + GAP_INPUT))


def test_stack_sets_rules():
    mjd = np.array([100.2, 100.3, 101.2, 300.1, 300.2, 301.4, 700.0])
    fwhm = np.array([1.0, 0.8, 1.6, 0.9, np.nan, 1.2, 1.1])
    sets = stack_sets(mjd, fwhm, season_gap_days=90, best_seeing_fraction=0.5,
                      best_seeing_max_fwhm=1.15, min_inputs=2)
    assert sets[("deep", "all")].tolist() == list(range(7))
    assert sets[("nightly", "100")].tolist() == [0, 1]
    assert ("nightly", "101") not in sets and ("nightly", "700") not in sets  # one input
    # best half of the 6 measured FWHM (0.8, 0.9, 1.0) under 1.15"
    assert sets[("best_seeing", "all")].tolist() == [0, 1, 3]
    assert sets[("out_of_season", "s100")].tolist() == [3, 4, 5, 6]
    assert sets[("out_of_season", "s300")].tolist() == [0, 1, 2, 6]
    assert sets[("out_of_season", "s700")].tolist() == [0, 1, 2, 3, 4, 5]
    # a night boundary at 6h UTC: 100.2 falls in night 99, 101.2 in night 100
    sets = stack_sets(mjd, fwhm, kinds=("nightly",), night_boundary_day=0.25, min_inputs=1)
    assert sets[("nightly", "99")].tolist() == [0] and sets[("nightly", "100")].tolist() == [1, 2]
    with pytest.raises(Exception, match="unknown"):
        stack_sets(mjd, fwhm, kinds=("weekly",))


def test_no_stack_while_a_warp_is_pending(tmp_path):
    root = tmp_path / "c"
    build_campaign(root)
    with Ledger.open(root / "ledger.h5", "a") as led:
        run = led.append("warpRun", 1, exp_name="o5942r0001o", filter=FILTER, mjd=55942.3)
        led.transition("warpRun", run, State.RUN)
        cell = led.column("warpSkyfile", "skycell", [0])[0]
        el = led.append("warpSkyfile", 1, run=run[0], exp_name="o5942r0001o", skycell=cell,
                        filter=FILTER, mjd=55942.3)
        led.transition("warpSkyfile", el, State.NEW)
        recipe = load_recipe(overrides=[f"warp.tessellation={root / 'TINY.V1.toml'}"])
        ctx = StageContext(root=root, recipe=recipe, world=None, ledger_path=root / "ledger.h5",
                           log=unit_logger("stack"))
        stage = StackStage(group_size=1)
        assert stage.define(led, ctx) == 0                # blocked by the pending warp
        led.transition("warpSkyfile", el, State.DONE, quality=0, fwhm=1.0)
        led.transition("warpRun", run, State.DONE)
        # deep, best_seeing, nightly x3 (55942 has one exposure), out_of_season x2 (55942 joins
        # the season of 55941)
        assert stage.define(led, ctx) == 7
        labels = sorted(l.decode() for l in led.column("stackRun", "label"))
        assert "55942" not in labels                      # a night of one exposure: no stack
        assert stage.define(led, ctx) == 0                # defined once


def test_depth_formula():
    var = np.full((50, 50), 4.0)
    msk = np.zeros((50, 50), np.uint16)
    d = stack_depth(var, msk, fwhm_pixels=2.0 * math.sqrt(2.0 * math.log(2.0)) * 2.0,
                    covariance_factor=1.0, zero_point=25.0)
    # noise = sqrt(4 pi 2^2 * 4) = 14.18; 5 sigma = 70.9 -> 25 - 2.5 log10(70.9)
    assert d == pytest.approx(25.0 - 2.5 * math.log10(5 * math.sqrt(4 * math.pi * 4 * 4)), abs=1e-6)
