"""A local HTTP datastore that serves simulated raw exposures the way the PS1 datastore did.

The PS1 camera system wrote every chip of an exposure to the summit pixel servers and then
listed the exposure on an HTTP server, the *datastore*: a listing of exposures (restricted
to the latest ones on request), each row linking to a listing of the exposure's chips with
their URLs, sizes and md5 checksums; the chip files were fetched over HTTP by summitcopy.
This module serves a directory laid out as the simulator writes it::

    ROOT/<EXPNAME>/<EXPNAME>.<CHIP>.fits     one FITS file per OTA

Routes (formats in ``docs/datastore.md``; defined in :mod:`ps1mpi.infra.http`):

- ``GET /index.txt[?since=MJD|ISO]``  exposure listing (also ``/``; ``?format=json``)
- ``GET /<EXPNAME>/index.txt``        chip listing (also ``/<EXPNAME>/``; ``?format=json``)
- ``GET /<EXPNAME>/<file>``           a chip file (``HEAD`` too)

md5 checksums are computed once per file (keyed by path, size and modification time) and
cached; exposure metadata come from the primary header of the exposure's first readable chip.

Fault injection (:class:`FaultSpec`), deterministic from a seed: answers 500, slow answers,
truncated bodies, wrong checksums or too-small sizes in chip listings. Each decision is a
hash of (seed, mode, path, n) where n counts the requests of that path (for listing faults,
the requests of the exposure's chip listing), so the sequence of faults is the same whatever
the order in which clients ask; ``attempts=N`` limits faults to the first N requests of each
path, so that a retry succeeds.

Run it with ``ps1mpi datastore serve --root DIR`` or, in tests, :func:`start_datastore`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, quote, urlsplit

from ..algorithms.rawstats import parse_angle
from ..infra.http import (CHIP_COLUMNS, EXPOSURE_COLUMNS, format_chip_listing,
                          format_exposure_listing, mjd_to_iso, parse_time)

__all__ = ["FaultSpec", "DatastoreIndex", "DatastoreHandle", "start_datastore",
           "make_server", "FAULT_MODES"]

log = logging.getLogger("ps1mpi.datastore")

FAULT_MODES = ("error", "slow", "truncate", "bad_md5", "oversize")
_EXP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_MD5_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ faults


@dataclass(frozen=True)
class FaultSpec:
    """What faults the datastore injects, at which rates (each rate a probability in [0, 1]).

    Request faults apply to every GET whose path matches ``match``; listing faults apply to
    the rows of chip listings whose file path (``/<EXPNAME>/<file>``) matches ``match``.

    Attributes
    ----------
    error_rate : float
        Requests answered ``500 Internal Server Error``.
    slow_rate : float
        Requests answered only after ``slow_s`` seconds.
    slow_s : float
        Delay of a slow answer (s).
    truncate_rate : float
        Requests whose body stops after ``truncate_fraction`` of its announced length (the
        connection is then closed).
    truncate_fraction : float
        Fraction of the body sent before a truncation, in [0, 1).
    bad_md5_rate : float
        Chip-listing rows with a wrong md5 checksum.
    oversize_rate : float
        Chip-listing rows whose listed size is smaller than the file (the body is then larger
        than listed).
    seed : int
        Seed of the deterministic fault draws.
    attempts : int
        0: any request may fail; N > 0: only the first N requests of each path (for listing
        faults: the first N requests of the exposure's chip listing).
    match : str
        Shell-style pattern on the path (e.g. ``*.fits``, ``*XY01*``, ``/index.txt``).
    """

    error_rate: float = 0.0
    slow_rate: float = 0.0
    slow_s: float = 5.0
    truncate_rate: float = 0.0
    truncate_fraction: float = 0.5
    bad_md5_rate: float = 0.0
    oversize_rate: float = 0.0
    seed: int = 0
    attempts: int = 0
    match: str = "*"

    def __post_init__(self) -> None:
        for mode in FAULT_MODES:
            rate = getattr(self, f"{mode}_rate")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"FaultSpec: {mode}_rate must be in [0, 1], got {rate}")
        if self.slow_s < 0:
            raise ValueError(f"FaultSpec: slow_s must be >= 0, got {self.slow_s}")
        if not 0.0 <= self.truncate_fraction < 1.0:
            raise ValueError(f"FaultSpec: truncate_fraction must be in [0, 1), got "
                             f"{self.truncate_fraction}")
        if self.attempts < 0:
            raise ValueError(f"FaultSpec: attempts must be >= 0, got {self.attempts}")

    @classmethod
    def parse(cls, items: Sequence[str], **options: Any) -> "FaultSpec":
        """Build from ``MODE=RATE`` strings (``error=0.1``, ``slow=0.05``, ...) and options."""
        rates = {}
        for item in items:
            mode, sep, value = item.partition("=")
            mode = mode.strip().replace("-", "_")
            if not sep or mode not in FAULT_MODES:
                raise ValueError(f"fault {item!r}: expected MODE=RATE with MODE one of "
                                 f"{', '.join(FAULT_MODES)}")
            try:
                rates[f"{mode}_rate"] = float(value)
            except ValueError:
                raise ValueError(f"fault {item!r}: rate {value!r} is not a number") from None
        return cls(**rates, **options)

    @property
    def active(self) -> bool:
        return any(getattr(self, f"{m}_rate") > 0 for m in FAULT_MODES)

    def draw(self, mode: str, path: str, attempt: int) -> bool:
        """Whether fault ``mode`` hits the ``attempt``-th (0-based) request of ``path``."""
        rate = getattr(self, f"{mode}_rate")
        if rate <= 0.0 or (self.attempts and attempt >= self.attempts):
            return False
        if not fnmatch.fnmatchcase(path, self.match):
            return False
        digest = hashlib.blake2b(f"{self.seed}\0{mode}\0{path}\0{attempt}".encode(),
                                 digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0 ** 64 < rate


# ------------------------------------------------------------------------------ the index


@dataclass
class _Exposure:
    exp_name: str
    mjd_obs: float = math.nan
    filter: str = ""
    ra: float = math.nan
    dec: float = math.nan
    posangle: float = math.nan
    exptime: float = math.nan
    airmass: float = math.nan
    camera: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)  # (chip, file name)


def _lenient_header_fields(header) -> dict[str, Any]:
    """Exposure fields from a primary header, each NaN/empty when absent or unreadable."""
    out: dict[str, Any] = {}

    def number(key):
        try:
            v = float(header[key])
            return v if math.isfinite(v) else math.nan
        except (KeyError, TypeError, ValueError):
            return math.nan

    def angle(key, hours):
        try:
            return parse_angle(header[key], hours=hours, what=key)
        except (KeyError, TypeError, ValueError):
            return math.nan

    out["mjd_obs"] = number("MJD-OBS")
    if not math.isfinite(out["mjd_obs"]) and "DATE-OBS" in header:
        try:
            out["mjd_obs"] = parse_time(str(header["DATE-OBS"]))
        except ValueError:
            pass
    filt = str(header.get("FILTER", "") or "").strip()
    if not filt:
        filt = str(header.get("FILTERID", "") or "").strip().split(".")[0]
    out["filter"] = filt
    ra = angle("RA", True)
    out["ra"] = ra % 360.0 if math.isfinite(ra) else ra
    out["dec"] = angle("DEC", False)
    out["posangle"] = number("POSANGLE")
    out["exptime"] = number("EXPTIME")
    out["airmass"] = number("AIRMASS")
    out["camera"] = str(header.get("CAMERA", "") or "").strip()
    return out


class DatastoreIndex:
    """What a datastore directory holds: exposures, chip files, their sizes and md5 sums.

    The directory is rescanned on every listing (new exposures appear as the simulator or a
    copy adds them); headers and checksums are cached by file size and modification time.

    Parameters
    ----------
    root : path
        ``ROOT/<EXPNAME>/<EXPNAME>.<CHIP>.fits``.
    settle_s : float
        An exposure is listed only when its directory and files have not changed for this
        many seconds (use a few seconds when serving a directory that is still being written).
        Names starting with ``.`` (temporary files) are never listed.
    """

    def __init__(self, root: str | os.PathLike, *, settle_s: float = 0.0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"datastore root {self.root}: not a directory")
        self.settle_s = float(settle_s)
        self._lock = threading.Lock()
        self._exposures: dict[str, tuple[tuple, _Exposure]] = {}
        self._md5: dict[tuple[str, int, int], str] = {}
        self._md5_locks: dict[str, threading.Lock] = {}
        self.md5_computed = 0  # number of checksums computed (not served from the cache)

    # ---- scanning
    def _scan_exposure(self, exp: str, now: float) -> _Exposure | None:
        directory = self.root / exp
        pattern = re.compile(rf"^{re.escape(exp)}\.([A-Za-z0-9][A-Za-z0-9_+-]{{0,31}})\.fits$")
        files = []
        try:
            newest = directory.stat().st_mtime
            with os.scandir(directory) as it:
                for f in it:
                    m = pattern.match(f.name)
                    if m and f.is_file():
                        st = f.stat()
                        newest = max(newest, st.st_mtime)
                        files.append((m.group(1), f.name, st.st_size, st.st_mtime_ns))
        except OSError:
            return None
        if not files or (self.settle_s > 0 and now - newest < self.settle_s):
            return None
        files.sort()
        key = tuple(files)
        with self._lock:
            cached = self._exposures.get(exp)
        if cached is not None and cached[0] == key:
            return cached[1]
        info = _Exposure(exp_name=exp, files=[(c, n) for c, n, _, _ in files])
        from astropy.io import fits  # deferred: only when a new exposure is first seen

        for _, name, _, _ in files:
            try:
                header = fits.getheader(directory / name, 0)
            except Exception as err:  # noqa: BLE001 - a corrupt chip must not hide the exposure
                log.warning("datastore: cannot read the header of %s/%s: %s", exp, name, err)
                continue
            for k, v in _lenient_header_fields(header).items():
                setattr(info, k, v)
            break
        with self._lock:
            self._exposures[exp] = (key, info)
        return info

    def exposures(self, *, since_mjd: float | None = None) -> list[_Exposure]:
        """Exposures in time order (MJD-OBS, then name), optionally only those with
        ``MJD-OBS >= since_mjd`` (exposures without a time are then left out)."""
        now = time.time()
        out = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.is_dir() and _EXP_RE.fullmatch(entry.name):
                    info = self._scan_exposure(entry.name, now)
                    if info is not None:
                        out.append(info)
        if since_mjd is not None:
            out = [e for e in out if math.isfinite(e.mjd_obs) and e.mjd_obs >= since_mjd]
        out.sort(key=lambda e: (math.isnan(e.mjd_obs), e.mjd_obs if math.isfinite(e.mjd_obs) else 0.0,
                                e.exp_name))
        return out

    def exposure(self, exp_name: str) -> _Exposure | None:
        """One exposure by name (None if unknown, not settled, or the name is not valid)."""
        if not _EXP_RE.fullmatch(exp_name) or not (self.root / exp_name).is_dir():
            return None
        return self._scan_exposure(exp_name, time.time())

    def file_path(self, exp_name: str, file_name: str) -> Path | None:
        """The file of a listed chip, or None (names are checked, never joined blindly)."""
        info = self.exposure(exp_name)
        if info is None or file_name not in {n for _, n in info.files}:
            return None
        return self.root / exp_name / file_name

    # ---- checksums
    def md5(self, path: Path) -> str:
        """md5 (hex) of a file, computed once per (path, size, mtime)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._md5:
                return self._md5[key]
            lock = self._md5_locks.setdefault(str(path), threading.Lock())
        with lock:  # one thread computes; others wait for its result
            with self._lock:
                if key in self._md5:
                    return self._md5[key]
            h = hashlib.md5()
            with open(path, "rb") as fh:
                while chunk := fh.read(_MD5_CHUNK):
                    h.update(chunk)
            digest = h.hexdigest()
            with self._lock:
                self._md5[key] = digest
                self.md5_computed += 1
        return digest

    def warm(self) -> int:
        """Compute the checksum of every listed file now (those cached are skipped); returns
        the number of files. The server does this in the background when it starts, so that
        the first listing of a large exposure does not keep a client waiting."""
        n = 0
        for exposure in self.exposures():
            n += len(self.chip_rows(exposure.exp_name) or [])
        return n

    def chip_rows(self, exp_name: str) -> list[dict[str, Any]] | None:
        """Chip-listing rows (chip, bytes, md5, file, path) of an exposure, or None."""
        info = self.exposure(exp_name)
        if info is None:
            return None
        rows = []
        for chip, name in info.files:
            path = self.root / exp_name / name
            try:
                size = path.stat().st_size
                digest = self.md5(path)
            except FileNotFoundError:
                continue
            rows.append({"chip": chip, "bytes": size, "md5": digest, "file": name,
                         "path": f"/{quote(exp_name)}/{quote(name)}"})
        return rows


# ------------------------------------------------------------------------------ the server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, index: DatastoreIndex, faults: Sequence[FaultSpec],
                 public_url: str | None = None):
        super().__init__(address, _Handler)
        self.index = index
        self.faults = tuple(faults)
        self.stop_event = threading.Event()
        self.counts: Counter = Counter()
        self._attempts: Counter = Counter()
        self._lock = threading.Lock()
        host, port = self.server_address[:2]
        self.public_url = public_url.rstrip("/") if public_url else (
            None if host in ("0.0.0.0", "::") else f"http://{_url_host(host)}:{port}")

    def handle_error(self, request, client_address) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, socket.timeout)):
            log.debug("datastore: client %s went away: %s", client_address, err)
        else:
            log.exception("datastore: error while answering %s", client_address)

    def draw(self, mode: str, path: str, attempt: int) -> FaultSpec | None:
        """The first fault spec whose draw of ``mode`` hits this request, or None."""
        for spec in self.faults:
            if spec.draw(mode, path, attempt):
                return spec
        return None

    def attempt(self, path: str) -> int:
        with self._lock:
            n = self._attempts[path]
            self._attempts[path] += 1
            self.counts["requests"] += 1
            return n

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ps1mpi-datastore/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # quiet: the logging module decides
        log.debug("%s %s", self.address_string(), fmt % args)

    def _base(self) -> str:
        if self.server.public_url:
            return self.server.public_url
        host = self.headers.get("Host", "")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?", host):
            host = f"{_url_host(self.server.server_address[0])}:{self.server.server_address[1]}"
        return f"http://{host}"

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    # ---- dispatch
    def _handle(self, *, head: bool) -> None:
        try:
            url = urlsplit(self.path)
            path = url.path
            query = parse_qs(url.query)
            attempt = self.server.attempt(path)
            slow = self.server.draw("slow", path, attempt)
            if slow is not None:
                self.server.count("slow")
                if self.server.stop_event.wait(slow.slow_s):
                    return
            if self.server.draw("error", path, attempt) is not None:
                self.server.count("error")
                self._send_text(HTTPStatus.INTERNAL_SERVER_ERROR,
                                "injected fault: internal server error\n", head=head)
                return
            truncate = self.server.draw("truncate", path, attempt)
            parts = [p for p in path.split("/") if p]
            if path in ("/", "/index.txt", "/index.json"):
                self._exposure_listing(query, path.endswith(".json"), head, truncate)
            elif len(parts) == 1 or (len(parts) == 2 and parts[1] in ("index.txt", "index.json")):
                if len(parts) == 1 and not path.endswith("/"):
                    self._send_text(HTTPStatus.NOT_FOUND, f"no such file: {path}\n", head=head)
                    return
                as_json = len(parts) == 2 and parts[1] == "index.json"
                self._chip_listing(parts[0], query, as_json, head, truncate, attempt)
            elif len(parts) == 2:
                self._file(parts[0], parts[1], head, truncate)
            else:
                self._send_text(HTTPStatus.NOT_FOUND, f"no such file: {path}\n", head=head)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    def _send_text(self, status: int, text: str, *, head: bool,
                   truncate: FaultSpec | None = None,
                   content_type: str = "text/plain; charset=utf-8") -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status >= 400 or truncate is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        if truncate is not None:
            self.server.count("truncate")
            body = body[:int(len(body) * truncate.truncate_fraction)]
        self.wfile.write(body)

    def _listing_format(self, query: dict, as_json: bool) -> bool:
        return as_json or query.get("format", ["txt"])[-1].lower() == "json"

    def _exposure_listing(self, query: dict, as_json: bool, head: bool,
                          truncate: FaultSpec | None) -> None:
        since = None
        if "since" in query:
            try:
                since = parse_time(query["since"][-1])
            except ValueError as err:
                self._send_text(HTTPStatus.BAD_REQUEST, f"bad since: {err}\n", head=head)
                return
        base = self._base()
        rows = []
        for e in self.server.index.exposures(since_mjd=since):
            rows.append({"exp_name": e.exp_name, "dateobs": mjd_to_iso(e.mjd_obs),
                         "mjd_obs": e.mjd_obs, "filter": e.filter, "ra": e.ra, "dec": e.dec,
                         "posangle": e.posangle, "exptime": e.exptime, "airmass": e.airmass,
                         "camera": e.camera, "nchips": len(e.files),
                         "uri": f"{base}/{quote(e.exp_name)}/index.txt"})
        if self._listing_format(query, as_json):
            text = json.dumps({"exposures": [{c: _json_value(r[c]) for c in EXPOSURE_COLUMNS}
                                             for r in rows]}, indent=1) + "\n"
            self._send_text(HTTPStatus.OK, text, head=head, truncate=truncate,
                            content_type="application/json")
        else:
            self._send_text(HTTPStatus.OK, format_exposure_listing(rows), head=head,
                            truncate=truncate)

    def _chip_listing(self, exp_name: str, query: dict, as_json: bool, head: bool,
                      truncate: FaultSpec | None, attempt: int) -> None:
        rows = self.server.index.chip_rows(exp_name)
        if rows is None:
            self._send_text(HTTPStatus.NOT_FOUND, f"no exposure {exp_name!r}\n", head=head)
            return
        base = self._base()
        out = []
        for row in rows:
            row = dict(row)
            bad = self.server.draw("bad_md5", row["path"], attempt)
            if bad is not None:
                self.server.count("bad_md5")
                row["md5"] = hashlib.md5(f"wrong:{bad.seed}:{row['md5']}".encode()).hexdigest()
            if self.server.draw("oversize", row["path"], attempt) is not None and row["bytes"] > 0:
                self.server.count("oversize")
                row["bytes"] = row["bytes"] - max(1, row["bytes"] // 8)
            row["uri"] = base + row.pop("path")
            out.append(row)
        if self._listing_format(query, as_json):
            text = json.dumps({"exp_name": exp_name,
                               "chips": [{c: r[c] for c in CHIP_COLUMNS} for r in out]},
                              indent=1) + "\n"
            self._send_text(HTTPStatus.OK, text, head=head, truncate=truncate,
                            content_type="application/json")
        else:
            self._send_text(HTTPStatus.OK, format_chip_listing(out), head=head, truncate=truncate)

    def _file(self, exp_name: str, file_name: str, head: bool,
              truncate: FaultSpec | None) -> None:
        path = self.server.index.file_path(exp_name, file_name)
        if path is None:
            self._send_text(HTTPStatus.NOT_FOUND, f"no file {exp_name}/{file_name}\n", head=head)
            return
        try:
            fh = open(path, "rb")
        except OSError as err:
            self._send_text(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot read the file: {err}\n",
                            head=head)
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/fits")
            self.send_header("Content-Length", str(size))
            if truncate is not None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return
            count = size
            if truncate is not None:
                self.server.count("truncate")
                count = int(size * truncate.truncate_fraction)
            if count:
                self.wfile.flush()
                self.connection.sendfile(fh, 0, count)
            self.server.count("files")


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------ running


def _specs(faults: FaultSpec | Sequence[FaultSpec] | None) -> tuple[FaultSpec, ...]:
    if faults is None:
        return ()
    if isinstance(faults, FaultSpec):
        return (faults,)
    specs = tuple(faults)
    bad = [f for f in specs if not isinstance(f, FaultSpec)]
    if bad:
        raise TypeError(f"faults must be FaultSpec objects, got {bad!r}")
    return specs


def make_server(root: str | os.PathLike, *,
                faults: FaultSpec | Sequence[FaultSpec] | None = None,
                host: str = "127.0.0.1", port: int = 0, settle_s: float = 0.0,
                public_url: str | None = None) -> _Server:
    """Create (bind) the datastore server without starting it; ``serve_forever()`` runs it."""
    index = DatastoreIndex(root, settle_s=settle_s)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("_Server6", (_Server,), {"address_family": family}) if family == socket.AF_INET6 else _Server
    return server_cls((host, port), index, _specs(faults), public_url)


class DatastoreHandle:
    """A datastore running in a background thread (see :func:`start_datastore`)."""

    def __init__(self, server: _Server):
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="datastore", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        host, port = self._server.server_address[:2]
        return self._server.public_url or f"http://{_url_host(host)}:{port}"

    @property
    def index(self) -> DatastoreIndex:
        return self._server.index

    @property
    def faults(self) -> tuple[FaultSpec, ...]:
        return self._server.faults

    def set_faults(self, faults: FaultSpec | Sequence[FaultSpec] | None) -> None:
        """Change the fault injection of the running server (request counters are kept)."""
        self._server.faults = _specs(faults)

    def stats(self) -> dict[str, int]:
        """Requests served and faults injected so far, by kind."""
        with self._server._lock:
            return dict(self._server.counts)

    def stop(self) -> None:
        """Stop serving, wake slow answers, close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.stop_event.set()
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._server.server_close()

    def __enter__(self) -> "DatastoreHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_datastore(root: str | os.PathLike, *,
                    faults: FaultSpec | Sequence[FaultSpec] | None = None,
                    host: str = "127.0.0.1", port: int = 0, settle_s: float = 0.0
                    ) -> DatastoreHandle:
    """Serve ``root`` over HTTP from a background thread of this process.

    Parameters
    ----------
    root : path
        Datastore directory (``ROOT/<EXPNAME>/<EXPNAME>.<CHIP>.fits``).
    faults : FaultSpec or sequence of FaultSpec, optional
        Faults to inject (none by default); with several specs (e.g. one per mode, each with
        its own ``match``), a request is hit when any spec's draw hits it.
    host : str
        Interface to bind; loopback by default.
    port : int
        TCP port; 0 picks a free one (read it from ``handle.url``).
    settle_s : float
        List an exposure only once its files have been unchanged this long (s).

    Returns
    -------
    DatastoreHandle
        With ``.url``, ``.stop()``, ``.stats()``; also a context manager.
    """
    return DatastoreHandle(make_server(root, faults=faults, host=host, port=port,
                                       settle_s=settle_s))

