"""The simulated sky: stars, galaxies, transients and moving objects, deterministic from a seed.

Everything is drawn inside a spherical cap that covers the survey's pointings plus a margin.
Magnitudes are AB-like PS1 magnitudes in g r i z y w. Stars follow a broken power-law number
count in r, colours on a stellar locus in the PS1 bands, proper motions from a disc/halo
kinematic model; galaxies are Sersic profiles (exponential, de Vaucouleurs and general n) with
sizes shrinking with magnitude; transients are supernova-like light curves near galaxies;
moving objects are asteroids on linear tracks. ``docs/sim.md`` lists every distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BANDS", "SURVEY_BANDS", "REF_EPOCH", "MJD_J2000", "SkyParams", "Sky",
    "make_sky", "w_from_gri", "star_mags_at", "transient_mags_at", "mover_positions_at",
    "mjd_to_year", "year_to_mjd", "propagate", "angular_sep_deg", "offset_point",
    "draw_broken_power_law", "counts_between",
]

BANDS = ("g", "r", "i", "z", "y", "w")
SURVEY_BANDS = ("g", "r", "i", "z", "y")
MJD_J2000 = 51544.5
REF_EPOCH = 2015.5            # Julian year of the reference positions (Gaia-DR2-like)
_DAYS_PER_YEAR = 365.25
_MAS = 1.0 / 3.6e6            # degrees per milliarcsecond

# Approximate PS1 stellar locus: g-r -> (r-i, i-z, z-y); main sequence from A stars to M dwarfs.
_LOCUS = np.array([
    # g-r    r-i    i-z    z-y
    [-0.30, -0.20, -0.13, -0.07],
    [0.00, -0.05, -0.04, -0.02],
    [0.30, 0.08, 0.02, 0.01],
    [0.60, 0.20, 0.09, 0.04],
    [0.90, 0.33, 0.16, 0.08],
    [1.10, 0.45, 0.22, 0.11],
    [1.25, 0.75, 0.36, 0.18],
    [1.35, 1.15, 0.55, 0.27],
    [1.45, 1.60, 0.78, 0.38],
    [1.55, 2.10, 1.00, 0.48],
])

STAR_DTYPE = np.dtype([
    ("id", "i8"), ("ra", "f8"), ("dec", "f8"), ("pmra", "f4"), ("pmdec", "f4"),
    ("g", "f4"), ("r", "f4"), ("i", "f4"), ("z", "f4"), ("y", "f4"), ("w", "f4"),
    ("var_amp", "f4"), ("var_period", "f4"), ("var_phase", "f4"), ("injected", "u1"),
])
GALAXY_DTYPE = np.dtype([
    ("id", "i8"), ("ra", "f8"), ("dec", "f8"),
    ("g", "f4"), ("r", "f4"), ("i", "f4"), ("z", "f4"), ("y", "f4"), ("w", "f4"),
    ("sersic_n", "f4"), ("r_e", "f4"), ("q", "f4"), ("pa", "f4"),
])
TRANSIENT_DTYPE = np.dtype([
    ("id", "i8"), ("ra", "f8"), ("dec", "f8"), ("host_id", "i8"), ("t_peak", "f8"),
    ("r_peak", "f4"), ("tau_rise", "f4"), ("decline", "f4"),
    ("dg", "f4"), ("di", "f4"), ("dz", "f4"), ("dy", "f4"),
])
MOVER_DTYPE = np.dtype([
    ("id", "i8"), ("ra0", "f8"), ("dec0", "f8"), ("mjd0", "f8"), ("rate_ra", "f4"),
    ("rate_dec", "f4"), ("g", "f4"), ("r", "f4"), ("i", "f4"), ("z", "f4"), ("y", "f4"), ("w", "f4"),
])

# id ranges keep the kinds apart in truth tables
ID_STAR, ID_GALAXY, ID_TRANSIENT, ID_MOVER = 0, 100_000_000, 200_000_000, 300_000_000


@dataclass
class SkyParams:
    """Knobs of the sky model.

    Attributes
    ----------
    star_density : float
        Stars brighter than r = 21 per square degree (the density knob; 40000 gives the test
        camera's 3.5' chips ~130 stars with 14 < r < 21; a moderate-latitude field has ~5000-10000).
    star_slope_bright, star_slope_faint : float
        d log10 N / dm of the star counts below and above r = 18.
    galaxy_density : float
        Galaxies brighter than r = 22 per square degree.
    galaxy_slope : float
        d log10 N / dm of the galaxy counts.
    mag_bright, mag_faint : float
        r-band range drawn (stars and galaxies).
    variable_fraction : float
        Fraction of stars that are periodic variables.
    transient_density : float
        Supernova-like transients per square degree active during the survey.
    mover_density : float
        Asteroids per square degree per night (r < 22).
    inject_bright : int
        Bright stars the survey places per pointing to exercise the bright-star artefacts even
        on a small camera: one inside the field (r 8.5-10.5), the others just outside the
        edge of the focal plane (r 6.5-8, glints and ghosts).
    """

    star_density: float = 40000.0
    star_slope_bright: float = 0.30
    star_slope_faint: float = 0.22
    galaxy_density: float = 4000.0
    galaxy_slope: float = 0.40
    mag_bright: float = 11.0
    mag_faint: float = 24.0
    variable_fraction: float = 0.03
    transient_density: float = 150.0
    mover_density: float = 150.0
    inject_bright: int = 2


@dataclass
class Sky:
    """The simulated sky.

    Attributes
    ----------
    stars, galaxies, transients, movers : ndarray
        Structured arrays (``STAR_DTYPE`` etc.). Star positions are at :data:`REF_EPOCH`;
        proper motions are ``pmra`` = mu_alpha* (includes cos dec) and ``pmdec`` in mas/yr.
    center : tuple
        (ra, dec) of the cap (deg).
    radius : float
        Cap radius (deg).
    params : SkyParams
    """

    stars: np.ndarray
    galaxies: np.ndarray
    transients: np.ndarray
    movers: np.ndarray
    center: tuple[float, float]
    radius: float
    params: SkyParams = field(default_factory=SkyParams)


# --------------------------------------------------------------------------------------------
# time and coordinates
# --------------------------------------------------------------------------------------------

def mjd_to_year(mjd):
    """MJD -> Julian year."""
    return 2000.0 + (np.asarray(mjd, dtype=np.float64) - MJD_J2000) / _DAYS_PER_YEAR


def year_to_mjd(year):
    """Julian year -> MJD."""
    return MJD_J2000 + (np.asarray(year, dtype=np.float64) - 2000.0) * _DAYS_PER_YEAR


def propagate(ra, dec, pmra, pmdec, years):
    """Move positions by proper motion over ``years`` (linear in the tangent plane).

    Parameters
    ----------
    ra, dec : array
        Positions (deg) at the catalog epoch.
    pmra, pmdec : array
        Proper motions (mas/yr), ``pmra`` including cos(dec).
    years : float or array
        Time since the catalog epoch (Julian years).

    Returns
    -------
    ra, dec : ndarray
        Positions (deg).
    """
    dec = np.asarray(dec, dtype=np.float64)
    cosd = np.cos(np.radians(dec))
    dra = np.asarray(pmra, dtype=np.float64) * years * _MAS / np.maximum(cosd, 1e-9)
    ddec = np.asarray(pmdec, dtype=np.float64) * years * _MAS
    return (np.asarray(ra, dtype=np.float64) + dra) % 360.0, dec + ddec


def angular_sep_deg(ra1, dec1, ra2, dec2):
    """Great-circle separation (deg), haversine form."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def _random_in_cap(rng, n, ra0, dec0, radius):
    """Uniform points in a spherical cap of ``radius`` deg about (ra0, dec0)."""
    cosr = np.cos(np.radians(radius))
    z = rng.uniform(cosr, 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    s = np.sqrt(1 - z * z)
    # cap about the +z pole, then rotate the pole to (ra0, dec0)
    x, y = s * np.cos(phi), s * np.sin(phi)
    a, d = np.radians(ra0), np.radians(dec0)
    # rotation: pole -> (a, d): first tilt about y by (90 - dec), then about z by ra
    t = np.pi / 2 - d
    x1 = x * np.cos(t) + z * np.sin(t)
    z1 = -x * np.sin(t) + z * np.cos(t)
    x2 = x1 * np.cos(a) - y * np.sin(a)
    y2 = x1 * np.sin(a) + y * np.cos(a)
    ra = np.degrees(np.arctan2(y2, x2)) % 360.0
    dec = np.degrees(np.arcsin(np.clip(z1, -1, 1)))
    return ra, dec


def offset_point(ra, dec, dx_arcsec, dy_arcsec):
    """Point offset by (dx East, dy North) arcsec in the tangent plane (gnomonic)."""
    a0, d0 = np.radians(ra), np.radians(dec)
    xi, eta = np.radians(np.asarray(dx_arcsec) / 3600.0), np.radians(np.asarray(dy_arcsec) / 3600.0)
    den = np.cos(d0) - eta * np.sin(d0)
    a = a0 + np.arctan2(xi, den)
    d = np.arctan2(np.sin(d0) + eta * np.cos(d0), np.hypot(xi, den))
    return np.degrees(a) % 360.0, np.degrees(d)


# --------------------------------------------------------------------------------------------
# magnitudes
# --------------------------------------------------------------------------------------------

def w_from_gri(g, r, i):
    """PS1 w-band magnitude of a source from its g, r, i magnitudes.

    The w filter spans g+r+i; the simulator's w magnitude is the magnitude of the mean of the
    three band fluxes: ``w = -2.5 log10((10^(-0.4 g) + 10^(-0.4 r) + 10^(-0.4 i)) / 3)``.
    (This is the formula a camera stage should use to synthesise w for reference stars.)
    """
    g, r, i = (np.asarray(v, dtype=np.float64) for v in (g, r, i))
    f = (10 ** (-0.4 * g) + 10 ** (-0.4 * r) + 10 ** (-0.4 * i)) / 3.0
    return -2.5 * np.log10(f)


def draw_broken_power_law(rng, n, m_lo, m_hi, m_break, a1, a2):
    """Magnitudes with dN/dm ~ 10^(a1 m) below m_break and 10^(a2 m) above (continuous)."""
    def cum(m):
        m = np.asarray(m, dtype=np.float64)
        lo = np.minimum(m, m_break)
        c = (10 ** (a1 * (lo - m_break)) - 10 ** (a1 * (m_lo - m_break))) / (a1 * np.log(10))
        hi = np.clip(m, m_break, None)
        c2 = (10 ** (a2 * (hi - m_break)) - 1.0) / (a2 * np.log(10))
        return c + np.where(m > m_break, c2, 0.0)
    grid = np.linspace(m_lo, m_hi, 2048)
    cdf = cum(grid)
    u = rng.uniform(0, cdf[-1], n)
    return np.interp(u, cdf, grid)


def counts_between(density_at_ref, m_ref, m_lo, m_hi, m_break, a1, a2):
    """Number per deg^2 in [m_lo, m_hi] for counts normalised to N(< m_ref) = density_at_ref."""
    def cum(m):  # N(<m) up to a constant, counts start far bright
        lo = min(m, m_break)
        c = 10 ** (a1 * (lo - m_break)) / (a1 * np.log(10))
        if m > m_break:
            c += (10 ** (a2 * (m - m_break)) - 1.0) / (a2 * np.log(10))
        return c
    scale = density_at_ref / cum(m_ref)
    return scale * (cum(m_hi) - cum(m_lo))


def _stellar_colours(rng, r):
    n = r.size
    p_red = np.clip(0.15 + 0.08 * (r - 15.0), 0.1, 0.55)
    p_halo = 0.2
    u = rng.uniform(size=n)
    gr = np.where(u < p_halo, rng.normal(0.33, 0.07, n),
                  np.where(u < p_halo + p_red, rng.normal(1.30, 0.15, n), rng.normal(0.60, 0.18, n)))
    gr = np.clip(gr, -0.25, 1.55)
    halo = u < p_halo
    ri = np.interp(gr, _LOCUS[:, 0], _LOCUS[:, 1]) + rng.normal(0, 0.02, n)
    iz = np.interp(gr, _LOCUS[:, 0], _LOCUS[:, 2]) + rng.normal(0, 0.02, n)
    zy = np.interp(gr, _LOCUS[:, 0], _LOCUS[:, 3]) + rng.normal(0, 0.02, n)
    return gr, ri, iz, zy, halo


def _proper_motions(rng, r, gr, halo):
    """Proper motions (mas/yr) from a crude photometric distance and disc/halo velocities."""
    n = r.size
    abs_r = 1.9 + 6.5 * np.clip(gr, 0.0, 1.55)
    dist_pc = 10 ** ((r - abs_r + 5.0) / 5.0)
    vmean = np.where(halo[:, None], np.array([-180.0, -90.0]), np.array([-15.0, -8.0]))
    vdisp = np.where(halo, 110.0, 30.0)[:, None]
    v = vmean + vdisp * rng.normal(size=(n, 2))
    pm = v / (4.74 * dist_pc[:, None]) * 1000.0
    return pm[:, 0], pm[:, 1]


# --------------------------------------------------------------------------------------------
# the sky
# --------------------------------------------------------------------------------------------

def make_sky(center: tuple[float, float], radius: float, *, seed: int, mjd_range: tuple[float, float],
             pointings: list[tuple[float, float]] | None = None, field_radius: float = 0.05,
             nights: list[int] | None = None, extra_stars: list[tuple[float, float, float]] | None = None,
             params: SkyParams | None = None) -> Sky:
    """Draw the sky in a cap of ``radius`` deg about ``center`` (ra, dec).

    Parameters
    ----------
    center : (float, float)
        Cap centre (deg).
    radius : float
        Cap radius (deg); cover every pointing plus the reference-catalog padding.
    seed : int
        Random seed; the same seed gives the same sky.
    mjd_range : (float, float)
        Span of the survey (MJD): transients peak within it (+-30 d), movers are created per
        night inside it.
    pointings : list of (ra, dec), optional
        Field centres: transients are put near galaxies inside them, movers around them.
    field_radius : float
        Radius of a pointing's field (deg).
    nights : list of int, optional
        Integer MJDs of the observing nights (movers are created for these); default every
        night of ``mjd_range``.
    extra_stars : list of (ra, dec, r), optional
        Stars added to the random ones (flagged ``injected``), e.g. bright stars placed to
        exercise saturation, ghosts, spikes and glints.
    params : SkyParams, optional

    Returns
    -------
    Sky
    """
    p = params or SkyParams()
    if radius <= 0 or radius > 30:
        raise ValueError(f"radius {radius} deg must be in (0, 30]")
    rng = np.random.default_rng([int(seed), 101])
    area = 2 * np.pi * (1 - np.cos(np.radians(radius))) * (180 / np.pi) ** 2

    # ---- stars
    n_star = rng.poisson(area * counts_between(p.star_density, 21.0, p.mag_bright, p.mag_faint, 18.0,
                                                p.star_slope_bright, p.star_slope_faint))
    r = draw_broken_power_law(rng, n_star, p.mag_bright, p.mag_faint, 18.0,
                               p.star_slope_bright, p.star_slope_faint)
    ra, dec = _random_in_cap(rng, n_star, *center, radius)
    injected = np.zeros(n_star, np.uint8)
    if extra_stars:
        ex = np.asarray(extra_stars, dtype=np.float64).reshape(-1, 3)
        ra = np.concatenate([ra, ex[:, 0]])
        dec = np.concatenate([dec, ex[:, 1]])
        r = np.concatenate([r, ex[:, 2]])
        injected = np.concatenate([injected, np.ones(ex.shape[0], np.uint8)])
        n_star = r.size
    gr, ri, iz, zy, halo = _stellar_colours(rng, r)
    pmra, pmdec = _proper_motions(rng, r, gr, halo)
    stars = np.zeros(n_star, STAR_DTYPE)
    stars["id"] = ID_STAR + np.arange(n_star)
    stars["ra"], stars["dec"] = ra, dec
    stars["pmra"], stars["pmdec"] = pmra, pmdec
    stars["r"] = r
    stars["g"] = r + gr
    stars["i"] = r - ri
    stars["z"] = r - ri - iz
    stars["y"] = r - ri - iz - zy
    stars["w"] = w_from_gri(stars["g"], stars["r"], stars["i"])
    var = rng.uniform(size=n_star) < p.variable_fraction
    var &= injected == 0
    stars["var_amp"] = np.where(var, rng.uniform(0.1, 0.6, n_star), 0.0)
    stars["var_period"] = np.where(var, 10 ** rng.uniform(np.log10(0.3), 1.0, n_star), 0.0)
    stars["var_phase"] = np.where(var, rng.uniform(0, 1, n_star), 0.0)
    stars["injected"] = injected

    # ---- galaxies
    n_gal = rng.poisson(area * counts_between(p.galaxy_density, 22.0, 15.0, p.mag_faint, 15.0,
                                               p.galaxy_slope, p.galaxy_slope))
    rg = draw_broken_power_law(rng, n_gal, 15.0, p.mag_faint, 15.0, p.galaxy_slope, p.galaxy_slope)
    gra, gdec = _random_in_cap(rng, n_gal, *center, radius)
    u = rng.uniform(size=n_gal)
    n_s = np.where(u < 0.55, 1.0, np.where(u < 0.80, 4.0, rng.uniform(0.5, 6.0, n_gal)))
    early = n_s >= 2.5
    r_e = np.exp(np.log(1.2 * 10 ** (-0.15 * (rg - 20.0))) + rng.normal(0, 0.4, n_gal))
    r_e = np.clip(np.where(early, 0.7 * r_e, r_e), 0.15, 12.0)
    q = np.where(early, rng.uniform(0.5, 1.0, n_gal), rng.uniform(0.2, 1.0, n_gal))
    gal = np.zeros(n_gal, GALAXY_DTYPE)
    gal["id"] = ID_GALAXY + np.arange(n_gal)
    gal["ra"], gal["dec"] = gra, gdec
    g_r = np.where(early, rng.normal(0.95, 0.10, n_gal), rng.normal(0.55, 0.15, n_gal))
    r_i = np.where(early, rng.normal(0.45, 0.06, n_gal), rng.normal(0.30, 0.08, n_gal))
    i_z = rng.normal(0.25, 0.06, n_gal)
    z_y = rng.normal(0.12, 0.05, n_gal)
    gal["r"] = rg
    gal["g"] = rg + g_r
    gal["i"] = rg - r_i
    gal["z"] = rg - r_i - i_z
    gal["y"] = rg - r_i - i_z - z_y
    gal["w"] = w_from_gri(gal["g"], gal["r"], gal["i"])
    gal["sersic_n"], gal["r_e"], gal["q"] = n_s, r_e, q
    gal["pa"] = rng.uniform(0, 180, n_gal)

    # ---- transients: near galaxies brighter than r = 22.5
    n_tr = rng.poisson(area * p.transient_density)
    hosts = np.flatnonzero(gal["r"] < 22.5)
    tr = np.zeros(n_tr if hosts.size else 0, TRANSIENT_DTYPE)
    if tr.size:
        if pointings:
            # favour hosts inside the fields so that the survey sees them
            sep = np.min([angular_sep_deg(gal["ra"][hosts], gal["dec"][hosts], a, d) for a, d in pointings], axis=0)
            inside = hosts[sep < field_radius]
            if inside.size:
                hosts = inside
        h = rng.choice(hosts, tr.size, replace=hosts.size < tr.size)
        off = gal["r_e"][h] * rng.uniform(0.2, 1.5, tr.size)
        ang = rng.uniform(0, 2 * np.pi, tr.size)
        tr["ra"], tr["dec"] = offset_point(gal["ra"][h], gal["dec"][h], off * np.cos(ang), off * np.sin(ang))
        tr["id"] = ID_TRANSIENT + np.arange(tr.size)
        tr["host_id"] = gal["id"][h]
        t0, t1 = mjd_range
        tr["t_peak"] = rng.uniform(t0 - 10.0, t1 + 10.0, tr.size)
        tr["r_peak"] = rng.uniform(18.5, 21.5, tr.size)
        tr["tau_rise"] = rng.uniform(7.0, 14.0, tr.size)
        tr["decline"] = rng.uniform(0.02, 0.05, tr.size)
        tr["dg"] = rng.normal(0.05, 0.10, tr.size)
        tr["di"] = rng.normal(0.15, 0.08, tr.size)
        tr["dz"] = rng.normal(0.30, 0.10, tr.size)
        tr["dy"] = rng.normal(0.40, 0.10, tr.size)

    # ---- movers: per night, around each pointing
    movers = []
    if pointings:
        if nights is None:
            nights = np.arange(np.floor(mjd_range[0]), np.floor(mjd_range[1]) + 1)
        fa = np.pi * (field_radius * 1.5) ** 2
        for night in nights:
            for (pra, pdec) in pointings:
                k = rng.poisson(p.mover_density * fa)
                if k == 0:
                    continue
                m = np.zeros(k, MOVER_DTYPE)
                rad = np.sqrt(rng.uniform(0, 1, k)) * field_radius * 1.5 * 3600
                ang = rng.uniform(0, 2 * np.pi, k)
                m["ra0"], m["dec0"] = offset_point(pra, pdec, rad * np.cos(ang), rad * np.sin(ang))
                m["mjd0"] = night + 0.5
                fast = rng.uniform(size=k) < 0.1
                rate = np.where(fast, rng.uniform(1.0, 4.0, k), rng.uniform(0.1, 0.35, k))  # deg/day
                pa = np.radians(np.where(fast, rng.uniform(0, 360, k), 265 + rng.normal(0, 10, k)))
                m["rate_ra"] = rate * np.sin(pa)     # deg/day on the sky (East), includes cos dec
                m["rate_dec"] = rate * np.cos(pa)
                rr = rng.uniform(17.0, 22.0, k)
                m["r"] = rr
                m["g"] = rr + rng.normal(0.55, 0.07, k)
                m["i"] = rr - rng.normal(0.15, 0.05, k)
                m["z"] = m["i"] - rng.normal(0.05, 0.05, k)
                m["y"] = m["z"] - rng.normal(0.02, 0.04, k)
                m["w"] = w_from_gri(m["g"], m["r"], m["i"])
                movers.append(m)
    mv = np.concatenate(movers) if movers else np.zeros(0, MOVER_DTYPE)
    mv["id"] = ID_MOVER + np.arange(mv.size)
    return Sky(stars=stars, galaxies=gal, transients=tr, movers=mv, center=tuple(center),
               radius=float(radius), params=p)


# --------------------------------------------------------------------------------------------
# time-dependent quantities
# --------------------------------------------------------------------------------------------

_VAR_BAND_SCALE = {"g": 1.3, "r": 1.0, "i": 0.8, "z": 0.7, "y": 0.6, "w": 1.0}


def star_mags_at(stars: np.ndarray, band: str, mjd: float) -> np.ndarray:
    """Magnitudes of ``stars`` in ``band`` at ``mjd`` (periodic variables modulated)."""
    if band not in BANDS:
        raise ValueError(f"band {band!r} is not one of {BANDS}")
    m = stars[band].astype(np.float64)
    var = stars["var_amp"] > 0
    if np.any(var):
        ph = (mjd / np.where(var, stars["var_period"], 1.0) + stars["var_phase"]) % 1.0
        m = m + np.where(var, 0.5 * _VAR_BAND_SCALE[band] * stars["var_amp"] * np.sin(2 * np.pi * ph), 0.0)
    return m


def transient_mags_at(tr: np.ndarray, band: str, mjd: float) -> np.ndarray:
    """Magnitudes of supernova-like transients at ``mjd`` (inf before explosion).

    Flux rises as a half-Gaussian of width ``tau_rise`` days to the peak and declines linearly
    in magnitude (``decline`` mag/day, 1.3x faster in g and 0.7x in z, y) afterwards; colour
    offsets ``dg``, ``di``, ``dz``, ``dy`` relative to r at peak; w from g, r, i.
    """
    if band == "w":
        return w_from_gri(transient_mags_at(tr, "g", mjd), transient_mags_at(tr, "r", mjd),
                          transient_mags_at(tr, "i", mjd))
    if band not in SURVEY_BANDS:
        raise ValueError(f"band {band!r} is not one of {BANDS}")
    off = {"g": tr["dg"], "r": 0.0, "i": tr["di"], "z": tr["dz"], "y": tr["dy"]}[band]
    rate = {"g": 1.3, "r": 1.0, "i": 0.85, "z": 0.7, "y": 0.7}[band]
    dt = mjd - tr["t_peak"]
    peak = tr["r_peak"] + off
    with np.errstate(over="ignore", divide="ignore"):
        rise = peak + 2.5 / np.log(10) * 0.5 * (dt / tr["tau_rise"]) ** 2
        fall = peak + rate * tr["decline"] * dt
    m = np.where(dt < 0, rise, fall)
    return np.where(dt < -4 * tr["tau_rise"], np.inf, m).astype(np.float64)


def mover_positions_at(mv: np.ndarray, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) of moving objects at ``mjd`` (linear motion in the tangent plane)."""
    dt = mjd - mv["mjd0"]
    return offset_point(mv["ra0"], mv["dec0"], mv["rate_ra"] * dt * 3600.0, mv["rate_dec"] * dt * 3600.0)
