"""Tests of PSF-fit photometry (ps1mpi.algorithms.psfphot) against simulated truth.

Stars are drawn from a known PS1_V1 model with Poisson and read noise; the expected errors
are the Cramer-Rao bounds computed here from the Fisher information of the PSF in Gaussian
noise of known variance.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.psf import PSFModel
from ps1mpi.algorithms.psfphot import (PHOT_BIG_GROUP, PHOT_BLENDED, PHOT_EDGE,
                                       PHOT_FIT_FAILED, PHOT_MASKED, PHOT_POS_FIXED,
                                       PHOT_SKY_FIT, fit_psf_photometry)

SKY = 200.0      # electrons per pixel
READ = 5.0       # electrons
SHAPE_PARS = dict(sigma_x=2.0, sigma_y=1.8, sxy=0.02, k=0.5)


def true_psf(shape):
    return PSFModel.constant(shape, **SHAPE_PARS)


def render(psf, shape, x, y, flux, *, half=29):
    """Noise-free image of point sources (square stamps of half-size ``half``)."""
    img = np.zeros(shape)
    size = 2 * half + 1
    x, y, flux = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (x, y, flux))
    st = psf.evaluate(x, y, size=size)
    ox, oy = psf.stamp_origin(x, y, size)
    ny, nx = shape
    for i in range(x.size):
        xs = slice(max(ox[i], 0), min(ox[i] + size, nx))
        ys = slice(max(oy[i], 0), min(oy[i] + size, ny))
        img[ys, xs] += flux[i] * st[i][ys.start - oy[i]:ys.stop - oy[i],
                                       xs.start - ox[i]:xs.stop - ox[i]]
    return img


def observe(img, rng, *, sky=SKY):
    """Poisson + read noise (electrons); returns background-subtracted data, the variance
    the chip stage computes from the data (signal + read noise squared), the true variance,
    and an empty mask."""
    mean = np.maximum(img + sky, 0)
    e = rng.poisson(mean).astype(float) + rng.normal(0, READ, img.shape)
    return ((e - sky).astype(np.float32), (np.maximum(e, 0) + READ ** 2).astype(np.float32),
            (mean + READ ** 2).astype(np.float32), np.zeros(img.shape, np.uint16))


def grid_positions(rng, shape, spacing):
    g = np.arange(spacing / 2, shape[0] - spacing / 2 + 1, spacing)
    xx, yy = np.meshgrid(g, g)
    return (xx.ravel() + rng.uniform(-0.5, 0.5, xx.size),
            yy.ravel() + rng.uniform(-0.5, 0.5, xx.size))


def crlb(psf, flux):
    """Cramer-Rao bounds on (flux, x, y) for one star in Gaussian noise of variance
    sky + read^2 + source, from all pixels of a large stamp."""
    st, dx, dy = psf.evaluate(np.array([60.3]), np.array([60.6]), size=101, derivatives=True)
    var = SKY + READ ** 2 + flux * st[0]
    jac = np.stack([st[0].ravel(), flux * dx[0].ravel(), flux * dy[0].ravel()])
    fisher = (jac / var.ravel()) @ jac.T
    return np.sqrt(np.diag(np.linalg.inv(fisher)))


def flux_for_snr(psf, snr):
    f = snr * 120.0
    for _ in range(30):
        f = snr * crlb(psf, f)[0]
    return f


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("snr", [10, 30, 100, 300, 1000])
def test_isolated_stars_pulls_and_cramer_rao(snr):
    """Pull widths 1 +/- 0.1, no bias beyond 0.2 sigma, and scatter of flux and position
    within 10% of the Cramer-Rao bound (which the reported errors match as well)."""
    rng = np.random.default_rng(100 + snr)
    shape = (1320, 1320)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 60.0)        # 484 stars
    flux = np.full(x.size, flux_for_snr(psf, snr))
    # the wings are drawn out to 64 pixels, as far as the fit subtracts neighbours
    data, var, _, mask = observe(render(psf, shape, x, y, flux, half=64), rng)
    xi, yi = x + rng.normal(0, 0.3, x.size), y + rng.normal(0, 0.3, x.size)
    ph = fit_psf_photometry(data, var, mask, psf, xi, yi, gain=1.0)
    bound = crlb(psf, flux[0])

    assert not np.any(ph.flags & PHOT_FIT_FAILED)
    pf = (ph.flux - flux) / ph.flux_sig
    assert abs(pf.mean()) < 0.2
    assert abs(pf.std() - 1.0) < 0.1
    assert 0.9 < np.std(ph.flux - flux) / bound[0] < 1.1
    assert 0.9 < np.median(ph.flux_sig) / bound[0] < 1.1
    free = (ph.flags & PHOT_POS_FIXED) == 0
    assert free.mean() > 0.95
    for got, true, sig, b in ((ph.x, x, ph.x_sig, bound[1]), (ph.y, y, ph.y_sig, bound[2])):
        d = (got - true)[free]
        p = d / sig[free]
        assert abs(p.mean()) < 0.2
        assert abs(p.std() - 1.0) < 0.1
        assert 0.9 < d.std() / b < 1.1
    assert np.median(ph.chi2_dof) == pytest.approx(1.0, abs=0.05)
    assert abs(np.median(ph.ext_nsigma)) < 0.3


def test_true_variance_without_gain():
    """With a noise-free variance map the weights are used as given (gain=None)."""
    rng = np.random.default_rng(7)
    shape = (960, 960)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 60.0)
    flux = np.full(x.size, flux_for_snr(psf, 50))
    data, _, var_true, mask = observe(render(psf, shape, x, y, flux), rng)
    ph = fit_psf_photometry(data, var_true, mask, psf, x + 0.2, y - 0.2)
    pf = (ph.flux - flux) / ph.flux_sig
    assert abs(pf.mean()) < 0.2 and abs(pf.std() - 1) < 0.1


def test_forced_photometry_of_empty_positions_averages_to_zero():
    rng = np.random.default_rng(8)
    shape = (800, 800)
    psf = true_psf(shape)
    data, var, _, mask = observe(np.zeros(shape), rng)
    x = rng.uniform(20, 780, 1000)
    y = rng.uniform(20, 780, 1000)
    ph = fit_psf_photometry(data, var, mask, psf, x, y, forced=True, gain=1.0)
    assert np.all(ph.flags & PHOT_POS_FIXED)
    assert np.array_equal(ph.x, x) and np.all(ph.x_sig == 0)
    sn = ph.flux / ph.flux_sig
    assert abs(sn.mean()) < 3.0 / np.sqrt(x.size)
    # neighbouring positions share pixels, so the scatter is tested loosely
    assert 0.85 < sn.std() < 1.15
    assert abs(np.mean(ph.flux)) < 3 * np.median(ph.flux_sig) / np.sqrt(x.size) * 2


def test_forced_photometry_of_stars_is_unbiased():
    rng = np.random.default_rng(9)
    shape = (960, 960)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 60.0)
    flux = 10 ** rng.uniform(3.0, 5.0, x.size)
    data, var, _, mask = observe(render(psf, shape, x, y, flux), rng)
    ph = fit_psf_photometry(data, var, mask, psf, x, y, forced=True, gain=1.0)
    pf = (ph.flux - flux) / ph.flux_sig
    assert abs(pf.mean()) < 0.15 and abs(pf.std() - 1) < 0.1


def galaxy_image(psf, shape, x, y, flux, r_e):
    """Exponential discs (effective radius r_e pixels, 5x5 sub-sampled) convolved with the
    PSF."""
    half = 40
    os_ = 5
    pk = psf.evaluate(np.array([shape[1] / 2.0]), np.array([shape[0] / 2.0]), size=61)[0]
    img = np.zeros(shape)
    fine = (np.arange((2 * half + 1) * os_) + 0.5) / os_ - (half + 0.5)
    for xi, yi, fi in zip(x, y, flux):
        cx, cy = int(round(xi)), int(round(yi))
        gx, gy = np.meshgrid(fine - (xi - cx), fine - (yi - cy))
        disc = np.exp(-1.678 * np.hypot(gx, gy) / r_e)
        disc = disc.reshape(2 * half + 1, os_, 2 * half + 1, os_).sum(axis=(1, 3))
        conv = fftconvolve(disc / disc.sum(), pk / pk.sum(), mode="same")
        img[cy - half:cy + half + 1, cx - half:cx + half + 1] += fi * conv
    return img


def test_galaxies_are_more_extended_than_stars():
    rng = np.random.default_rng(10)
    shape = (1000, 1000)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 100.0)
    gal = np.arange(x.size) % 2 == 0
    flux = np.full(x.size, flux_for_snr(psf, 60))
    img = galaxy_image(psf, shape, x[gal], y[gal], flux[gal], 3.0)
    img += render(psf, shape, x[~gal], y[~gal], flux[~gal])
    data, var, _, mask = observe(img, rng)
    ph = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0)
    ext_gal = ph.ext_nsigma[gal]
    ext_star = ph.ext_nsigma[~gal]
    assert np.median(ext_gal) > 8.0
    assert ext_gal.min() > np.percentile(ext_star, 99)
    assert abs(np.median(ext_star)) < 0.5 and np.std(ext_star) < 1.2
    assert np.median(ph.chi2_dof[gal]) > 1.5 > np.median(ph.chi2_dof[~gal])


@pytest.mark.parametrize("sep_fwhm", [1.0, 1.5, 2.5])
def test_close_pairs_are_fitted_together(sep_fwhm):
    rng = np.random.default_rng(int(11 + 10 * sep_fwhm))
    shape = (1080, 1080)
    psf = true_psf(shape)
    fwhm = float(psf.shape_at(0, 0).fwhm_major)
    cx, cy = grid_positions(rng, shape, 60.0)
    ang = rng.uniform(0, 2 * np.pi, cx.size)
    sep = sep_fwhm * fwhm
    x = np.r_[cx, cx + sep * np.cos(ang)]
    y = np.r_[cy, cy + sep * np.sin(ang)]
    flux = np.r_[np.full(cx.size, 3e4), np.full(cx.size, 1.2e4)]
    data, var, _, mask = observe(render(psf, shape, x, y, flux), rng)
    xi, yi = x + rng.normal(0, 0.3, x.size), y + rng.normal(0, 0.3, x.size)
    ph = fit_psf_photometry(data, var, mask, psf, xi, yi, gain=1.0)
    pf = (ph.flux - flux) / ph.flux_sig
    assert abs(pf.mean()) < 0.2 and 0.85 < pf.std() < 1.2
    px = (ph.x - x) / ph.x_sig
    assert 0.85 < px.std() < 1.2
    assert np.all(ph.flags & PHOT_BLENDED)
    assert np.array_equal(ph.group[:cx.size], ph.group[cx.size:])
    # fitted one at a time, without neighbour subtraction, the fluxes are badly biased
    alone = fit_psf_photometry(data, var, mask, psf, xi, yi, gain=1.0, blend_radius=0,
                               neighbour_passes=0)
    assert np.nanmean((alone.flux - flux) / alone.flux_sig) > 3.0


def test_neighbours_beyond_the_blend_radius_are_subtracted():
    rng = np.random.default_rng(12)
    shape = (1080, 1080)
    psf = true_psf(shape)
    fwhm = float(psf.shape_at(0, 0).fwhm_major)
    cx, cy = grid_positions(rng, shape, 60.0)
    ang = rng.uniform(0, 2 * np.pi, cx.size)
    x = np.r_[cx, cx + 4.0 * fwhm * np.cos(ang)]
    y = np.r_[cy, cy + 4.0 * fwhm * np.sin(ang)]
    flux = np.r_[np.full(cx.size, 3e5), np.full(cx.size, 6e3)]
    data, var, _, mask = observe(render(psf, shape, x, y, flux, half=60), rng)
    faint = slice(cx.size, None)
    raw = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0, neighbour_passes=0)
    sub = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0)
    assert not np.any(sub.flags & PHOT_BLENDED)
    bias_raw = np.mean(((raw.flux - flux) / raw.flux_sig)[faint])
    pf = ((sub.flux - flux) / sub.flux_sig)[faint]
    assert bias_raw > 1.0
    assert abs(pf.mean()) < 0.2 and abs(pf.std() - 1) < 0.12


def test_local_sky_fit():
    rng = np.random.default_rng(13)
    shape = (960, 960)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 60.0)
    flux = np.full(x.size, 2e4)
    data, var, _, mask = observe(render(psf, shape, x, y, flux), rng)
    offset = 25.0  # residual background the background model missed
    data = data + np.float32(offset)
    fixed0 = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0)
    assert np.mean((fixed0.flux - flux) / fixed0.flux_sig) > 3.0
    given = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0, sky=offset)
    assert abs(np.mean((given.flux - flux) / given.flux_sig)) < 0.2
    fitted = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0, fit_sky=True)
    assert np.all(fitted.flags & PHOT_SKY_FIT)
    pf = (fitted.flux - flux) / fitted.flux_sig
    ps = (fitted.sky - offset) / fitted.sky_sig
    assert abs(pf.mean()) < 0.2 and abs(pf.std() - 1) < 0.12
    assert abs(ps.mean()) < 0.2 and abs(ps.std() - 1) < 0.12
    assert np.all(fitted.flux_sig > given.flux_sig)  # one more free parameter


def test_masks_edges_and_failures():
    rng = np.random.default_rng(14)
    shape = (300, 300)
    psf = true_psf(shape)
    x = np.array([60.2, 150.4, 240.7, 2.3, 150.0])
    y = np.array([60.6, 150.1, 240.2, 150.6, 60.0])
    flux = np.array([5e4, 5e4, 5e4, 5e4, 5e4])
    data, var, _, mask = observe(render(psf, shape, x, y, flux), rng)
    mask[148:153, 147:154] |= maskbits.SAT          # core of star 1 masked
    mask[225:256, 225:256] |= maskbits.GAP          # star 2 entirely masked
    var[40:80, 130:170] = 0.0                       # star 4: no valid variance
    ph = fit_psf_photometry(data, var, mask, psf, x, y, gain=1.0)
    assert ph.flags[0] == 0
    assert ph.flags[1] & PHOT_MASKED and ph.psf_qf[1] < 0.85
    assert abs(ph.flux[1] - flux[1]) < 5 * ph.flux_sig[1]     # the wings still measure it
    assert ph.flags[2] & PHOT_FIT_FAILED and np.isnan(ph.flux[2])
    assert ph.flags[3] & PHOT_EDGE and np.isfinite(ph.flux[3])
    assert abs(ph.flux[3] - flux[3]) < 5 * ph.flux_sig[3]
    assert ph.flags[4] & PHOT_FIT_FAILED


def test_aperture_correction_and_columns():
    rng = np.random.default_rng(15)
    shape = (300, 300)
    psf = true_psf(shape)
    x, y = grid_positions(rng, shape, 60.0)
    flux = np.full(x.size, 3e4)
    data, var, _, mask = observe(render(psf, shape, x, y, flux), rng)
    corr = PSFModel.constant(shape, **SHAPE_PARS, ap_corr=1.05)
    a = fit_psf_photometry(data, var, mask, corr, x, y, gain=1.0)
    b = fit_psf_photometry(data, var, mask, corr, x, y, gain=1.0, apply_apcorr=False)
    assert np.allclose(a.flux, 1.05 * b.flux) and np.allclose(a.flux_sig, 1.05 * b.flux_sig)
    cols = a.columns()
    for name in ("X_PSF", "Y_PSF", "X_PSF_SIG", "Y_PSF_SIG", "PSF_INST_FLUX",
                 "PSF_INST_FLUX_SIG", "PSF_INST_MAG", "PSF_CHISQ", "PSF_QF", "EXT_NSIGMA",
                 "PSF_MAJOR", "PSF_MINOR", "PSF_THETA", "PHOT_FLAGS"):
        assert len(cols[name]) == x.size
    assert np.allclose(cols["PSF_INST_MAG"], -2.5 * np.log10(a.flux))
    shp = psf.shape_at(x, y)
    assert np.allclose(cols["PSF_MAJOR"], shp.fwhm_major, rtol=1e-6)


def test_input_errors():
    shape = (100, 100)
    psf = true_psf(shape)
    img = np.zeros(shape, np.float32)
    var = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.uint16)
    with pytest.raises(ValueError, match="psf describes"):
        fit_psf_photometry(img, var, mask, true_psf((50, 50)), [1.0], [1.0])
    with pytest.raises(ValueError, match="sky must be"):
        fit_psf_photometry(img, var, mask, psf, [1.0, 2.0], [1.0, 2.0], sky=np.zeros(3))
    with pytest.raises(ValueError, match="gain"):
        fit_psf_photometry(img, var, mask, psf, [1.0], [1.0], gain=0.0)
    with pytest.raises(ValueError, match="finite"):
        fit_psf_photometry(img, var, mask, psf, [np.nan], [1.0])
    empty = fit_psf_photometry(img, var, mask, psf, np.zeros(0), np.zeros(0))
    assert len(empty) == 0


def test_oversize_groups_fall_back_to_neighbour_subtraction():
    """A chain of ten stars 2 FWHM apart exceeds max_group: its members are fitted alone with
    their neighbours' light subtracted, and still come out right."""
    rng = np.random.default_rng(16)
    shape = (400, 400)
    psf = true_psf(shape)
    fwhm = float(psf.shape_at(0, 0).fwhm_major)
    x = 100.3 + 2.0 * fwhm * np.arange(10)
    y = 200.6 + rng.uniform(-0.5, 0.5, 10)
    flux = np.full(10, 4e4)
    data, var, _, mask = observe(render(psf, shape, x, y, flux, half=40), rng)
    ph = fit_psf_photometry(data, var, mask, psf, x + 0.2, y - 0.2, gain=1.0, max_group=4)
    assert np.all(ph.flags & PHOT_BIG_GROUP)
    assert np.all(np.abs(ph.flux - flux) < 4 * ph.flux_sig)
    joint = fit_psf_photometry(data, var, mask, psf, x + 0.2, y - 0.2, gain=1.0, max_group=16)
    assert np.all(joint.flags & PHOT_BLENDED) and len(np.unique(joint.group)) == 1
    assert np.all(np.abs(joint.flux - flux) < 4 * joint.flux_sig)
