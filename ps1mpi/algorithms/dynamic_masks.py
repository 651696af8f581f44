"""Dynamic masks: artefacts of bright stars, predicted once their positions are known.

After the camera stage has calibrated an exposure, the positions and brightnesses of the bright
stars (from the reference catalog projected through the solved astrometry, and from the
detections themselves) predict where the camera's optics and electronics put artefacts:

- **optical ghosts** -- a star at focal-plane position ``p`` puts an out-of-focus doughnut
  near ``-p`` (reflected through the optical axis), an elliptical annulus elongated along the
  radial direction, whose size may grow with the star's distance from the axis;
- **glints** -- a star just beyond an edge of the focal plane scatters a long narrow streak
  onto it, perpendicular to that edge;
- **saturated-star cores** -- a circle around each saturated star;
- **diffraction spikes** -- four rays from the secondary-mirror spider;
- **electronic crosstalk** -- a star read out in one cell leaves a faint image at the same cell
  coordinates in other cells (of the same or a neighbouring chip) per a rule table; the image
  of a bright star's bleed trail runs along the target cell's columns.

Each prediction is an :class:`Artifact` (a shape in one chip's pixel frame); painting them
sets the dynamic bits of :mod:`ps1mpi.algorithms.maskbits` (GHOST, GLINT, STARCORE, SPIKE,
CROSSTALK).

**One description per camera.** The rules of a camera are data: ``<camera>_masks.toml`` next
to the camera file in ``ps1mpi/data/cameras/`` (``gpc1_masks.toml``: the public IPP psastro
values; ``testcam_masks.toml``: the simulated test camera's optics and electronics), read by
:func:`default_rules`. The camera stage masks with them and the simulator
(:mod:`ps1mpi.sim.artefacts`, :mod:`ps1mpi.sim.exposure`) *places* its artefacts with the same
geometry (:func:`artifacts_for_chip`, :func:`crosstalk_targets`) and only decides how bright
they are, so the masks cover the simulated artefacts by construction of the physics.

Magnitudes here are *instrumental*: ``m_inst = -2.5 log10(counts)`` with counts the star's
total signal in the exposure (electrons), as the IPP's psastro recipes (``REFSTAR_MASK_*``,
``GHOST_MAX_MAG``, ``GLINT_*``) are written. The stage converts reference magnitudes with the
exposure zero point: ``m_inst = m_ref - zp``.

The GPC1 table (``ipp-facts.md`` and the public ``gpc1/psastro.config``):

- saturated-star circle radius ``17.631 + 1.493 ** (-11.363 - m)`` px, for ``m < -15``;
- spike length ``10 ** (0.096 * (7.35 - m)) - 200`` px, width ``8 + 0.01 * (L - 200)`` px
  beyond 200 px of length;
- glint length ``1901 * (-16.8 - m)`` px from the star, width 80 px;
- ghost centre ``-p`` with the GPC1 model's small polynomial offsets, annulus axes linear
  (quadratic for the outer major axis) in the source radius; per-filter limits
  (g -16.5, r -20.0, i -22.0, z -22.0, y -21.5, w -20.4);
- crosstalk rules of the strongest GPC1 couplings (OTA columns 2 and 5, cells 3, 5, 6, 7),
  with the image ``magdiff`` (~6-9) magnitudes fainter than its source, masked when brighter
  than the chip's detection limit; bleed-trail images (``REFSTAR_MASK_BLEED_MAG_*``) as
  column boxes the height of the cell.

Pure functions on arrays and geometry objects; the only file read is the camera's packaged
rule table (:func:`default_rules`, cached).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
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
    "load_rules",
    "rules_path",
    "BrightStars",
    "Artifact",
    "starcore_radius",
    "spike_geometry",
    "ghost_geometry",
    "glint_geometry",
    "crosstalk_radius",
    "crosstalk_targets",
    "artifacts_for_chip",
    "paint_artifacts",
    "dynamic_mask_for_chip",
    "KIND_BITS",
    "RULES_DIR",
]

#: Mask bit of each artefact kind.
KIND_BITS: dict[str, int] = {
    "ghost": maskbits.GHOST,
    "glint": maskbits.GLINT,
    "starcore": maskbits.STARCORE,
    "spike": maskbits.SPIKE,
    "crosstalk": maskbits.CROSSTALK,
}

#: Where the packaged rule tables live (next to the camera files).
RULES_DIR = Path(__file__).resolve().parents[1] / "data" / "cameras"

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

    max_mag: float
    rad_offset: float
    rad_exp: float
    mag_ref: float


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

    mag_slope: float
    mag_zero: float
    offset: float
    width: float
    l0: float
    width_slope: float
    angle_deg: float


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
        Per-filter instrumental magnitude limit: only brighter stars' ghosts are masked (mag).
    """

    mirror_rad: tuple[float, ...]
    center_x: tuple[tuple[int, int, float], ...]
    center_y: tuple[tuple[int, int, float], ...]
    inner_major: tuple[float, ...]
    inner_minor: tuple[float, ...]
    outer_major: tuple[float, ...]
    outer_minor: tuple[float, ...]
    max_mag: Mapping[str, float]


_SIDES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class GlintRule:
    """Glints from stars just beyond the focal-plane edges.

    A star whose focal-plane position lies within the edge's span and between ``region_min``
    and ``region_max`` px beyond one of the ``sides`` edges of the focal plane produces a
    streak that starts at the star and runs perpendicular to the edge, into the focal plane,
    for ``length_slope * (length_zero - m)`` px in total; it is kept if at least
    ``min_length`` px of it lie inside the edge.

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
    """

    max_mag: Mapping[str, float]
    length_slope: float
    length_zero: float
    width: float
    region_min: float
    region_max: float
    min_length: float
    sides: tuple[str, ...]

    def __post_init__(self) -> None:
        bad = set(self.sides) - set(_SIDES)
        if bad:
            raise ValueError(f"glint.sides {tuple(self.sides)!r} must be among {_SIDES}")


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

    @property
    def chip_independent(self) -> bool:
        """True when the coupling is the same on every chip and stays within the chip."""
        return self.src_chip_col < 0 and self.dchip_col == 0

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


_RADIUS_LAWS = ("starcore", "linear")


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
        The image mask is an ellipse with semi-axes ``aspect * R`` (x) and ``R`` (y).
    radius_law : str
        ``"starcore"``: ``R`` is the source's saturated-star radius (the IPP's current code);
        ``"linear"``: ``R = rad_slope * (rad_mag_max - m)`` (IPP
        ``REFSTAR_MASK_CROSSTALK_MAG_SLOPE`` / ``_MAG_MAX``).
    rad_slope, rad_mag_max : float
        The linear law (px per mag, mag).
    bleed_max_mag : float
        Sources brighter than this (mag) bleed, and the image of the bleed trail is masked as
        a column box at the image (IPP ``REFSTAR_MASK_BLEED_MAG_MAX``)...
    bleed_width_slope : float
        ... of full width ``bleed_width_slope * (bleed_max_mag - m)`` px
        (``REFSTAR_MASK_BLEED_MAG_SLOPE``) ...
    bleed_max_magdiff : float
        ... for couplings with ``magdiff`` up to this (mag; the IPP's 8) ...
    bleed_length_slope, bleed_length_mag_max : float
        ... reaching ``10 ** (bleed_length_slope * (bleed_length_mag_max - m))`` px above and
        below the image, within the target cell (``REFSTAR_MASK_BLEED_MAG_SLOPE_Y`` /
        ``_MAG_MAX_Y``); ``bleed_length_slope <= 0`` masks the whole height of the cell (the
        IPP's crosstalk bleeds).
    """

    rules: tuple[CrosstalkRule, ...]
    detection_limit_mag: float
    aspect: float
    radius_law: str
    rad_slope: float
    rad_mag_max: float
    bleed_max_mag: float
    bleed_width_slope: float
    bleed_max_magdiff: float
    bleed_length_slope: float
    bleed_length_mag_max: float

    def __post_init__(self) -> None:
        if self.radius_law not in _RADIUS_LAWS:
            raise ValueError(f"crosstalk.radius_law {self.radius_law!r} must be one of "
                             f"{_RADIUS_LAWS}")
        if not self.aspect > 0:
            raise ValueError(f"crosstalk.aspect must be positive, got {self.aspect!r}")

    @staticmethod
    def row_pairs(ncell_y: int, *, coeff: float) -> tuple[CrosstalkRule, ...]:
        """Rules coupling cell rows in pairs (``xyIJ`` <-> ``xyI(J xor 1)``) on every chip and
        cell column with flux ratio ``coeff``."""
        if not 0 < coeff < 1:
            raise ValueError(f"coeff: must be in (0, 1), got {coeff!r}")
        md = -2.5 * math.log10(coeff)
        return tuple(CrosstalkRule(-1, -1, 0, 0, md, j, (j ^ 1) - j)
                     for j in range(int(ncell_y)) if (j ^ 1) < ncell_y)


_PARTS: tuple[tuple[str, type], ...] = (
    ("starcore", StarCoreRule), ("spike", SpikeRule), ("ghost", GhostModel),
    ("glint", GlintRule), ("crosstalk", CrosstalkModel))


@dataclass(frozen=True)
class DynamicMaskRules:
    """All dynamic-mask rules of a camera: the table shared by the camera stage and the
    simulator (``<camera>_masks.toml``, see :func:`default_rules`)."""

    starcore: StarCoreRule
    spike: SpikeRule
    ghost: GhostModel
    glint: GlintRule
    crosstalk: CrosstalkModel
    enabled: tuple[str, ...] = ("ghost", "glint", "starcore", "spike", "crosstalk")

    def __post_init__(self) -> None:
        if set(self.enabled) - set(KIND_BITS):
            raise ValueError(f"dynamic mask rules: enabled {tuple(self.enabled)!r} must be "
                             f"among {sorted(KIND_BITS)}")

    def to_mapping(self) -> dict[str, Any]:
        """A plain nested dict (TOML-writable) of the rules."""
        out = asdict(self)
        out["enabled"] = list(self.enabled)
        out["ghost"]["max_mag"] = dict(self.ghost.max_mag)
        out["glint"]["max_mag"] = dict(self.glint.max_mag)
        out["glint"]["sides"] = list(self.glint.sides)
        out["crosstalk"]["rules"] = [r.to_list() for r in self.crosstalk.rules]
        for name in ("mirror_rad", "inner_major", "inner_minor", "outer_major", "outer_minor"):
            out["ghost"][name] = list(getattr(self.ghost, name))
        for name in ("center_x", "center_y"):
            out["ghost"][name] = [list(t) for t in getattr(self.ghost, name)]
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: "DynamicMaskRules | None" = None,
                     source: str = "dynamic mask rules") -> "DynamicMaskRules":
        """Rules from a recipe table.

        Parameters
        ----------
        data : mapping
            Sections ``starcore``, ``spike``, ``ghost``, ``glint``, ``crosstalk`` and the list
            ``enabled``. Crosstalk rules are lists ``[src_chip_col, src_cell_col, dchip_col,
            dcell_col, magdiff(, src_cell_row, dcell_row)]``; 2-D ghost polynomials are lists
            of ``[i, j, c]``; ``max_mag`` are tables ``filter = mag``.
        base : DynamicMaskRules, optional
            Keys not given keep the values of ``base`` (e.g. ``default_rules(camera)`` under a
            campaign recipe). Without it the table must be complete (a rule file).
        source : str
            Name of the table in error messages (a file name or recipe section).

        Returns
        -------
        DynamicMaskRules
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"_free"}
        if unknown:
            raise ValueError(f"{source}: unknown sections {sorted(unknown)} "
                             f"(known: {sorted(known)})")
        parts: dict[str, Any] = {}
        for name, sub_cls in _PARTS:
            sub = data.get(name)
            current = getattr(base, name) if base is not None else None
            if sub is None:
                if current is None:
                    raise ValueError(f"{source}: missing section [{name}]")
                parts[name] = current
                continue
            if not isinstance(sub, Mapping):
                raise ValueError(f"{source}: [{name}] must be a table")
            allowed = {f.name: f for f in fields(sub_cls)}
            bad = set(sub) - set(allowed)
            if bad:
                raise ValueError(f"{source}: unknown keys {sorted(bad)} in [{name}] "
                                 f"(known: {sorted(allowed)})")
            conv: dict[str, Any] = {}
            for key, value in sub.items():
                try:
                    conv[key] = _convert(name, key, value)
                except (TypeError, IndexError, ValueError) as err:
                    raise ValueError(f"{source}: {name}.{key}: {err}") from None
            try:
                if current is None:
                    missing = sorted(k for k, f in allowed.items() if k not in conv
                                     and f.default is MISSING and f.default_factory is MISSING)
                    if missing:
                        raise ValueError(f"missing keys {missing} in [{name}]")
                    parts[name] = sub_cls(**conv)
                else:
                    parts[name] = replace(current, **conv)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: {err}") from None
        enabled = data.get("enabled", base.enabled if base is not None else cls.enabled)
        try:
            return cls(enabled=tuple(str(e) for e in enabled), **parts)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def _convert(section: str, key: str, value: Any) -> Any:
    """One rule-table value in its dataclass form."""
    if key == "rules":
        return tuple(CrosstalkRule.from_list(r) for r in value)
    if key in ("center_x", "center_y"):
        out = []
        for t in value:
            if len(t) != 3:
                raise ValueError(f"terms must be [i, j, c], got {list(t)!r}")
            out.append((int(t[0]), int(t[1]), float(t[2])))
        return tuple(out)
    if key == "max_mag" and section in ("ghost", "glint"):
        if not isinstance(value, Mapping):
            raise ValueError("must be a table of filter = mag")
        return {str(k): float(v) for k, v in value.items()}
    if key == "sides":
        return tuple(str(s) for s in value)
    if key == "radius_law":
        return str(value)
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


@lru_cache(maxsize=32)
def _read_table(path: str, mtime_ns: int) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def rules_path(camera: Any) -> Path:
    """The rule table of a camera (a :class:`~ps1mpi.geometry.camera.Camera` or its name).

    Looked for next to the camera's own file (``<stem>_masks.toml``), then in
    :data:`RULES_DIR` (``<name>_masks.toml``).

    Raises
    ------
    ValueError
        When the camera has no rule table (naming the files looked for).
    """
    name = str(camera if isinstance(camera, str) else getattr(camera, "name", "")).lower()
    cands: list[Path] = []
    src = "" if isinstance(camera, str) else str(getattr(camera, "source", "") or "")
    if src:
        p = Path(src)
        cands.append(p.with_name(f"{p.stem}_masks.toml"))
    if name:
        cands.append(RULES_DIR / f"{name}_masks.toml")
    for c in cands:
        if c.is_file():
            return c
    raise ValueError(f"camera {name or camera!r}: no dynamic-mask rule table "
                     f"(looked for {', '.join(str(c) for c in cands) or 'a camera name'})")


def load_rules(path: str | Path) -> DynamicMaskRules:
    """Read a complete rule table (TOML, the layout of :meth:`DynamicMaskRules.to_mapping`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dynamic-mask rule table {p} does not exist")
    try:
        data = _read_table(str(p.resolve()), p.stat().st_mtime_ns)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"dynamic-mask rule table {p}: {err}") from None
    return DynamicMaskRules.from_mapping(data, source=f"dynamic-mask rule table {p.name}")


def default_rules(camera: Any) -> DynamicMaskRules:
    """The rules of a camera (a :class:`~ps1mpi.geometry.camera.Camera` or its name): its
    ``<camera>_masks.toml`` (see :func:`rules_path`). GPC1's are the public IPP psastro values,
    ``testcam``'s those of the simulated test camera (``docs/camera-calibration.md``)."""
    return load_rules(rules_path(camera))


def _gpc1() -> DynamicMaskRules:
    return default_rules("gpc1")


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
        Centre (ellipses) or start point (boxes) in chip pixels.
    a, b : float
        Ellipses: semi-axes along ``theta`` and across (px). Boxes: length and full width (px).
    theta : float
        Orientation in the chip frame, radians from +x towards +y.
    a_in, b_in : float
        Inner semi-axes of an annulus (ghosts; 0 for full ellipses) (px).
    mag : float
        Instrumental magnitude of the source star (mag).
    flux_ratio : float
        Crosstalk: image flux / source flux; 0 otherwise.
    source : int
        Index of the source star in :class:`BrightStars`.
    shape : str
        ``"box"`` or ``"ellipse"``; empty: by kind (glints and spikes are boxes). Crosstalk
        images of bleed trails are boxes.
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
    shape: str = ""

    @property
    def is_box(self) -> bool:
        """True for box-shaped artefacts (glints, spikes, bleed-trail crosstalk)."""
        if self.shape:
            return self.shape == "box"
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

    def frame(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates ``(u, v)`` of chip pixels in the artefact's frame: along ``theta`` from
        its start (boxes) or centre (ellipses), and across (px)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx = np.asarray(xx, dtype=float) - self.x
        dy = np.asarray(yy, dtype=float) - self.y
        return dx * c + dy * s, -dx * s + dy * c

    def inside(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Whether chip positions lie inside the shape (what :func:`paint_artifacts` masks)."""
        u, v = self.frame(xx, yy)
        if self.is_box:
            return (u >= 0) & (u <= self.a) & (np.abs(v) <= 0.5 * self.b)
        if self.a <= 0 or self.b <= 0:
            return np.zeros(np.broadcast(u, v).shape, bool)
        ins = (u / self.a) ** 2 + (v / self.b) ** 2 <= 1.0
        if self.a_in > 0 and self.b_in > 0:
            ins &= (u / self.a_in) ** 2 + (v / self.b_in) ** 2 > 1.0
        return ins


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


def starcore_radius(mag: np.ndarray, rule: StarCoreRule | None = None) -> np.ndarray:
    """Saturated-star mask radius (px); NaN for stars fainter than ``rule.max_mag``
    (``rule``: GPC1's when None)."""
    rule = rule or _gpc1().starcore
    mag = np.asarray(mag, dtype=float)
    r = rule.rad_offset + rule.rad_exp ** (rule.mag_ref - mag)
    return np.where(mag < rule.max_mag, r, np.nan)


def spike_geometry(mag: np.ndarray, rule: SpikeRule | None = None, *,
                   max_mag: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Diffraction-spike length and full width (px) for instrumental magnitudes.

    ``rule`` and ``max_mag`` (the star-core limit gating spikes) default to GPC1's. Returns
    zero length where no spike is drawn (faint stars, ``m >= max_mag``).
    """
    if rule is None or max_mag is None:
        g = _gpc1()
        rule = rule or g.spike
        max_mag = g.starcore.max_mag if max_mag is None else max_mag
    mag = np.asarray(mag, dtype=float)
    length = 10.0 ** (rule.mag_slope * (rule.mag_zero - mag)) - rule.offset
    length = np.where((mag < max_mag) & (length > 0), length, 0.0)
    width = rule.width + rule.width_slope * np.maximum(length - rule.l0, 0.0)
    return length, width


def ghost_geometry(X: np.ndarray, Y: np.ndarray, model: GhostModel | None = None
                   ) -> dict[str, np.ndarray]:
    """Ghost centre and annulus of stars at focal-plane ``(X, Y)`` (px from the axis);
    ``model``: GPC1's when None.

    Returns
    -------
    dict
        ``X, Y`` ghost centre (px), ``a_in, b_in, a_out, b_out`` semi-axes (px) and ``theta``
        (radians from +X: the radial direction of the source).
    """
    model = model or _gpc1().ghost
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
                   rule: GlintRule | None = None, filter: str = "r") -> dict[str, np.ndarray]:
    """Glint streaks of stars beyond the focal-plane edges.

    Parameters
    ----------
    X, Y : ndarray
        Focal-plane positions (px from the axis).
    mag : ndarray
        Instrumental magnitudes (mag).
    extent : sequence of 4 float
        Focal-plane extent ``(Xmin, Xmax, Ymin, Ymax)`` (px) of the chips.
    rule : GlintRule, optional
        Glint law (GPC1's when None).
    filter : str
        Exposure filter (for the magnitude limit).

    Returns
    -------
    dict
        For each glint: ``source`` (star index), ``X0, Y0`` start (the star, px), ``theta``
        (direction into the focal plane, radians from +X), ``length`` (total, px),
        ``width`` (px), ``inside`` (length inside the edge, px).
    """
    rule = rule or _gpc1().glint
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


def crosstalk_radius(mag: np.ndarray, model: CrosstalkModel, starcore: StarCoreRule
                     ) -> np.ndarray:
    """Radius ``R`` (px) of the crosstalk-image mask of sources of instrumental magnitude
    ``mag``: the semi-axes are ``aspect * R`` along x and ``R`` along y."""
    mag = np.asarray(mag, dtype=float)
    if model.radius_law == "linear":
        return np.maximum(model.rad_slope * (model.rad_mag_max - mag), 0.0)
    return starcore.rad_offset + starcore.rad_exp ** (starcore.mag_ref - mag)


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
        Per image: ``source`` index, ``rule`` (index in ``model.rules``), ``chip`` (target
        chip name), ``x, y`` (target chip px), ``cell`` (target cell name), ``mag`` (source
        mag), ``image_mag`` (the image's mag), ``flux_ratio`` (``10**(-0.4 magdiff)``),
        ``masked`` (brighter than the limit).
    """
    stars.locate(camera)
    keys = ("source", "rule", "chip", "x", "y", "cell", "mag", "image_mag", "flux_ratio",
            "masked")
    out: dict[str, list] = {k: [] for k in keys}

    def result() -> dict[str, np.ndarray]:
        res = {k: np.asarray(v) for k, v in out.items()}
        res["source"] = res["source"].astype(int)
        res["rule"] = res["rule"].astype(int)
        res["chip"] = res["chip"].astype(str)
        res["cell"] = res["cell"].astype(str)
        res["masked"] = res["masked"].astype(bool)
        for k in ("x", "y", "mag", "image_mag", "flux_ratio"):
            res[k] = res[k].astype(float)
        return res

    if not model.rules or len(stars) == 0:
        return result()
    chip_names = set(camera.chip_names)
    cols, rows = _cell_grid(camera)
    assert stars.chip is not None and stars.x is not None and stars.y is not None
    on = np.flatnonzero(stars.chip != "")
    if on.size == 0:
        return result()
    ic, jr, u, v = _cell_of(camera, stars.x[on], stars.y[on])
    chip_cr = [(_chip_colrow(c) or (-99, -99)) for c in stars.chip[on]]
    chip_col = np.array([c for c, _ in chip_cr])
    chip_row = np.array([r for _, r in chip_cr])
    for ri, rule in enumerate(model.rules):
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
            out["rule"].append(ri)
            out["chip"].append(target_chip)
            out["x"].append(float(cols[t_cell] + u[k]))
            out["y"].append(float(rows[t_row] + v[k]))
            out["cell"].append(f"xy{t_cell}{t_row}")
            out["mag"].append(float(stars.mag[src]))
            out["image_mag"].append(float(image_mag))
            out["flux_ratio"].append(10.0 ** (-0.4 * rule.magdiff))
            out["masked"].append(bool(image_mag < limit))
    return result()


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
        In chip pixel coordinates; ``source`` indexes ``stars``.
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

    def keep(a: Artifact) -> None:
        if touches(a):
            arts.append(a)

    if len(stars) and ("starcore" in enabled or "spike" in enabled):
        bright = np.flatnonzero(mag < rules.starcore.max_mag)
        if bright.size:
            xs, ys = camera.focal_to_chip(chip, X[bright], Y[bright])
            xs, ys = np.asarray(xs, float), np.asarray(ys, float)
            if "starcore" in enabled:
                rad = starcore_radius(mag[bright], rules.starcore)
                for k, idx in enumerate(bright):
                    keep(Artifact("starcore", chip, xs[k], ys[k], rad[k], rad[k], 0.0,
                                  mag=float(mag[idx]), source=int(idx)))
            if "spike" in enabled:
                length, width = spike_geometry(mag[bright], rules.spike,
                                               max_mag=rules.starcore.max_mag)
                ang0 = math.radians(rules.spike.angle_deg if spike_angle is None else spike_angle)
                for q in range(4):
                    th = _dir_to_chip(camera, chip, X[bright], Y[bright],
                                      np.full(bright.size, ang0 + q * 0.5 * np.pi))
                    for k, idx in enumerate(bright):
                        if length[k] > 0:
                            keep(Artifact("spike", chip, xs[k], ys[k], length[k], width[k],
                                          th[k], mag=float(mag[idx]), source=int(idx)))

    if len(stars) and "ghost" in enabled:
        limit = rules.ghost.max_mag.get(fkey, -np.inf)
        src = np.flatnonzero(mag < limit)
        if src.size:
            g = ghost_geometry(X[src], Y[src], rules.ghost)
            xg, yg = camera.focal_to_chip(chip, g["X"], g["Y"])
            th = _dir_to_chip(camera, chip, g["X"], g["Y"], g["theta"])
            for k, idx in enumerate(src):
                keep(Artifact("ghost", chip, float(xg[k]), float(yg[k]), g["a_out"][k],
                              g["b_out"][k], th[k], a_in=g["a_in"][k], b_in=g["b_in"][k],
                              mag=float(mag[idx]), source=int(idx)))

    if len(stars) and "glint" in enabled:
        gl = glint_geometry(X, Y, mag, extent=camera.focal_plane_extent(), rule=rules.glint,
                            filter=fkey)
        if gl["source"].size:
            xs, ys = camera.focal_to_chip(chip, gl["X0"], gl["Y0"])
            th = _dir_to_chip(camera, chip, gl["X0"], gl["Y0"], gl["theta"])
            for k, idx in enumerate(gl["source"]):
                keep(Artifact("glint", chip, float(xs[k]), float(ys[k]), gl["length"][k],
                              gl["width"][k], th[k], mag=float(mag[idx]), source=int(idx)))

    if len(stars) and "crosstalk" in enabled and rules.crosstalk.rules:
        xt = rules.crosstalk
        ct = crosstalk_targets(stars, camera=camera, model=xt,
                               detection_limit_mag=detection_limit_mag)
        sel = np.flatnonzero((ct["chip"] == chip) & ct["masked"])
        if sel.size:
            rad = crosstalk_radius(ct["mag"][sel], xt, rules.starcore)
            for k, j in enumerate(sel):
                m = float(ct["mag"][j])
                if rad[k] > 0:
                    keep(Artifact("crosstalk", chip, float(ct["x"][j]), float(ct["y"][j]),
                                  xt.aspect * rad[k], rad[k], 0.0, mag=m,
                                  flux_ratio=float(ct["flux_ratio"][j]),
                                  source=int(ct["source"][j]), shape="ellipse"))
                magdiff = xt.rules[int(ct["rule"][j])].magdiff
                if m < xt.bleed_max_mag and magdiff <= xt.bleed_max_magdiff:
                    # the image of the source's bleed trail: a column box in the target cell
                    _, cy0 = camera.cell_origin(str(ct["cell"][j]))
                    lo, hi = cy0 - 0.5, cy0 + camera.cell_ny - 0.5
                    if xt.bleed_length_slope > 0:
                        half = 10.0 ** (xt.bleed_length_slope * (xt.bleed_length_mag_max - m))
                        lo = max(lo, float(ct["y"][j]) - half)
                        hi = min(hi, float(ct["y"][j]) + half)
                    keep(Artifact("crosstalk", chip, float(ct["x"][j]), lo, hi - lo,
                                  xt.bleed_width_slope * (xt.bleed_max_mag - m), 0.5 * math.pi,
                                  mag=m, flux_ratio=float(ct["flux_ratio"][j]),
                                  source=int(ct["source"][j]), shape="box"))
    return arts


def paint_artifacts(mask: np.ndarray, artifacts: Iterable[Artifact]) -> np.ndarray:
    """OR the artefacts' bits into a ``uint16`` mask (in place; returns it).

    A pixel is covered when its centre lies inside the shape (:meth:`Artifact.inside`):
    ellipses (annuli for ghosts) and oriented boxes starting at ``(x, y)``. Pixel ``[j, i]``
    has its centre at ``(i, j)``.
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
        inside = a.inside(np.arange(i0, i1 + 1, dtype=float)[None, :],
                          np.arange(j0, j1 + 1, dtype=float)[:, None])
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
