"""Dynamic masks: artefacts of bright stars, predicted once their positions are known.

After the camera stage has calibrated an exposure, the positions and brightnesses of the bright
stars (from the reference catalog projected through the solved astrometry, and from the
detections themselves) predict where the camera's optics and electronics put artefacts:

- **optical ghosts** -- a star at focal-plane position ``p`` puts an out-of-focus doughnut
  near ``-p`` (reflected through the optical axis), an elliptical annulus elongated along the
  radial direction, whose size grows with the star's distance from the axis;
- **glints** -- a star just beyond the top or bottom edge of the focal plane scatters a long
  narrow streak onto it, perpendicular to that edge;
- **saturated-star cores** -- a circle around each saturated star;
- **diffraction spikes** -- four rays from the secondary-mirror spider;
- **electronic crosstalk** -- a star read out in one cell leaves a faint image at the same cell
  coordinates in other cells (of the same or a neighbouring chip) per a rule table.

Each prediction is an :class:`Artifact` (a shape in one chip's pixel frame); painting them
sets the dynamic bits of :mod:`ps1mpi.algorithms.maskbits` (GHOST, GLINT, STARCORE, SPIKE,
CROSSTALK). The same predictions tell the simulator where to *put* the artefacts, so the rules
are shared: :class:`DynamicMaskRules` is the one recipe table both use.

Magnitudes here are *instrumental*: ``m_inst = -2.5 log10(counts)`` with counts the star's
total signal in the exposure (ADU), as the IPP's psastro recipes (``REFSTAR_MASK_*``,
``GHOST_MAX_MAG``, ``GLINT_*``) are written. The stage converts reference magnitudes with the
exposure zero point: ``m_inst = m_ref - zp``.

Default numbers are the public GPC1 psastro recipe values (see ``ipp-facts.md``):

- saturated-star circle radius ``17.631 + 1.493 ** (-11.363 - m)`` px, for ``m < -15``;
- spike length ``10 ** (0.096 * (7.35 - m)) - 200`` px, width ``8 + 0.01 * (L - 200)`` px
  beyond 200 px of length;
- glint length ``1901 * (-16.8 - m)`` px from the star, width 80 px;
- ghost centre ``-p`` with the GPC1 model's small polynomial offsets, annulus axes linear
  (quadratic for the outer major axis) in the source radius; per-filter limits
  (g -16.5, r -20.0, i -22.0, z -22.0, y -21.5, w -20.4);
- crosstalk rules of the strongest GPC1 couplings (OTA columns 2 and 5, cells 3, 5, 6, 7),
  with the image ``magdiff`` (~6-9) magnitudes fainter than its source, masked when brighter
  than the chip's detection limit.

Pure functions: arrays and geometry objects in, arrays out.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ps1mpi.algorithms import maskbits

__all__ = [
    "StarCoreRule",
    "SpikeRule",
    "GhostModel",
    "GlintRule",
    "CrosstalkRule",
    "CrosstalkModel",
    "DynamicMaskRules",
    "default_rules",
    "BrightStars",
    "Artifact",
    "starcore_radius",
    "spike_geometry",
    "ghost_geometry",
    "glint_geometry",
    "crosstalk_targets",
    "artifacts_for_chip",
    "paint_artifacts",
    "dynamic_mask_for_chip",
    "KIND_BITS",
]

#: Mask bit of each artefact kind.
KIND_BITS: dict[str, int] = {
    "ghost": maskbits.GHOST,
    "glint": maskbits.GLINT,
    "starcore": maskbits.STARCORE,
    "spike": maskbits.SPIKE,
    "crosstalk": maskbits.CROSSTALK,
}

_FILTERS = ("g", "r", "i", "z", "y", "w")


# ----------------------------------------------------------------------------------------------
# Rule tables
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StarCoreRule:
    """Saturated-star circle: radius ``rad_offset + rad_exp ** (mag_ref - m)`` px, ``m < max_mag``.

    Attributes
    ----------
    max_mag : float
        Only stars brighter than this instrumental magnitude are masked (mag).
        It also gates the diffraction spikes (IPP ``REFSTAR_MASK_MAX_MAG``).
    rad_offset : float
        Constant part of the radius (px).
    rad_exp : float
        Base of the exponential growth with brightness.
    mag_ref : float
        Instrumental magnitude where the exponential term is one (mag).
    """

    max_mag: float = -15.0
    rad_offset: float = 17.631
    rad_exp: float = 1.493
    mag_ref: float = -11.363


@dataclass(frozen=True)
class SpikeRule:
    """Diffraction spikes: four rays at ``angle_deg + k * 90`` degrees in the focal plane.

    Length ``L = 10 ** (mag_slope * (mag_zero - m)) - offset`` px (no spike when ``L <= 0``);
    full width ``width + width_slope * (L - l0)`` px when ``L > l0``, else ``width``.

    Attributes
    ----------
    mag_slope, mag_zero, offset : float
        Length law (per mag, mag, px).
    width : float
        Full width of a short spike (px).
    l0 : float
        Length beyond which spikes widen (px).
    width_slope : float
        Widening per pixel of length beyond ``l0``.
    angle_deg : float
        Angle of the first spike from the focal-plane +X axis towards +Y (degrees). The spider
        is fixed to the telescope, so a stage that knows the rotator angle may override it.
    """

    mag_slope: float = 0.096
    mag_zero: float = 7.35
    offset: float = 200.0
    width: float = 8.0
    l0: float = 200.0
    width_slope: float = 0.01
    angle_deg: float = 45.0


@dataclass(frozen=True)
class GhostModel:
    """Optical ghost model (the GPC1 model's structure).

    For a star at focal-plane ``(X, Y)`` (px from the optical axis), radius ``r`` and azimuth
    ``t``: the mirrored point is ``(X, Y) - mirror_rad(r) * (cos t, sin t)`` and the ghost
    centre is the mirrored point plus ``(center_x, center_y)`` evaluated there. The ghost is an
    elliptical annulus with major axes along ``t``: inner ``(inner_major(r), inner_minor(r))``
    and outer ``(outer_major(r), outer_minor(r))`` semi-axes (px).

    Attributes
    ----------
    mirror_rad : tuple of float
        1-D polynomial coefficients in ``r`` (c0, c1, ...): distance moved towards and
        through the axis (px). ``(0, 2)`` is an exact reflection ``-p``.
    center_x, center_y : tuple of (i, j, c)
        2-D polynomial terms ``c * Xm**i * Ym**j`` added to the mirrored point (px).
    inner_major, inner_minor, outer_major, outer_minor : tuple of float
        1-D polynomials in ``r`` for the annulus semi-axes (px).
    max_mag : dict
        Per-filter instrumental magnitude limit: only brighter stars make ghosts (mag).
    flux_fraction : float
        Fraction of the star's flux in its ghost, spread evenly over the annulus (used by
        the simulator to draw it; masks do not depend on it).
    """

    mirror_rad: tuple[float, ...] = (0.0, 2.05047162)
    center_x: tuple[tuple[int, int, float], ...] = (
        (0, 0, -4.44204528e+01), (1, 0, -3.61808461e-02), (2, 0, -3.41904191e-09),
        (3, 0, 1.23247534e-10), (0, 1, 3.68637258e-04), (1, 1, -5.85079042e-08),
        (2, 1, 3.11998344e-12), (0, 2, -3.76258537e-08), (1, 2, 1.23486032e-10),
        (0, 3, -1.91249100e-12))
    center_y: tuple[tuple[int, int, float], ...] = (
        (0, 0, 8.48484727e+01), (1, 0, -5.44742647e-04), (2, 0, -3.24795847e-08),
        (3, 0, 3.94751094e-12), (0, 1, -3.73181147e-02), (1, 1, -5.49688915e-09),
        (2, 1, 1.28040160e-10), (0, 2, -1.30695487e-07), (1, 2, 1.07915457e-12),
        (0, 3, 1.26204472e-10))
    inner_major: tuple[float, ...] = (3.926693e+01, 5.325759e-03)
    inner_minor: tuple[float, ...] = (5.287548e+01, -2.191669e-03)
    outer_major: tuple[float, ...] = (8.99331326e+01, 1.17511553e-02, 6.21923231e-07)
    outer_minor: tuple[float, ...] = (1.36523263e+02, -3.5025434e-03)
    max_mag: Mapping[str, float] = field(default_factory=lambda: {
        "g": -16.5, "r": -20.0, "i": -22.0, "z": -22.0, "y": -21.5, "w": -20.4})
    flux_fraction: float = 2.0e-3

    @classmethod
    def annulus(cls, *, centre_scale: float, outer0: float, outer1: float, inner_ratio: float,
                edge: float = 0.0, max_mag: Mapping[str, float] | None = None,
                flux_fraction: float = 2.0e-3) -> "GhostModel":
        """A circular ghost at ``-centre_scale * p`` with outer radius ``outer0 + outer1 * r``
        (px; ``r`` the source radius) and inner radius ``inner_ratio`` times it, the mask grown
        by half a soft edge of ``edge`` times the outer radius on both sides (the simulator's
        ghost: ``outer0 = a0 * field_radius``, ``outer1 = a1``)."""
        grow = 0.5 * edge
        return cls(mirror_rad=(0.0, 1.0 + centre_scale), center_x=(), center_y=(),
                   inner_major=(outer0 * (inner_ratio - grow), outer1 * (inner_ratio - grow)),
                   inner_minor=(outer0 * (inner_ratio - grow), outer1 * (inner_ratio - grow)),
                   outer_major=(outer0 * (1 + grow), outer1 * (1 + grow)),
                   outer_minor=(outer0 * (1 + grow), outer1 * (1 + grow)),
                   max_mag=dict(max_mag) if max_mag else dict(GhostModel().max_mag),
                   flux_fraction=flux_fraction)


@dataclass(frozen=True)
class GlintRule:
    """Glints from stars just beyond the focal-plane edges.

    A star whose focal-plane position lies within the edge's span and between ``region_min``
    and ``region_max`` px beyond the ``sides`` edges of the focal plane produces a streak that
    starts at the star and runs perpendicular to the edge, into the focal plane, for
    ``length_slope * (length_zero - m)`` px in total; it is kept if at least ``min_length`` px
    of it lie inside the edge.

    Attributes
    ----------
    max_mag : dict
        Per-filter instrumental magnitude limit (mag).
    length_slope : float
        px per mag.
    length_zero : float
        Instrumental magnitude of zero length (mag).
    width : float
        Full width (px).
    region_min, region_max : float
        Band beyond the edge where glint stars lie (px beyond the edge).
    min_length : float
        Shortest on-focal-plane length kept (px).
    sides : tuple of str
        Edges that produce glints: any of ``top`` (+Y), ``bottom``, ``left`` (-X), ``right``.
    surface_brightness : float
        Glint surface brightness as a fraction of the star's total flux per pixel of glint
        length per pixel of width (used by the simulator).
    """

    max_mag: Mapping[str, float] = field(default_factory=lambda: {
        "g": -23.0, "r": -23.0, "i": -23.4, "z": -23.4, "y": -23.0, "w": -24.4})
    length_slope: float = 1901.0
    length_zero: float = -16.8
    width: float = 80.0
    region_min: float = 3428.0
    region_max: float = 17428.0
    min_length: float = 1500.0
    sides: tuple[str, ...] = ("top", "bottom")
    surface_brightness: float = 2.0e-9


@dataclass(frozen=True)
class CrosstalkRule:
    """One crosstalk coupling.

    A star read out in a cell of column ``src_cell_col`` (and row ``src_cell_row``) on a chip
    of column ``src_chip_col`` (chip names ``XY<col><row>``, cell names ``xy<col><row>``)
    produces an image ``magdiff`` magnitudes fainter at the same cell coordinates in the cell
    ``dcell_col`` columns and ``dcell_row`` rows over, on the chip ``dchip_col`` columns over
    (same chip row). ``-1`` as a source column or row matches any. The IPP's GPC1 rules move
    along columns only (``CHIP.SRC``, ``CELL.SRC``, ``CHIP.OFFSET``, ``CELL.OFFSET``,
    ``CROSS.MAGDIFF``).
    """

    src_chip_col: int
    src_cell_col: int
    dchip_col: int
    dcell_col: int
    magdiff: float
    src_cell_row: int = -1
    dcell_row: int = 0

    def to_list(self) -> list:
        """Recipe form ``[src_chip_col, src_cell_col, dchip_col, dcell_col, magdiff,
        src_cell_row, dcell_row]``."""
        return [self.src_chip_col, self.src_cell_col, self.dchip_col, self.dcell_col,
                self.magdiff, self.src_cell_row, self.dcell_row]

    @classmethod
    def from_list(cls, r: Sequence) -> "CrosstalkRule":
        """Inverse of :meth:`to_list` (the last two entries are optional)."""
        if len(r) not in (5, 7):
            raise ValueError(f"crosstalk rule {list(r)!r} must have 5 or 7 entries")
        extra = (int(r[5]), int(r[6])) if len(r) == 7 else (-1, 0)
        return cls(int(r[0]), int(r[1]), int(r[2]), int(r[3]), float(r[4]), *extra)


@dataclass(frozen=True)
class CrosstalkModel:
    """Crosstalk rules and masking parameters.

    Attributes
    ----------
    rules : tuple of CrosstalkRule
        The couplings.
    detection_limit_mag : float
        Default instrumental detection limit of a chip (mag): images brighter than this are
        masked. The stage passes each chip's measured limit when it has one.
    aspect : float
        The mask is an ellipse with semi-axes ``aspect * R`` (x) and ``R`` (y), ``R`` the
        saturated-star radius of the source (IPP: 0.5).
    """

    rules: tuple[CrosstalkRule, ...] = ()
    detection_limit_mag: float = -7.2
    aspect: float = 0.5

    @staticmethod
    def row_pairs(ncell_y: int, *, coeff: float = 5e-4) -> tuple[CrosstalkRule, ...]:
        """Rules coupling cell rows in pairs (``xyIJ`` <-> ``xyI(J xor 1)``) on every chip and
        cell column with flux ratio ``coeff`` (the simulator's crosstalk)."""
        if not 0 < coeff < 1:
            raise ValueError(f"coeff: must be in (0, 1), got {coeff!r}")
        md = -2.5 * math.log10(coeff)
        return tuple(CrosstalkRule(-1, -1, 0, 0, md, j, (j ^ 1) - j)
                     for j in range(int(ncell_y)) if (j ^ 1) < ncell_y)


#: The strongest GPC1 couplings (IPP crosstalk_rules.mdc entries with magdiff < 9; they are the
#: documented OTA2y/OTA5y inter- and intra-chip rules).
GPC1_CROSSTALK: tuple[CrosstalkRule, ...] = (
    CrosstalkRule(2, 3, +1, 0, 5.98), CrosstalkRule(2, 5, 0, +1, 6.83),
    CrosstalkRule(2, 6, 0, -1, 6.86), CrosstalkRule(2, 6, +1, +1, 8.81),
    CrosstalkRule(2, 7, +1, -5, 7.71), CrosstalkRule(5, 3, -1, 0, 6.17),
    CrosstalkRule(5, 5, 0, +1, 7.37), CrosstalkRule(5, 6, 0, -1, 7.46),
    CrosstalkRule(5, 6, -1, +1, 8.82), CrosstalkRule(5, 7, -1, -5, 8.39),
)

#: Test-camera couplings (2x2 OTAs of 2x2 cells): an intra-chip pair on chip column 0 and an
#: inter-chip rule from chip column 1 to column 0, of the GPC1 strength.
TESTCAM_CROSSTALK: tuple[CrosstalkRule, ...] = (
    CrosstalkRule(0, 0, 0, +1, 6.8), CrosstalkRule(0, 1, 0, -1, 6.9),
    CrosstalkRule(1, 1, -1, 0, 6.0),
)


@dataclass(frozen=True)
class DynamicMaskRules:
    """All dynamic-mask rules of a camera: the recipe table shared with the simulator."""

    starcore: StarCoreRule = field(default_factory=StarCoreRule)
    spike: SpikeRule = field(default_factory=SpikeRule)
    ghost: GhostModel = field(default_factory=GhostModel)
    glint: GlintRule = field(default_factory=GlintRule)
    crosstalk: CrosstalkModel = field(default_factory=CrosstalkModel)
    enabled: tuple[str, ...] = ("ghost", "glint", "starcore", "spike", "crosstalk")

    def to_mapping(self) -> dict[str, Any]:
        """A plain nested dict (TOML-writable) of the rules."""
        out = asdict(self)
        out["enabled"] = list(self.enabled)
        out["ghost"]["max_mag"] = dict(self.ghost.max_mag)
        out["glint"]["max_mag"] = dict(self.glint.max_mag)
        out["crosstalk"]["rules"] = [r.to_list() for r in self.crosstalk.rules]
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: "DynamicMaskRules | None" = None
                     ) -> "DynamicMaskRules":
        """Rules from a recipe table; keys not given keep the values of ``base`` (default rules).

        Crosstalk rules are lists ``[src_chip_col, src_cell_col, dchip_col, dcell_col,
        magdiff]``; 2-D ghost polynomials are lists of ``[i, j, c]``.
        """
        base = base or cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"_free"}
        if unknown:
            raise ValueError(f"dynamic mask rules: unknown sections {sorted(unknown)} "
                             f"(known: {sorted(known)})")
        parts: dict[str, Any] = {}
        for name, sub_cls in (("starcore", StarCoreRule), ("spike", SpikeRule),
                              ("ghost", GhostModel), ("glint", GlintRule),
                              ("crosstalk", CrosstalkModel)):
            sub = data.get(name)
            current = getattr(base, name)
            if sub is None:
                continue
            if not isinstance(sub, Mapping):
                raise ValueError(f"dynamic mask rules: [{name}] must be a table")
            allowed = {f.name for f in fields(sub_cls)}
            bad = set(sub) - allowed
            if bad:
                raise ValueError(f"dynamic mask rules: unknown keys {sorted(bad)} in [{name}] "
                                 f"(known: {sorted(allowed)})")
            conv: dict[str, Any] = {}
            for key, value in sub.items():
                if key == "rules":
                    try:
                        conv[key] = tuple(CrosstalkRule.from_list(r) for r in value)
                    except (TypeError, IndexError, ValueError) as err:
                        raise ValueError("dynamic mask rules: crosstalk.rules entries must be "
                                         "[src_chip_col, src_cell_col, dchip_col, dcell_col, "
                                         f"magdiff(, src_cell_row, dcell_row)]: {err}") from err
                elif key in ("center_x", "center_y"):
                    conv[key] = tuple((int(t[0]), int(t[1]), float(t[2])) for t in value)
                elif isinstance(getattr(current, key), Mapping):
                    if not isinstance(value, Mapping):
                        raise ValueError(f"dynamic mask rules: {name}.{key} must be a table "
                                         "of filter = value")
                    conv[key] = {str(k): float(v) for k, v in value.items()}
                elif key == "sides":
                    sides = tuple(str(s) for s in value)
                    if set(sides) - {"top", "bottom", "left", "right"}:
                        raise ValueError(f"dynamic mask rules: glint.sides {sides!r} must be "
                                         "among top, bottom, left, right")
                    conv[key] = sides
                elif isinstance(value, (list, tuple)):
                    conv[key] = tuple(float(v) for v in value)
                else:
                    conv[key] = float(value)
            parts[name] = replace(current, **conv)
        enabled = tuple(data.get("enabled", base.enabled))
        if set(enabled) - set(KIND_BITS):
            raise ValueError(f"dynamic mask rules: enabled {enabled!r} must be among "
                             f"{sorted(KIND_BITS)}")
        return replace(base, enabled=enabled, **parts)


_GPC1_HALF_HEIGHT = 4.0 * 5143.0  # px, for scaling the GPC1 glint band to other cameras


def default_rules(camera: Any) -> DynamicMaskRules:
    """Default rules for a camera (a :class:`~ps1mpi.geometry.camera.Camera` or its name).

    GPC1 gets the public psastro recipe values. Other cameras share the optics (ghost model,
    star-core and spike laws: same pixel scale) while the glint band and minimum length are
    scaled by the focal-plane half-height relative to GPC1's, and the crosstalk rules are the
    camera's own (``testcam``: :data:`TESTCAM_CROSSTALK`).
    """
    name = camera if isinstance(camera, str) else getattr(camera, "name", "")
    name = str(name).lower()
    if name == "gpc1":
        return DynamicMaskRules(crosstalk=CrosstalkModel(rules=GPC1_CROSSTALK))
    glint = GlintRule()
    if not isinstance(camera, str):
        xmin, xmax, ymin, ymax = camera.focal_plane_extent()
        scale = 0.5 * (ymax - ymin) / _GPC1_HALF_HEIGHT
        glint = replace(glint, region_min=glint.region_min * scale,
                        region_max=glint.region_max * scale,
                        min_length=glint.min_length * scale)
    rules = TESTCAM_CROSSTALK if name == "testcam" else ()
    return DynamicMaskRules(glint=glint, crosstalk=CrosstalkModel(rules=rules))


# ----------------------------------------------------------------------------------------------
# Stars and artefacts
# ----------------------------------------------------------------------------------------------

@dataclass
class BrightStars:
    """Bright stars of one exposure.

    Attributes
    ----------
    X, Y : ndarray
        Focal-plane positions relative to the optical axis (px), e.g. reference stars
        projected through the solved astrometry; stars beyond the chips are allowed (glints).
    mag : ndarray
        Instrumental magnitudes ``-2.5 log10(counts)`` (mag).
    chip : ndarray of str, optional
        Chip holding each star ('' where none); computed from the camera when absent.
    x, y : ndarray, optional
        Chip pixel positions on that chip; computed when absent.
    """

    X: np.ndarray
    Y: np.ndarray
    mag: np.ndarray
    chip: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.X = np.atleast_1d(np.asarray(self.X, dtype=float))
        self.Y = np.atleast_1d(np.asarray(self.Y, dtype=float))
        self.mag = np.atleast_1d(np.asarray(self.mag, dtype=float))
        n = self.X.size
        for name in ("Y", "mag"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"BrightStars.{name}: shape {getattr(self, name).shape} "
                                 f"differs from X ({n},)")
        for name in ("chip", "x", "y"):
            v = getattr(self, name)
            if v is not None and np.shape(v) != (n,):
                raise ValueError(f"BrightStars.{name}: shape {np.shape(v)} differs from X ({n},)")

    def __len__(self) -> int:
        return int(self.X.size)

    def locate(self, camera: Any) -> "BrightStars":
        """Fill ``chip``, ``x``, ``y`` from the focal-plane positions (in place; returns self)."""
        if self.chip is not None and self.x is not None and self.y is not None:
            return self
        chips = np.asarray(camera.chip_at_focal(self.X, self.Y)).astype(str)
        x = np.full(len(self), np.nan)
        y = np.full(len(self), np.nan)
        for name in np.unique(chips):
            if not name:
                continue
            sel = chips == name
            xx, yy = camera.focal_to_chip(str(name), self.X[sel], self.Y[sel])
            x[sel], y[sel] = xx, yy
        self.chip, self.x, self.y = chips, x, y
        return self


@dataclass(frozen=True)
class Artifact:
    """One predicted artefact on one chip, in that chip's pixel frame.

    Attributes
    ----------
    kind : str
        ``ghost``, ``glint``, ``starcore``, ``spike`` or ``crosstalk``.
    chip : str
        Chip name.
    x, y : float
        Centre (ellipses) or start point (boxes: glint, spike) in chip pixels.
    a, b : float
        Ellipses: semi-axes along ``theta`` and across (px). Boxes: length and full width (px).
    theta : float
        Orientation in the chip frame, radians from +x towards +y.
    a_in, b_in : float
        Inner semi-axes of an annulus (ghosts; 0 for full ellipses) (px).
    mag : float
        Instrumental magnitude of the source star (mag).
    flux_ratio : float
        Artefact flux / source flux (ghost, crosstalk); glints: surface brightness per unit
        length and width as a fraction of the source flux; 0 otherwise.
    source : int
        Index of the source star in :class:`BrightStars`.
    """

    kind: str
    chip: str
    x: float
    y: float
    a: float
    b: float
    theta: float
    a_in: float = 0.0
    b_in: float = 0.0
    mag: float = float("nan")
    flux_ratio: float = 0.0
    source: int = -1

    @property
    def is_box(self) -> bool:
        """True for box-shaped artefacts (glints, spikes)."""
        return self.kind in ("glint", "spike")

    def bbox(self) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) in chip pixels."""
        if self.is_box:
            c, s = math.cos(self.theta), math.sin(self.theta)
            hx, hy = 0.5 * self.b * abs(s), 0.5 * self.b * abs(c)
            xs = (self.x, self.x + self.a * c)
            ys = (self.y, self.y + self.a * s)
            return min(xs) - hx, max(xs) + hx, min(ys) - hy, max(ys) + hy
        c, s = math.cos(self.theta), math.sin(self.theta)
        hx = math.hypot(self.a * c, self.b * s)
        hy = math.hypot(self.a * s, self.b * c)
        return self.x - hx, self.x + hx, self.y - hy, self.y + hy


def _poly1(coeffs: Sequence[float], r: np.ndarray) -> np.ndarray:
    out = np.zeros_like(r, dtype=float)
    for k, c in enumerate(coeffs):
        out = out + c * r ** k
    return out


def _poly2(terms: Iterable[tuple[int, int, float]], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=float)
    for i, j, c in terms:
        out = out + c * x ** i * y ** j
    return out


def _filter_key(filter: str) -> str:
    key = str(filter).split(".")[0].strip()
    if key not in _FILTERS:
        raise ValueError(f"filter: {filter!r} is not one of {_FILTERS}")
    return key


def starcore_radius(mag: np.ndarray, rule: StarCoreRule = StarCoreRule()) -> np.ndarray:
    """Saturated-star mask radius (px); NaN for stars fainter than ``rule.max_mag``."""
    mag = np.asarray(mag, dtype=float)
    r = rule.rad_offset + rule.rad_exp ** (rule.mag_ref - mag)
    return np.where(mag < rule.max_mag, r, np.nan)


def spike_geometry(mag: np.ndarray, rule: SpikeRule = SpikeRule(), *,
                   max_mag: float = StarCoreRule.max_mag) -> tuple[np.ndarray, np.ndarray]:
    """Diffraction-spike length and full width (px) for instrumental magnitudes.

    Returns zero length where no spike is drawn (faint stars, ``m >= max_mag``).
    """
    mag = np.asarray(mag, dtype=float)
    length = 10.0 ** (rule.mag_slope * (rule.mag_zero - mag)) - rule.offset
    length = np.where((mag < max_mag) & (length > 0), length, 0.0)
    width = rule.width + rule.width_slope * np.maximum(length - rule.l0, 0.0)
    return length, width


def ghost_geometry(X: np.ndarray, Y: np.ndarray, model: GhostModel = GhostModel()
                   ) -> dict[str, np.ndarray]:
    """Ghost centre and annulus of stars at focal-plane ``(X, Y)`` (px from the axis).

    Returns
    -------
    dict
        ``X, Y`` ghost centre (px), ``a_in, b_in, a_out, b_out`` semi-axes (px) and ``theta``
        (radians from +X: the radial direction of the source).
    """
    X = np.asarray(X, dtype=float)
    Y = np.asarray(Y, dtype=float)
    r = np.hypot(X, Y)
    t = np.arctan2(Y, X)
    off = _poly1(model.mirror_rad, r)
    xm = X - np.cos(t) * off
    ym = Y - np.sin(t) * off
    return {
        "X": xm + _poly2(model.center_x, xm, ym),
        "Y": ym + _poly2(model.center_y, xm, ym),
        "a_in": np.maximum(_poly1(model.inner_major, r), 0.0),
        "b_in": np.maximum(_poly1(model.inner_minor, r), 0.0),
        "a_out": np.maximum(_poly1(model.outer_major, r), 0.0),
        "b_out": np.maximum(_poly1(model.outer_minor, r), 0.0),
        "theta": t,
    }


def glint_geometry(X: np.ndarray, Y: np.ndarray, mag: np.ndarray, *, extent: Sequence[float],
                   rule: GlintRule = GlintRule(), filter: str = "r") -> dict[str, np.ndarray]:
    """Glint streaks of stars beyond the focal-plane edges.

    Parameters
    ----------
    X, Y : ndarray
        Focal-plane positions (px from the axis).
    mag : ndarray
        Instrumental magnitudes (mag).
    extent : sequence of 4 float
        Focal-plane extent ``(Xmin, Xmax, Ymin, Ymax)`` (px) of the chips.
    rule : GlintRule
        Glint law.
    filter : str
        Exposure filter (for the magnitude limit).

    Returns
    -------
    dict
        For each glint: ``source`` (star index), ``X0, Y0`` start (the star, px), ``theta``
        (direction into the focal plane, radians from +X), ``length`` (total, px),
        ``width`` (px), ``inside`` (length inside the edge, px).
    """
    fkey = _filter_key(filter)
    X = np.asarray(X, dtype=float)
    Y = np.asarray(Y, dtype=float)
    mag = np.asarray(mag, dtype=float)
    xmin, xmax, ymin, ymax = (float(v) for v in extent)
    limit = rule.max_mag.get(fkey, -np.inf)
    length = rule.length_slope * (rule.length_zero - mag)
    bright = (mag < limit) & (length > 0)
    out: dict[str, list] = {k: [] for k in ("source", "X0", "Y0", "theta", "length", "inside")}
    sides = {
        # side: (beyond-edge distance, span test, direction into the focal plane)
        "top": (Y - ymax, (X >= xmin) & (X <= xmax), -0.5 * np.pi),
        "bottom": (ymin - Y, (X >= xmin) & (X <= xmax), 0.5 * np.pi),
        "right": (X - xmax, (Y >= ymin) & (Y <= ymax), np.pi),
        "left": (xmin - X, (Y >= ymin) & (Y <= ymax), 0.0),
    }
    for side in rule.sides:
        dist, span, direction = sides[side]
        sel = bright & span & (dist >= rule.region_min) & (dist <= rule.region_max)
        inside = length - dist
        sel &= (inside > 0) & (inside >= rule.min_length)
        idx = np.flatnonzero(sel)
        out["source"].extend(idx.tolist())
        out["X0"].extend(X[idx].tolist())
        out["Y0"].extend(Y[idx].tolist())
        out["theta"].extend([direction] * idx.size)
        out["length"].extend(length[idx].tolist())
        out["inside"].extend(inside[idx].tolist())
    res = {k: np.asarray(v, dtype=float) for k, v in out.items()}
    res["source"] = res["source"].astype(int)
    res["width"] = np.full(res["source"].size, rule.width)
    return res


_CHIP_RE = re.compile(r"^XY(\d)(\d)$", re.IGNORECASE)


def _chip_colrow(name: str) -> tuple[int, int] | None:
    m = _CHIP_RE.match(str(name))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cell_grid(camera: Any) -> tuple[np.ndarray, np.ndarray]:
    """Origins (chip px) of the cell columns and rows of a chip."""
    cols = np.array([camera.cell_origin(f"xy{i}0")[0] for i in range(camera.ncell_x)], float)
    rows = np.array([camera.cell_origin(f"xy0{j}")[1] for j in range(camera.ncell_y)], float)
    return cols, rows


def _cell_of(camera: Any, x: np.ndarray, y: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cell column/row (-1 in gaps or off chip) and cell coordinates of chip positions."""
    cols, rows = _cell_grid(camera)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    xr = np.floor(x + 0.5)
    yr = np.floor(y + 0.5)
    ic = np.searchsorted(cols, xr, side="right") - 1
    jr = np.searchsorted(rows, yr, side="right") - 1
    ok_c = (ic >= 0) & (xr - cols[np.clip(ic, 0, None)] < camera.cell_nx)
    ok_r = (jr >= 0) & (yr - rows[np.clip(jr, 0, None)] < camera.cell_ny)
    ic = np.where(ok_c & np.isfinite(x), ic, -1)
    jr = np.where(ok_r & np.isfinite(y), jr, -1)
    u = x - cols[np.clip(ic, 0, None)]
    v = y - rows[np.clip(jr, 0, None)]
    return ic, jr, u, v


def crosstalk_targets(stars: BrightStars, *, camera: Any, model: CrosstalkModel,
                      detection_limit_mag: float | Mapping[str, float] | None = None
                      ) -> dict[str, np.ndarray]:
    """Crosstalk images of the stars per the rule table.

    Parameters
    ----------
    stars : BrightStars
        The stars (located on chips here if not yet).
    camera : Camera
        Camera geometry (chip names ``XY<col><row>``, cells ``xy<col><row>``).
    model : CrosstalkModel
        Rules and masking parameters.
    detection_limit_mag : float or mapping chip -> float, optional
        Instrumental detection limit of the target chips (mag); ``model.detection_limit_mag``
        where not given.

    Returns
    -------
    dict
        Per image: ``source`` index, ``chip`` (target chip name), ``x, y`` (target chip px),
        ``cell`` (target cell name), ``mag`` (source mag), ``image_mag`` (the image's mag),
        ``flux_ratio`` (``10**(-0.4 magdiff)``), ``masked`` (brighter than the limit).
    """
    stars.locate(camera)
    out: dict[str, list] = {k: [] for k in ("source", "chip", "x", "y", "cell", "mag",
                                            "image_mag", "flux_ratio", "masked")}
    if not model.rules or len(stars) == 0:
        return {k: np.asarray(v) for k, v in out.items()}
    chip_names = set(camera.chip_names)
    cols, rows = _cell_grid(camera)
    assert stars.chip is not None and stars.x is not None and stars.y is not None
    on = np.flatnonzero(stars.chip != "")
    if on.size == 0:
        return {k: np.asarray(v) for k, v in out.items()}
    ic, jr, u, v = _cell_of(camera, stars.x[on], stars.y[on])
    chip_cr = [(_chip_colrow(c) or (-99, -99)) for c in stars.chip[on]]
    chip_col = np.array([c for c, _ in chip_cr])
    chip_row = np.array([r for _, r in chip_cr])
    for rule in model.rules:
        hit = (ic >= 0) & (jr >= 0) & (chip_col >= 0)
        if rule.src_chip_col >= 0:
            hit &= chip_col == rule.src_chip_col
        if rule.src_cell_col >= 0:
            hit &= ic == rule.src_cell_col
        if rule.src_cell_row >= 0:
            hit &= jr == rule.src_cell_row
        for k in np.flatnonzero(hit):
            target_chip = f"XY{chip_col[k] + rule.dchip_col}{chip_row[k]}"
            t_cell = ic[k] + rule.dcell_col
            t_row = jr[k] + rule.dcell_row
            if (target_chip not in chip_names or not 0 <= t_cell < camera.ncell_x
                    or not 0 <= t_row < camera.ncell_y):
                continue
            limit = model.detection_limit_mag
            if isinstance(detection_limit_mag, Mapping):
                limit = float(detection_limit_mag.get(target_chip, limit))
            elif detection_limit_mag is not None:
                limit = float(detection_limit_mag)
            src = on[k]
            image_mag = stars.mag[src] + rule.magdiff
            out["source"].append(int(src))
            out["chip"].append(target_chip)
            out["x"].append(float(cols[t_cell] + u[k]))
            out["y"].append(float(rows[t_row] + v[k]))
            out["cell"].append(f"xy{t_cell}{t_row}")
            out["mag"].append(float(stars.mag[src]))
            out["image_mag"].append(float(image_mag))
            out["flux_ratio"].append(10.0 ** (-0.4 * rule.magdiff))
            out["masked"].append(bool(image_mag < limit))
    res = {k: np.asarray(v) for k, v in out.items()}
    res["source"] = res["source"].astype(int)
    res["chip"] = res["chip"].astype(str)
    res["masked"] = res["masked"].astype(bool)
    return res


def _dir_to_chip(camera: Any, chip: str, X: np.ndarray, Y: np.ndarray,
                 theta: np.ndarray) -> np.ndarray:
    """Focal-plane direction angles at (X, Y) expressed in the chip frame."""
    x0, y0 = camera.focal_to_chip(chip, X, Y)
    x1, y1 = camera.focal_to_chip(chip, X + np.cos(theta), Y + np.sin(theta))
    return np.arctan2(np.asarray(y1) - y0, np.asarray(x1) - x0)


def artifacts_for_chip(chip: str, shape: tuple[int, int], stars: BrightStars, *, camera: Any,
                       rules: DynamicMaskRules | None = None, filter: str = "r",
                       detection_limit_mag: float | Mapping[str, float] | None = None,
                       spike_angle: float | None = None, margin: float = 0.0
                       ) -> list[Artifact]:
    """Predict the artefacts that touch one chip.

    Parameters
    ----------
    chip : str
        Chip name.
    shape : tuple of int
        Chip image shape ``(ny, nx)`` (px).
    stars : BrightStars
        Bright stars of the whole exposure (focal plane, instrumental mags).
    camera : Camera
        Camera geometry.
    rules : DynamicMaskRules, optional
        Rules; :func:`default_rules` of the camera when None.
    filter : str
        Exposure filter (``g r i z y w``; FILTERID like ``r.00000`` accepted).
    detection_limit_mag : float or mapping chip -> float, optional
        Instrumental detection limit(s) for crosstalk masking (mag).
    spike_angle : float, optional
        Focal-plane angle of the first spike (degrees); ``rules.spike.angle_deg`` when None.
    margin : float
        Keep artefacts whose bounding box comes within this many px of the chip (px).

    Returns
    -------
    list of Artifact
        In chip pixel coordinates.
    """
    if rules is None:
        rules = default_rules(camera)
    fkey = _filter_key(filter)
    if chip not in set(camera.chip_names):
        raise ValueError(f"chip: {chip!r} is not a chip of camera {getattr(camera, 'name', '?')}")
    ny, nx = int(shape[0]), int(shape[1])
    if ny <= 0 or nx <= 0:
        raise ValueError(f"shape: must be positive (ny, nx), got {shape!r}")
    arts: list[Artifact] = []
    enabled = set(rules.enabled)
    X, Y, mag = stars.X, stars.Y, stars.mag

    def touches(a: Artifact) -> bool:
        x0, x1, y0, y1 = a.bbox()
        return x1 >= -0.5 - margin and x0 <= nx - 0.5 + margin and \
            y1 >= -0.5 - margin and y0 <= ny - 0.5 + margin

    if len(stars) and ("starcore" in enabled or "spike" in enabled):
        bright = np.flatnonzero(mag < rules.starcore.max_mag)
        if bright.size:
            xs, ys = camera.focal_to_chip(chip, X[bright], Y[bright])
            xs, ys = np.asarray(xs, float), np.asarray(ys, float)
            if "starcore" in enabled:
                rad = starcore_radius(mag[bright], rules.starcore)
                for k, idx in enumerate(bright):
                    a = Artifact("starcore", chip, xs[k], ys[k], rad[k], rad[k], 0.0,
                                 mag=float(mag[idx]), source=int(idx))
                    if touches(a):
                        arts.append(a)
            if "spike" in enabled:
                length, width = spike_geometry(mag[bright], rules.spike,
                                               max_mag=rules.starcore.max_mag)
                ang0 = math.radians(rules.spike.angle_deg if spike_angle is None else spike_angle)
                for q in range(4):
                    th = _dir_to_chip(camera, chip, X[bright], Y[bright],
                                      np.full(bright.size, ang0 + q * 0.5 * np.pi))
                    for k, idx in enumerate(bright):
                        if length[k] <= 0:
                            continue
                        a = Artifact("spike", chip, xs[k], ys[k], length[k], width[k], th[k],
                                     mag=float(mag[idx]), source=int(idx))
                        if touches(a):
                            arts.append(a)

    if len(stars) and "ghost" in enabled:
        limit = rules.ghost.max_mag.get(fkey, -np.inf)
        src = np.flatnonzero(mag < limit)
        if src.size:
            g = ghost_geometry(X[src], Y[src], rules.ghost)
            xg, yg = camera.focal_to_chip(chip, g["X"], g["Y"])
            th = _dir_to_chip(camera, chip, g["X"], g["Y"], g["theta"])
            for k, idx in enumerate(src):
                a = Artifact("ghost", chip, float(xg[k]), float(yg[k]), g["a_out"][k],
                             g["b_out"][k], th[k], a_in=g["a_in"][k], b_in=g["b_in"][k],
                             mag=float(mag[idx]), flux_ratio=rules.ghost.flux_fraction,
                             source=int(idx))
                if touches(a):
                    arts.append(a)

    if len(stars) and "glint" in enabled:
        gl = glint_geometry(X, Y, mag, extent=camera.focal_plane_extent(), rule=rules.glint,
                            filter=fkey)
        if gl["source"].size:
            xs, ys = camera.focal_to_chip(chip, gl["X0"], gl["Y0"])
            th = _dir_to_chip(camera, chip, gl["X0"], gl["Y0"], gl["theta"])
            for k, idx in enumerate(gl["source"]):
                a = Artifact("glint", chip, float(xs[k]), float(ys[k]), gl["length"][k],
                             gl["width"][k], th[k], mag=float(mag[idx]),
                             flux_ratio=rules.glint.surface_brightness, source=int(idx))
                if touches(a):
                    arts.append(a)

    if len(stars) and "crosstalk" in enabled and rules.crosstalk.rules:
        ct = crosstalk_targets(stars, camera=camera, model=rules.crosstalk,
                               detection_limit_mag=detection_limit_mag)
        sel = np.flatnonzero((ct["chip"] == chip) & ct["masked"]) if ct["source"].size else []
        if len(sel):
            rad = rules.starcore.rad_offset + rules.starcore.rad_exp ** (
                rules.starcore.mag_ref - ct["mag"][sel])
            for k, j in enumerate(sel):
                a = Artifact("crosstalk", chip, float(ct["x"][j]), float(ct["y"][j]),
                             rules.crosstalk.aspect * rad[k], rad[k], 0.0,
                             mag=float(ct["mag"][j]), flux_ratio=float(ct["flux_ratio"][j]),
                             source=int(ct["source"][j]))
                if touches(a):
                    arts.append(a)
    return arts


def paint_artifacts(mask: np.ndarray, artifacts: Iterable[Artifact]) -> np.ndarray:
    """OR the artefacts' bits into a ``uint16`` mask (in place; returns it).

    A pixel is covered when its centre lies inside the shape: ellipses (annuli for ghosts)
    and oriented boxes starting at ``(x, y)``. Pixel ``[j, i]`` has its centre at ``(i, j)``.
    """
    if mask.dtype != np.uint16 or mask.ndim != 2:
        raise ValueError(f"mask: must be a 2-D uint16 array, got {mask.dtype} {mask.shape}")
    ny, nx = mask.shape
    for a in artifacts:
        bit = KIND_BITS[a.kind]
        x0, x1, y0, y1 = a.bbox()
        i0, i1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), nx - 1)
        j0, j1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), ny - 1)
        if i1 < i0 or j1 < j0:
            continue
        xx = np.arange(i0, i1 + 1, dtype=float)[None, :] - a.x
        yy = np.arange(j0, j1 + 1, dtype=float)[:, None] - a.y
        c, s = math.cos(a.theta), math.sin(a.theta)
        u = xx * c + yy * s
        v = -xx * s + yy * c
        if a.is_box:
            inside = (u >= 0) & (u <= a.a) & (np.abs(v) <= 0.5 * a.b)
        else:
            if a.a <= 0 or a.b <= 0:
                continue
            inside = (u / a.a) ** 2 + (v / a.b) ** 2 <= 1.0
            if a.a_in > 0 and a.b_in > 0:
                inside &= (u / a.a_in) ** 2 + (v / a.b_in) ** 2 > 1.0
        sub = mask[j0:j1 + 1, i0:i1 + 1]
        sub[inside] |= np.uint16(bit)
    return mask


def dynamic_mask_for_chip(chip: str, shape: tuple[int, int], stars: BrightStars, *,
                          camera: Any, rules: DynamicMaskRules | None = None,
                          filter: str = "r",
                          detection_limit_mag: float | Mapping[str, float] | None = None,
                          spike_angle: float | None = None) -> np.ndarray:
    """The dynamic mask of one chip.

    Parameters
    ----------
    chip : str
        Chip name.
    shape : tuple of int
        Chip image shape ``(ny, nx)`` (px).
    stars : BrightStars
        Bright stars of the whole exposure: focal-plane positions (px from the optical axis)
        and instrumental magnitudes (mag); chip positions are derived from the camera.
    camera : Camera
        Camera geometry.
    rules : DynamicMaskRules, optional
        Recipe rules; :func:`default_rules` of the camera when None.
    filter : str
        Exposure filter.
    detection_limit_mag : float or mapping chip -> float, optional
        Instrumental detection limit(s) for crosstalk masking (mag).
    spike_angle : float, optional
        Focal-plane angle of the first diffraction spike (degrees).

    Returns
    -------
    ndarray of uint16
        Mask with the GHOST, GLINT, STARCORE, SPIKE and CROSSTALK bits set; OR it into the
        chip mask.
    """
    arts = artifacts_for_chip(chip, shape, stars, camera=camera, rules=rules, filter=filter,
                              detection_limit_mag=detection_limit_mag, spike_angle=spike_angle)
    return paint_artifacts(np.zeros((int(shape[0]), int(shape[1])), np.uint16), arts)
