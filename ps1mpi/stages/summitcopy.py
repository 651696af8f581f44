"""summitcopy: find new exposures on the datastore and download their chips, verified.

As the IPP's summitcopy did (``pzgetexp``/``pzgetimfile``/``summit_copy``): poll the
datastore's exposure listing, add each new exposure to ``summitExp`` (a run) and its chips to
``summitImfile`` (elements), then download the chips in parallel across ranks, computing the
md5 while streaming and comparing it with the listing, writing each file under a temporary
name that is renamed into place only when verified::

    <root>/raw/<EXPNAME>/<EXPNAME>.<CHIP>.fits

Rules:

- ``define`` (rank 0) talks to the datastore; each chip is one unit, located on the sky at its
  exposure's pointing so that the runtime hands a rank the chips of one exposure together.
- The listing is untrusted: an exposure name, chip name or file name that could escape the raw
  tree, a URL on another host (unless allowed), a duplicate chip or a value too long for the
  ledger is refused; the chip is recorded with fault 5 and its reason (the exposure is then
  blocked, visible in ``ps1mpi ledger faults``), nothing is downloaded.
- A failed download is a fault on its chip with the reason (2 connection/HTTP error, 6 timeout,
  5 truncated/oversize body or checksum mismatch); nothing is left in the raw tree. Download
  faults are not retried automatically by default (``retry_cap=0``, as the IPP left them for
  an operator): ``ps1mpi ledger revert LEDGER --table summitImfile`` and a re-run retry them. A
  chip attempted before re-reads its exposure's chip listing first, so a checksum or size the
  datastore has corrected since is used.
- Idempotent: an exposure is added once (by name); a chip already in place with the listed size
  and md5 is not downloaded again; a re-run with nothing new does nothing.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np

from ..infra import http
from ..infra.ledger import Ledger
from ..infra.runtime import DataError, Outcome, WorkUnit
from ..infra.schema import TABLES, Fault, State
from ..stages.base import Stage, StageContext

__all__ = ["SummitcopyStage", "PollReport"]

RAW_DIR = "raw"


class PollReport:
    """What one poll of the datastore found (rank 0)."""

    def __init__(self) -> None:
        self.listed = 0          # exposures in the listing
        self.new = 0             # exposures added to summitExp
        self.chips = 0           # chips added to summitImfile
        self.refused = 0         # chips refused (untrusted listing content)
        self.skipped = 0         # exposures outside the campaign (``accept`` said no)
        self.errors: list[str] = []  # exposures or listings that could not be read this time

    def __repr__(self) -> str:
        return (f"PollReport(listed={self.listed}, new={self.new}, chips={self.chips}, "
                f"refused={self.refused}, skipped={self.skipped}, errors={len(self.errors)})")


def _width(table: str, column: str) -> int:
    return int(TABLES[table].column(column).dtype[1:])


class SummitcopyStage(Stage):
    """Download new exposures from a datastore (see the module docstring).

    Parameters
    ----------
    datastore : str
        Base URL of the datastore, e.g. ``http://127.0.0.1:8080``.
    since : str or float, optional
        List only exposures at or after this time (MJD or ISO 8601). Default: the latest MJD
        already in ``summitExp`` minus ``overlap_days`` (everything on the first poll).
    full_listing : bool
        Ask for the whole listing at every poll (ignore the incremental default).
    overlap_days : float
        Overlap of incremental polls (days), for exposures listed late.
    allowed_hosts : sequence of str
        Hosts besides the datastore's that chip URLs may point to (``host`` or ``host:port``).
    timeout_s : float
        Seconds allowed for connecting and for each wait on the network.
    deadline_s : float
        Seconds allowed for one whole chip download.
    retry_cap : int
        Faulted downloads retried automatically up to this many times (0: wait for a revert).
    fsync : bool
        Flush each file to stable storage before renaming it into place.
    chunk_bytes : int
        Bytes read, hashed and written per step.
    accept : callable, optional
        ``accept(ra=, dec=, filter=, mjd=) -> bool`` for each listed exposure (deg, deg, band,
        days); exposures it rejects are not added (e.g. outside a campaign's region). Default:
        every exposure.
    """

    name = "summitcopy"
    run_table = "summitExp"
    element_table = "summitImfile"
    inputs = ()
    outputs = {"raw": RAW_DIR + "/{exp_name}/{file}"}

    def __init__(self, datastore: str, *, since: str | float | None = None,
                 full_listing: bool = False, overlap_days: float = 0.5,
                 allowed_hosts: Sequence[str] = (), timeout_s: float = 30.0,
                 deadline_s: float = 600.0, retry_cap: int = 0, fsync: bool = True,
                 chunk_bytes: int = 1 << 20,
                 accept: Callable[..., bool] | None = None):
        if not datastore or urlsplit(datastore).scheme.lower() not in ("http", "https"):
            raise ValueError(f"summitcopy: datastore URL {datastore!r} must be http(s)://host[:port]")
        if timeout_s <= 0 or deadline_s <= 0:
            raise ValueError(f"summitcopy: timeout_s ({timeout_s}) and deadline_s ({deadline_s}) "
                             "must be positive")
        if retry_cap < 0:
            raise ValueError(f"summitcopy: retry_cap must be >= 0, got {retry_cap}")
        self.datastore = datastore.rstrip("/")
        self.since = since
        self.full_listing = full_listing
        self.overlap_days = float(overlap_days)
        self.allowed_hosts = tuple(allowed_hosts)
        self.timeout_s = float(timeout_s)
        self.deadline_s = float(deadline_s)
        self.retry_cap = int(retry_cap)
        self.fsync = bool(fsync)
        self.chunk_bytes = int(chunk_bytes)
        self.accept = accept
        self.last_poll: PollReport | None = None

    # ------------------------------------------------------------------ define (rank 0)
    def _since(self, ledger: Ledger) -> str | float | None:
        if self.since is not None:
            return self.since
        if self.full_listing or ledger.nrows(self.run_table) == 0:
            return None
        mjd = ledger.column(self.run_table, "mjd")
        mjd = mjd[np.isfinite(mjd)]
        return float(mjd.max() - self.overlap_days) if mjd.size else None

    def define(self, ledger: Ledger, ctx: StageContext) -> int:
        """Poll the datastore; add new exposures and their chips. Returns the chips added.

        A listing that cannot be read is recorded in :attr:`last_poll` (``errors``) and the
        exposure is tried again at the next poll; the exposure listing itself failing raises
        (the job cannot know what is new).
        """
        self.last_poll = None
        rows = http.list_exposures(self.datastore, since=self._since(ledger),
                                   timeout=self.timeout_s)
        report = PollReport()
        self.last_poll = report
        report.listed = len(rows)
        known = set(ledger.column(self.run_table, "exp_name").tolist())
        seen: set[bytes] = set()
        new: list[dict] = []
        for row in rows:
            try:
                name = http.safe_component(row.exp_name, what="exposure name",
                                           source=f"{self.datastore}/index.txt")
                if len(name.encode()) > _width(self.run_table, "exp_name"):
                    raise http.UnsafeInput(self.datastore, f"exposure name {name!r} is longer "
                                           f"than {_width(self.run_table, 'exp_name')} characters")
            except http.UnsafeInput as err:
                report.errors.append(str(err))
                ctx.log.error("summitcopy: %s", err)
                continue
            key = name.encode()
            if key in known or key in seen:
                continue
            seen.add(key)
            if self.accept is not None and not self.accept(ra=row.ra, dec=row.dec,
                                                           filter=row.filter, mjd=row.mjd_obs):
                report.skipped += 1
                continue
            try:
                chips_uri = http.check_url(row.uri, base=self.datastore + "/",
                                           allowed_hosts=self.allowed_hosts)
                if len(chips_uri) > _width(self.run_table, "chips_uri"):
                    raise http.UnsafeInput(chips_uri, "chip-listing URL too long for the ledger")
                chips = http.list_chips(chips_uri, timeout=self.timeout_s)
            except http.DownloadError as err:
                report.errors.append(f"{name}: {err}")
                ctx.log.warning("summitcopy: exposure %s skipped this poll: %s", name, err)
                continue
            if not chips or (row.nchips >= 0 and len(chips) != row.nchips):
                msg = (f"{name}: the chip listing has {len(chips)} chips, the exposure listing "
                       f"says {row.nchips}; waiting for the datastore to complete it")
                report.errors.append(msg)
                ctx.log.warning("summitcopy: %s", msg)
                continue
            new.append(self._prepare_exposure(name, row, chips_uri, chips, ctx.root))
        self._add_exposures(ledger, ctx, new, report)
        ledger.flush()
        ctx.log.info("summitcopy: polled %s: %d exposures listed, %d new (%d chips, %d refused), "
                     "%d outside the campaign, %d listing errors", self.datastore, report.listed,
                     report.new, report.chips, report.refused, report.skipped, len(report.errors))
        return report.chips

    def _prepare_exposure(self, name: str, row: http.ExposureRow, chips_uri: str,
                          chips: list[http.ChipRow], root: Path) -> dict:
        """The ledger rows of one new exposure: its summitExp columns, its chips' summitImfile
        columns, and the chips refused (index, reason)."""
        values: dict[str, list] = {k: [] for k in ("chip", "uri", "bytes", "md5", "path")}
        refused: list[tuple[int, str]] = []
        seen_chip: set[str] = set()
        seen_file: set[str] = set()
        for i, chip in enumerate(chips):
            problem = None
            path = ""
            try:
                uri = self.check_chip(name, chip, root, chips_uri)
                if chip.chip in seen_chip or chip.file in seen_file:
                    raise http.UnsafeInput(chips_uri, f"chip {chip.chip!r} / file {chip.file!r} "
                                                      "listed twice")
                path = f"{RAW_DIR}/{name}/{chip.file}"
            except http.UnsafeInput as err:
                problem = f"refused: {err}"
                uri = ""
            seen_chip.add(chip.chip)
            seen_file.add(chip.file)
            values["chip"].append(chip.chip[:8] if problem is None else
                                  chip.chip.encode("ascii", "replace")[:8].decode())
            values["uri"].append(uri)
            values["bytes"].append(chip.bytes)
            values["md5"].append(chip.md5)
            values["path"].append(path)
            if problem:
                refused.append((i, problem))
        run = dict(exp_name=name, filter=row.filter[:8], mjd=row.mjd_obs, camera=row.camera[:16],
                   exptime=row.exptime, nchips=len(chips), chips_uri=chips_uri, ra=row.ra,
                   dec=row.dec)
        return {"run": run, "chips": values, "refused": refused}

    def _add_exposures(self, ledger: Ledger, ctx: StageContext, new: list[dict],
                       report: PollReport) -> None:
        """Append the prepared exposures: one append per table (each append resizes every
        column, ~10 ms), then their transitions."""
        if not new:
            return
        cols = {k: [e["run"][k] for e in new] for k in new[0]["run"]}
        runs = ledger.append(self.run_table, len(new), **cols)
        ledger.transition(self.run_table, runs, State.RUN,
                          message=[f"listed by {self.datastore} with {n} chips"
                                   for n in cols["nchips"]])
        nchips = np.array(cols["nchips"], np.int64)
        chip_cols = {k: [v for e in new for v in e["chips"][k]] for k in new[0]["chips"]}
        rows = ledger.append(self.element_table, int(nchips.sum()), run=np.repeat(runs, nchips),
                             exp_name=np.repeat(np.array(cols["exp_name"]), nchips),
                             ra=np.repeat(np.array(cols["ra"], np.float64), nchips),
                             dec=np.repeat(np.array(cols["dec"], np.float64), nchips),
                             chip=chip_cols["chip"], uri=chip_cols["uri"],
                             bytes=np.array(chip_cols["bytes"], np.int64), md5=chip_cols["md5"],
                             path=chip_cols["path"])
        ledger.transition(self.element_table, rows, State.NEW, message="listed")
        first = np.concatenate([[0], np.cumsum(nchips)[:-1]])
        bad = [(int(first[k]) + i, m, e["run"]["exp_name"]) for k, e in enumerate(new)
               for i, m in e["refused"]]
        if bad:
            ledger.transition(self.element_table, rows[np.array([i for i, _, _ in bad])],
                              State.NEW, fault=Fault.DATA, message=[m for _, m, _ in bad])
            for _, m, name in bad:
                ctx.log.error("summitcopy: exposure %s: %s", name, m)
        report.new += len(new)
        report.chips += int(nchips.sum())
        report.refused += len(bad)

    def check_chip(self, exp_name: str, chip: http.ChipRow, root: Path, listing_url: str) -> str:
        """Validate one chip row of an untrusted listing; return its absolute URL.

        Raises :class:`ps1mpi.infra.http.UnsafeInput` when the chip or file name is unsafe
        or too long for the ledger, the file is not ``<EXPNAME>.<CHIP>.fits``-like (it must at
        least start with the exposure name), or the URL is on a host not allowed.
        """
        http.safe_component(chip.chip, what="chip name", source=listing_url)
        http.safe_component(chip.file, what="file name", source=listing_url)
        if len(chip.chip) > _width(self.element_table, "chip"):
            raise http.UnsafeInput(listing_url, f"chip name {chip.chip!r} longer than "
                                   f"{_width(self.element_table, 'chip')} characters")
        if not chip.file.startswith(exp_name + "."):
            raise http.UnsafeInput(listing_url, f"file {chip.file!r} does not belong to "
                                                f"exposure {exp_name}")
        path = f"{RAW_DIR}/{exp_name}/{chip.file}"
        if len(path) > _width(self.element_table, "path"):
            raise http.UnsafeInput(listing_url, f"file name {chip.file!r} too long for the ledger")
        http.safe_join(Path(root) / RAW_DIR, exp_name, chip.file, source=listing_url)
        uri = http.check_url(chip.uri, base=self.datastore + "/", allowed_hosts=self.allowed_hosts)
        if len(uri) > _width(self.element_table, "uri"):
            raise http.UnsafeInput(uri, "URL too long for the ledger")
        return uri

    # ------------------------------------------------------------------ units (rank 0)
    def units(self, ledger: Ledger, ctx: StageContext) -> list[WorkUnit]:
        """Pending chips (faulted ones only while ``nfault < retry_cap``), cost = MB."""
        rows = ledger.pending(self.element_table, retry_cap=self.retry_cap)
        if rows.size == 0:
            return []
        cols = ledger.read(self.element_table, rows, ["exp_name", "chip", "uri", "bytes", "md5",
                                                      "path", "ra", "dec", "t_start", "run"])
        listing = ledger.column(self.run_table, "chips_uri", cols["run"])
        out = []
        for i, r in enumerate(rows):
            exp = cols["exp_name"][i].decode()
            chip = cols["chip"][i].decode()
            path = cols["path"][i].decode()
            out.append(WorkUnit(
                self.element_table, int(r), f"{exp}.{chip}", float(cols["ra"][i]),
                float(cols["dec"][i]), cost=max(float(cols["bytes"][i]) / 1e6, 0.01),
                info={"exp_name": exp, "chip": chip, "uri": cols["uri"][i].decode(),
                      "bytes": int(cols["bytes"][i]), "md5": cols["md5"][i].decode(),
                      "path": path, "file": path.rsplit("/", 1)[-1] if path else "",
                      "listing": listing[i].decode(),
                      "attempted": bool(np.isfinite(cols["t_start"][i]))}))
        return out

    # ------------------------------------------------------------------ process (any rank)
    def process(self, unit: WorkUnit, ctx: StageContext) -> Outcome:
        """Download one chip, verified; a failure raises (a fault with its code and reason)."""
        info = unit.info
        exp, listing_url = info["exp_name"], info["listing"]
        if not info["path"] or not info["uri"]:
            raise DataError(f"chip {unit.name}: refused by the listing checks; nothing to download")
        summary: dict = {}
        size, md5, uri, file = info["bytes"], info["md5"], info["uri"], info["file"]
        if info["attempted"]:
            # a retry: the datastore may have corrected its listing since the last attempt
            fresh = {c.chip: c for c in http.list_chips(listing_url, timeout=self.timeout_s)}
            row = fresh.get(info["chip"])
            if row is None:
                raise DataError(f"chip {unit.name}: no longer in the chip listing {listing_url}")
            uri = self.check_chip(exp, row, ctx.root, listing_url)
            if row.file != file:
                raise DataError(f"chip {unit.name}: the listing now names file {row.file!r} "
                                f"instead of {file!r}")
            if (row.bytes, row.md5) != (size, md5):
                ctx.log.warning("summitcopy: %s: listing changed since the last attempt "
                                "(bytes %d -> %d, md5 %s -> %s)", unit.name, size, row.bytes,
                                md5, row.md5)
                size, md5 = row.bytes, row.md5
                summary.update(bytes=size, md5=md5)
        dest = http.safe_join(ctx.root / RAW_DIR, exp, file, source=listing_url)
        if self._already_there(dest, size, md5):
            ctx.log.info("summitcopy: %s already in place and verified", unit.name)
            summary["mb_s"] = math.nan
            return Outcome(summary=summary)
        res = http.download(uri, dest, size=size, md5=md5, timeout=self.timeout_s,
                            deadline_s=self.deadline_s, chunk_bytes=self.chunk_bytes,
                            fsync=self.fsync)
        ctx.log.info("summitcopy: %s: %.3f MB in %.3f s (%.1f MB/s; network %.3f s, md5 %.3f s, "
                     "disk %.3f s)", unit.name, res.bytes / 1e6, res.seconds, res.mb_s,
                     res.t_network, res.t_md5, res.t_disk)
        summary["mb_s"] = res.mb_s
        return Outcome(summary=summary)

    def _already_there(self, dest: Path, size: int, md5: str) -> bool:
        try:
            if dest.stat().st_size != size:
                return False
        except FileNotFoundError:
            return False
        h = hashlib.md5()
        with open(dest, "rb") as fh:
            while chunk := fh.read(self.chunk_bytes):
                h.update(chunk)
        return h.hexdigest() == md5

