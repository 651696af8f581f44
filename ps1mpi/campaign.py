"""A campaign: a region of sky driven through every stage, in order, through one ledger.

The campaign definition (TOML, stored in the ledger at creation) names the region, filters,
dates and stack kinds; the recipes say how each stage works. :func:`run_campaign` runs each
stage of :data:`PIPELINE` in turn over the job's ranks; every stage asks the ledger what is
ready, so the same call after a crash does only what is missing.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .infra.config import Recipe, RecipeError
from .infra.ledger import Ledger
from .infra.runtime import RunReport
from .infra.schema import TABLES, State
from .infra.world import World
from .stages.base import Stage, make_context, run_stage

__all__ = ["PIPELINE", "CampaignDefinition", "run_campaign", "summarise", "format_summary"]


@dataclass
class CampaignDefinition:
    """What a campaign covers. Stored as JSON in the ledger; read from ``[campaign]`` TOML."""

    name: str = "campaign"
    datastore: str = ""
    ra_range: tuple[float, float] = (0.0, 360.0)
    dec_range: tuple[float, float] = (-90.0, 90.0)
    filters: tuple[str, ...] = ("g", "r", "i", "z", "y", "w")
    mjd_range: tuple[float, float] = (0.0, 1e6)
    stack_kinds: tuple[str, ...] = ("nightly", "deep", "best_seeing", "out_of_season")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CampaignDefinition":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"campaign definition: unknown keys {sorted(unknown)}; "
                              f"known: {sorted(known)}")
        out = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        for rng_name in ("ra_range", "dec_range", "mjd_range"):
            lo, hi = getattr(out, rng_name)
            if not lo <= hi:
                raise RecipeError(f"campaign definition: {rng_name} must be [low, high]")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def accepts(self, *, ra: float, dec: float, filter: str, mjd: float) -> bool:
        """Whether an exposure at this pointing, filter and time belongs to the campaign."""
        ra_lo, ra_hi = self.ra_range
        in_ra = ra_lo <= ra % 360.0 <= ra_hi if ra_lo <= ra_hi else True
        return (in_ra and self.dec_range[0] <= dec <= self.dec_range[1]
                and filter[:1] in self.filters and self.mjd_range[0] <= mjd <= self.mjd_range[1])


@dataclass
class StageSpec:
    """One step of the pipeline: its name, ledger tables and how to build it."""

    name: str
    module: str
    build: Callable[[CampaignDefinition, Recipe], Stage]
    tables: tuple[str, ...] = ()


def _summitcopy(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.summitcopy import SummitcopyStage
    r = recipe["summitcopy"]
    return SummitcopyStage(campaign.datastore, timeout_s=r["timeout_s"],
                           deadline_s=r["deadline_s"], retry_cap=r["retry_cap"],
                           accept=campaign.accepts)


def _camera(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.camera import CameraStage
    return CameraStage(group_size=int(recipe.get("camera.group_size")))


def _stack(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
    from .stages.stack import build_stage
    return build_stage(campaign, recipe)


def _plain(module: str, cls: str) -> Callable[[CampaignDefinition, Recipe], Stage]:
    def build(campaign: CampaignDefinition, recipe: Recipe) -> Stage:
        return getattr(importlib.import_module(module), cls)()
    return build


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec("summitcopy", "ps1mpi.stages.summitcopy", _summitcopy, ("summitExp", "summitImfile")),
    StageSpec("register", "ps1mpi.stages.register", _plain("ps1mpi.stages.register", "RegisterStage"),
              ("rawExp", "rawImfile")),
    StageSpec("chip", "ps1mpi.stages.chip", _plain("ps1mpi.stages.chip", "ChipStage"),
              ("chipRun", "chipProcessedImfile")),
    StageSpec("camera", "ps1mpi.stages.camera", _camera, ("camRun", "camProcessedExp")),
    StageSpec("warp", "ps1mpi.stages.warp", _plain("ps1mpi.stages.warp", "WarpStage"),
              ("warpRun", "warpSkyfile")),
    StageSpec("stack", "ps1mpi.stages.stack", _stack, ("stackRun", "stackSumSkyfile")),
)


def stage_names() -> list[str]:
    return [s.name for s in PIPELINE]


@dataclass
class CampaignReport:
    stages: list[RunReport] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return max([r.exit_code for r in self.stages] or [0])


def run_campaign(world: World, *, ledger: Ledger | None, root: Path, ledger_path: Path,
                 recipe: Recipe, campaign: CampaignDefinition, until: str | None = None,
                 log=None) -> CampaignReport:
    """Run every stage up to ``until`` (inclusive) over ``world``; collective.

    Rank 0 passes the open, writable ledger. Each stage runs to completion before the next
    starts (see docs/campaign.md for why this order is used).
    """
    if until is not None and until not in stage_names():
        raise RecipeError(f"--until {until!r}: stages are {', '.join(stage_names())}")
    report = CampaignReport()
    t0 = time.time()
    for spec in PIPELINE:
        stage = spec.build(campaign, recipe)
        ctx = make_context(root=root, recipe=recipe, world=world, ledger_path=ledger_path,
                           stage=spec.name)
        report.stages.append(run_stage(stage, ctx, ledger))
        if spec.name == until:
            break
    report.wall_s = time.time() - t0
    return report


# ------------------------------------------------------------------------------ summary

def summarise(ledger: Ledger, report: CampaignReport | None = None) -> dict[str, Any]:
    """The figures a user looks at first, from the ledger (and this job's timings)."""
    out: dict[str, Any] = {"stages": {}, "faults": [], "quality": [], "science": {}}
    for spec in PIPELINE:
        for table in spec.tables:
            if ledger.nrows(table):
                out["stages"][table] = ledger.counts(table)
    for table in TABLES:
        n = ledger.nrows(table)
        if not n or TABLES[table].kind != "element":
            continue
        fault = ledger.column(table, "fault")
        quality = ledger.column(table, "quality")
        state = ledger.column(table, "state")
        msg = ledger.column(table, "message")
        for kind, sel in (("faults", fault != 0), ("quality", (quality != 0) & (state == State.DONE))):
            rows = np.flatnonzero(sel)
            texts = ledger.message_text(msg[rows]) if rows.size else []
            reasons: dict[str, int] = {}
            for t in texts:
                reasons[t] = reasons.get(t, 0) + 1
            for text, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
                out[kind].append({"table": table, "count": count, "reason": text or "-"})
    if report is not None:
        out["timings"] = {r.stage: {"wall_s": round(r.wall_s, 2), "units": r.units,
                                    "done": r.done, "faulted": r.faulted} for r in report.stages}
        out["wall_s"] = round(report.wall_s, 2)
    out["science"] = _science(ledger)
    return out


def _median(ledger: Ledger, table: str, column: str) -> float | None:
    if not ledger.nrows(table):
        return None
    ok = (ledger.column(table, "state") == State.DONE) & (ledger.column(table, "quality") == 0)
    vals = ledger.column(table, column)[ok].astype(float)
    vals = vals[np.isfinite(vals) & (vals >= 0)]
    return round(float(np.median(vals)), 4) if vals.size else None


def _science(ledger: Ledger) -> dict[str, Any]:
    sci = {
        "exposures_registered": int(np.count_nonzero(ledger.column("rawExp", "state") == State.DONE))
        if ledger.nrows("rawExp") else 0,
        "raw_mean_adu_median": _median(ledger, "rawImfile", "mean"),
        "fwhm_arcsec_median": _median(ledger, "chipProcessedImfile", "fwhm_major"),
        "sources_per_chip_median": _median(ledger, "chipProcessedImfile", "n_sources"),
        "astrom_rms_mas_median": _median(ledger, "camProcessedExp", "astrom_rms_mas"),
        "zero_point_median": _median(ledger, "camProcessedExp", "zero_point"),
        "stack_depth_5sigma_median": _median(ledger, "stackSumSkyfile", "depth_5sigma"),
    }
    return {k: v for k, v in sci.items() if v is not None}


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["", "=== campaign summary ===", "",
             f"{'table':<22}{'total':>8}{'done':>8}{'new':>8}{'run':>6}{'drop':>6}{'faulted':>9}{'badqual':>9}"]
    for table, c in summary["stages"].items():
        lines.append(f"{table:<22}{c['total']:>8}{c['done']:>8}{c['new']:>8}{c['run']:>6}"
                     f"{c['drop']:>6}{c['faulted']:>9}{c['bad_quality']:>9}")
    if summary.get("timings"):
        lines += ["", "timings (this job):"]
        for stage, t in summary["timings"].items():
            lines.append(f"  {stage:<12} {t['wall_s']:>8.1f} s  {t['done']} done, "
                         f"{t['faulted']} faulted of {t['units']} units")
        lines.append(f"  {'total':<12} {summary['wall_s']:>8.1f} s")
    for kind, title in (("faults", "faults"), ("quality", "bad-quality items")):
        if summary[kind]:
            lines += ["", f"{title}:"]
            shown: dict[str, int] = {}
            for item in summary[kind]:
                n = shown.get(item["table"], 0)
                shown[item["table"]] = n + 1
                if n < 5:
                    lines.append(f"  {item['table']:<20} x{item['count']:<4} {item['reason']}")
            for table, n in shown.items():
                if n > 5:
                    lines.append(f"  {table:<20} ... and {n - 5} more reasons "
                                 f"(`ps1mpi ledger faults` / summary.json list them all)")
    if summary["science"]:
        lines += ["", "science:"]
        for key, val in summary["science"].items():
            lines.append(f"  {key:<28} {val}")
    return "\n".join(lines)
