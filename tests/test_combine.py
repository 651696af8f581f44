"""Tests of ps1mpi.algorithms.combine against constructed inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ps1mpi.algorithms import maskbits
from ps1mpi.algorithms.combine import (combine_images, compute_input_weights, inputs_to_drop,
                                       reject_outliers)


def noise_stack(n_in, shape, sigmas, rng):
    images = [rng.normal(0.0, s, shape).astype(np.float32) for s in sigmas]
    variances = [np.full(shape, s * s, np.float32) for s in sigmas]
    masks = [np.zeros(shape, np.uint16) for _ in range(n_in)]
    return images, variances, masks


def gaussian(shape, x0, y0, sigma, amp):
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return (amp * np.exp(-0.5 * ((x - x0) ** 2 + (y - y0) ** 2) / sigma ** 2)).astype(np.float32)


def test_cosmic_ray_removed_and_real_sources_kept():
    rng = np.random.default_rng(1)
    shape = (64, 64)
    sigmas = np.array([1.0, 1.1, 0.9, 1.2, 1.0, 1.3, 0.95, 1.05])
    images, variances, masks = noise_stack(8, shape, sigmas, rng)
    star = gaussian(shape, 45.3, 18.6, 1.6, 400.0)
    transient = gaussian(shape, 40.2, 44.7, 1.6, 40.0)
    for k in range(8):
        # a variable star (+-8%) in every input; a transient that appears in inputs 3..7
        images[k] += star * (1 + 0.08 * np.sin(k))
        variances[k] += star * (1 + 0.08 * np.sin(k)) / 10
        if k >= 3:
            images[k] += transient
    images[3][20, 20] += 300.0   # cosmic ray and its tail in input 3
    images[3][20, 21] += 60.0
    images[6][45, 19] += 150.0   # a cosmic ray on the wing of the star
    w = compute_input_weights(variances, masks)
    res = combine_images(images, variances, masks, weights=w)

    # the cosmic ray and its tail are rejected, grown by one pixel, only in input 3
    assert res.rejected_mask[3, 19:22, 19:23].all()
    assert not res.rejected_mask[np.arange(8) != 3][:, 20, 20].any()
    sig = np.sqrt(res.variance)
    for y, x in [(20, 20), (20, 21), (45, 19)]:
        expected = np.average([images[k][y, x] for k in range(8) if not res.rejected_mask[k, y, x]],
                              weights=[w[k] for k in range(8) if not res.rejected_mask[k, y, x]])
        assert res.image[y, x] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert abs(res.image[y, x] - star[y, x] * (1 + 0.08 * np.mean(np.sin(np.arange(8))))) \
            < 5 * sig[y, x]
    assert res.rejected_mask[6, 45, 19]
    assert (res.mask[20, 20] & maskbits.REJECTED) and not (res.mask[20, 20] & maskbits.BAD)

    # the variable star is not clipped anywhere
    core = star > 20
    assert not res.rejected_mask[:, core].any()
    # the transient present in 5 of 8 inputs is kept: its inputs are not rejected, and the
    # stack shows it at its full amplitude (the 3 inputs without it are the outliers)
    peak = (44, 40)
    assert not res.rejected_mask[3:, peak[0], peak[1]].any()
    assert res.rejected_mask[:3, peak[0], peak[1]].all()
    assert res.image[peak] == pytest.approx(transient[peak] + star[peak], abs=5 * sig[peak])
    assert res.dropped_inputs == ()


def test_normalised_residuals_of_noise_have_unit_width():
    rng = np.random.default_rng(2)
    shape = (256, 256)
    n_in = 8
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    images, variances, masks = [], [], []
    for k in range(n_in):
        # per-input level times a gradient that differs between inputs
        var = (1.0 + 0.3 * k) * (1.0 + 0.8 * ((x if k % 2 else y) / shape[0]))
        variances.append(var.astype(np.float32))
        images.append((rng.normal(0.0, 1.0, shape) * np.sqrt(var)).astype(np.float32))
        m = np.zeros(shape, np.uint16)
        m[rng.integers(0, shape[0], 500), rng.integers(0, shape[1], 500)] = maskbits.DETECTOR
        masks.append(m)
    w = compute_input_weights(variances, masks)
    res = combine_images(images, variances, masks, weights=w)
    good = (res.mask & maskbits.BAD) == 0
    z = res.image[good] / np.sqrt(res.variance[good])
    assert good.mean() > 0.99
    assert z.std() == pytest.approx(1.0, abs=0.01)
    assert abs(z.mean()) < 0.01
    # pure noise: only a few pixels are rejected, nothing dropped
    assert res.reject_fraction.max() < 0.01
    assert res.dropped_inputs == ()
    # variance of the weighted mean from the per-pixel variances, exactly
    sel = good & (res.n_inputs == n_in) & ~res.rejected_mask.any(0)
    wv = sum(w[k] ** 2 * variances[k] for k in range(n_in)) / w.sum() ** 2
    assert np.allclose(res.variance[sel], wv[sel], rtol=1e-6)


def test_inverse_variance_weights_give_one_over_sum_of_weights():
    rng = np.random.default_rng(3)
    sigmas = np.array([1.0, 2.0, 0.5, 1.5])
    images, variances, masks = noise_stack(4, (50, 50), sigmas, rng)
    masks[2][10:20, :] = maskbits.SAT  # ignored by the median
    variances[2][10:20, :] = 1e6
    w = compute_input_weights(variances, masks)
    assert np.allclose(w, 1 / sigmas ** 2)
    res = combine_images(images, variances, masks, weights=w, grow=0)
    full = (res.n_inputs == 4) & ~res.rejected_mask.any(0)
    assert np.allclose(res.variance[full], 1.0 / w.sum(), rtol=1e-6)
    three = (res.n_inputs == 3) & ~res.rejected_mask.any(0)
    assert three[10:20].mean() > 0.95
    assert np.allclose(res.variance[three & (np.arange(50)[:, None] >= 10)
                                   & (np.arange(50)[:, None] < 20)],
                       1.0 / (w.sum() - w[2]), rtol=1e-6)


def _corrupted_inputs(rng):
    shape = (120, 90)
    sigmas = np.array([1.0, 1.2, 0.8, 1.1, 1.0, 0.9])
    images, variances, masks = noise_stack(6, shape, sigmas, rng)
    for k in range(6):
        cy, cx = rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)
        images[k][cy, cx] += rng.uniform(20, 200, 40)
        masks[k][rng.integers(0, shape[0], 30), rng.integers(0, shape[1], 30)] |= maskbits.DETECTOR
        masks[k][:, 5 + 7 * k] |= maskbits.CONV  # advisory bit in a column
    masks[1][40:60, :] |= maskbits.GAP
    # input 5 is badly corrupted over a large area (bad background subtraction)
    images[5][10:50, :] += 25.0
    return images, variances, masks


def test_row_bands_are_bit_identical_to_the_whole():
    rng = np.random.default_rng(4)
    images, variances, masks = _corrupted_inputs(rng)
    w = compute_input_weights(variances, masks)
    exptimes = np.array([30.0, 45.0, 30.0, 60.0, 30.0, 40.0])
    whole = combine_images(images, variances, masks, weights=w, exptimes=exptimes)
    assert whole.dropped_inputs == (5,)
    ny = images[0].shape[0]
    grow = 1
    bands = [(0, 37), (37, 38), (38, 81), (81, ny)]

    def cut(arrays, r0, r1):
        a0, a1 = max(r0 - grow, 0), min(r1 + grow, ny)
        return [a[a0:a1] for a in arrays], (r0 - a0, a1 - r1)

    # pass 1: rejection per band; the drop decision from the summed counts
    first = []
    n_rej = np.zeros(6, np.int64)
    n_val = np.zeros(6, np.int64)
    for r0, r1 in bands:
        (im, halo), (va, _), (mk, _) = (cut(images, r0, r1), cut(variances, r0, r1),
                                         cut(masks, r0, r1))
        rej = reject_outliers(im, va, mk, weights=w, grow=grow, halo=halo)
        first.append(rej)
        n_rej += rej.n_rejected
        n_val += rej.n_valid
    dropped = inputs_to_drop(n_rej, n_val)
    assert dropped == whole.dropped_inputs
    # pass 2: combination per band with the global decision
    parts = []
    for (r0, r1), rej in zip(bands, first):
        (im, halo), (va, _), (mk, _) = (cut(images, r0, r1), cut(variances, r0, r1),
                                         cut(masks, r0, r1))
        parts.append(combine_images(im, va, mk, weights=w, exptimes=exptimes, grow=grow,
                                    halo=halo, dropped=dropped, rejection=rej))
    for name in ("image", "variance", "mask", "n_inputs", "exptime_map"):
        joined = np.concatenate([getattr(p, name) for p in parts], axis=0)
        assert np.array_equal(joined, getattr(whole, name)), name
    joined = np.concatenate([p.rejected_mask for p in parts], axis=1)
    assert np.array_equal(joined, whole.rejected_mask)
    assert np.allclose(whole.reject_fraction, n_rej / n_val)


def test_dropped_input_is_left_out_entirely():
    rng = np.random.default_rng(4)
    images, variances, masks = _corrupted_inputs(rng)
    w = compute_input_weights(variances, masks)
    res = combine_images(images, variances, masks, weights=w)
    assert res.dropped_inputs == (5,)
    assert res.reject_fraction[5] > 0.1 and res.reject_fraction[:5].max() < 0.1
    assert not res.rejected_mask[5].any()
    assert res.n_inputs.max() == 5
    rest = combine_images(images[:5], variances[:5], masks[:5], weights=w[:5])
    assert rest.dropped_inputs == ()
    assert np.array_equal(res.image, rest.image)
    assert np.array_equal(res.variance, rest.variance)
    assert np.array_equal(res.mask, rest.mask)
    # the same result when the drop is decided beforehand
    again = combine_images(images, variances, masks, weights=w, dropped=(5,))
    assert np.array_equal(again.image, res.image)
    # without the drop test the corrupted band is rejected pixel by pixel and the rest of
    # input 5 is used
    kept = combine_images(images, variances, masks, weights=w, max_reject_fraction=1.0)
    assert kept.dropped_inputs == ()
    assert kept.rejected_mask[5, 10:50].mean() > 0.95
    assert kept.n_inputs[60:].max() == 6
    assert abs(kept.image[10:50].mean()) < 0.05


def test_small_numbers_of_inputs_and_masks():
    shape = (4, 4)
    images = [np.full(shape, v, np.float32) for v in (10.0, 10.5, 50.0)]
    variances = [np.ones(shape, np.float32) for _ in range(3)]
    masks = [np.zeros(shape, np.uint16) for _ in range(3)]
    masks[2][:, :] = maskbits.SAT          # input 2 is unusable everywhere
    masks[1][0, 0] = maskbits.CR           # pixel (0,0): a single input
    masks[0][0, 1] = maskbits.DETECTOR
    masks[1][0, 1] = maskbits.GHOST        # pixel (0,1): none
    images[1][1, 1] = 30.0                 # pixel (1,1): two inputs that disagree
    masks[0][2:, :] |= maskbits.CONV
    masks[1][2:, :] |= maskbits.SUSPECT
    kw = dict(grow=0, exptimes=np.array([30.0, 40.0, 50.0]))
    res = combine_images(images, variances, masks, **kw)
    # two consistent inputs: their mean; variance of the mean
    assert res.image[3, 3] == pytest.approx(10.25)
    assert res.variance[3, 3] == pytest.approx(0.5)
    assert res.n_inputs[3, 3] == 2 and res.exptime_map[3, 3] == 70.0
    assert res.mask[3, 3] == 0  # CONV, SUSPECT each in only half of the inputs
    # single input: not trusted (safe); no input: OR of the inputs' bad bits
    assert res.mask[0, 0] & maskbits.BAD and res.n_inputs[0, 0] == 0 and res.image[0, 0] == 0
    assert res.mask[0, 0] == maskbits.CR | maskbits.SAT
    assert res.mask[0, 1] == maskbits.DETECTOR | maskbits.GHOST | maskbits.SAT
    assert res.exptime_map[0, 1] == 0
    # two inputs that disagree: both rejected
    assert res.rejected_mask[:2, 1, 1].all()
    assert res.mask[1, 1] == maskbits.REJECTED | maskbits.SAT  # unusable: the bad bits seen there
    # without safety a single input is taken as it is, and a disagreeing pair averaged
    loose = combine_images(images, variances, masks, safe=False, **kw)
    assert loose.image[0, 0] == 10.0 and loose.variance[0, 0] == 1.0 and loose.mask[0, 0] == 0
    assert loose.image[1, 1] == pytest.approx(20.0)
    # an advisory bit present in most inputs is kept
    masks[1][2:, :] |= maskbits.CONV
    res = combine_images(images, variances, masks, **kw)
    assert res.mask[3, 3] == maskbits.CONV


def test_weights_scale_invariance_and_zero_weight():
    rng = np.random.default_rng(6)
    images, variances, masks = noise_stack(5, (40, 40), [1.0, 1.5, 2.0, 1.0, 1.2], rng)
    w = compute_input_weights(variances, masks)
    a = combine_images(images, variances, masks, weights=w)
    b = combine_images(images, variances, masks, weights=w * 1e6)
    assert np.allclose(a.image, b.image, rtol=1e-6, atol=1e-6)
    assert np.array_equal(a.rejected_mask, b.rejected_mask)
    # an input with weight 0 takes no part
    w0 = w.copy()
    w0[2] = 0.0
    c = combine_images(images, variances, masks, weights=w0)
    d = combine_images(images[:2] + images[3:], variances[:2] + variances[3:],
                       masks[:2] + masks[3:], weights=np.delete(w, 2))
    assert np.array_equal(c.image, d.image)
    assert c.n_inputs.max() == 4


def test_bad_input_is_reported():
    rng = np.random.default_rng(7)
    images, variances, masks = noise_stack(3, (10, 10), [1, 1, 1], rng)
    with pytest.raises(ValueError, match=r"variances\[1\]"):
        combine_images(images, [variances[0], variances[1][:5], variances[2]], masks)
    with pytest.raises(ValueError, match="weights"):
        combine_images(images, variances, masks, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        combine_images(images, variances, masks, weights=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="halo"):
        combine_images(images, variances, masks, halo=(5, 5))
    with pytest.raises(ValueError, match="empty"):
        combine_images([], [], [])
    with pytest.raises(ValueError, match="exptimes"):
        combine_images(images, variances, masks, exptimes=[1.0])
    with pytest.raises(ValueError, match="dropped"):
        combine_images(images, variances, masks, dropped=[7])
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        combine_images(images, variances, [m.astype(np.float32) for m in masks])
