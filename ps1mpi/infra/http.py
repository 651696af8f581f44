"""Talking to a datastore over HTTP: listings, verified atomic downloads, untrusted input.

Everything that comes back from the network is treated as untrusted data:

- :func:`download` streams a URL to a file under a temporary name in the destination's
  directory, computes the md5 while streaming, refuses a body larger than the listed size
  (before reading it when the server announces its length, and while streaming otherwise),
  compares size and checksum, and renames the file into place only when both match. On any
  failure nothing is left at the destination or under the temporary name.
- :func:`safe_component` / :func:`safe_join` refuse names from a listing that would escape
  the raw data tree (``..``, absolute paths, path separators, odd characters);
  :func:`check_url` refuses URLs on hosts other than the datastore's unless allowed.
- Every failure raises a distinct subclass of :class:`DownloadError` that carries the IPP
  fault code (``.fault``: 2 system for connection and HTTP errors, 6 timeout, 5 data for
  checksum mismatch, truncation, oversize bodies, malformed listings and unsafe names) and a
  message naming the URL. The MPI runtime turns ``.fault`` into the element's fault code.

The listing format (plain-text tables, one row per line) is defined here, once, for the
datastore server (:mod:`ps1mpi.sim.datastore`) and its clients; it is documented in
``docs/datastore.md``.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit

from .schema import Fault

__all__ = [
    "DownloadError", "ConnectionFailed", "HTTPStatusError", "DownloadTimeout", "TruncatedBody",
    "OversizeBody", "ChecksumMismatch", "ListingError", "UnsafeInput",
    "DownloadResult", "ExposureRow", "ChipRow",
    "download", "fetch", "list_exposures", "list_chips", "parse_exposure_listing",
    "parse_chip_listing", "format_exposure_listing", "format_chip_listing",
    "safe_component", "safe_join", "check_url", "parse_time", "mjd_to_iso", "iso_to_mjd",
    "EXPOSURE_COLUMNS", "CHIP_COLUMNS", "LISTING_VERSION",
]

# ------------------------------------------------------------------------------ errors


class DownloadError(RuntimeError):
    """A transfer from the datastore failed; ``.fault`` is the IPP fault code, ``.url`` the URL.

    The base class is a system fault (2): a failure of the network or of the server that a
    retry may cure.
    """

    fault: int = Fault.SYSTEM

    def __init__(self, url: str, problem: str):
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem


class ConnectionFailed(DownloadError):
    """The server could not be reached, or dropped the connection before answering (fault 2)."""

    fault = Fault.SYSTEM


class HTTPStatusError(DownloadError):
    """The server answered with an HTTP status other than 200 (fault 2). ``.status`` holds it."""

    fault = Fault.SYSTEM

    def __init__(self, url: str, status: int, reason: str):
        super().__init__(url, f"HTTP {status} {reason}".rstrip())
        self.status = status


class DownloadTimeout(DownloadError):
    """The server did not answer (or deliver the body) within the time allowed (fault 6)."""

    fault = Fault.TIMEOUT


class TruncatedBody(DownloadError):
    """Fewer bytes arrived than announced or listed (fault 5, data)."""

    fault = Fault.DATA


class OversizeBody(DownloadError):
    """The body is larger than the listed size: refused without keeping it (fault 5, data)."""

    fault = Fault.DATA


class ChecksumMismatch(DownloadError):
    """The md5 of the bytes received differs from the listed checksum (fault 5, data)."""

    fault = Fault.DATA


class ListingError(DownloadError):
    """A listing is not in the documented format (fault 5, data)."""

    fault = Fault.DATA


class UnsafeInput(DownloadError):
    """A name or URL from a listing is refused: it would leave the raw data tree, or points
    at a host that is not allowed (fault 5, data)."""

    fault = Fault.DATA


# ------------------------------------------------------------------------------ safe names

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def safe_component(name: str, *, what: str = "name", source: str = "listing") -> str:
    """Check that ``name`` is one harmless path component and return it.

    Accepted: 1-128 characters from ``A-Z a-z 0-9 . _ + -``, starting with a letter or digit,
    without ``..``. Refused: empty names, ``.`` and ``..``, anything with a path separator, a
    drive or scheme prefix, white space, control or non-ASCII characters, or a leading dot or
    dash (hidden files, option-like names).

    Parameters
    ----------
    name : str
        The untrusted name (e.g. an exposure name or a file name from a listing).
    what : str
        What the name is, for the error message (``"file name"``, ``"exposure name"``).
    source : str
        Where the name came from (a URL), for the error message.

    Raises
    ------
    UnsafeInput
        The name is refused; the message says why.
    """
    if not isinstance(name, str):
        raise UnsafeInput(source, f"{what} {name!r} is not a string")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        if name in ("", ".", ".."):
            why = "empty or a directory reference"
        elif "/" in name or "\\" in name or os.sep in name:
            why = "contains a path separator (absolute path or directory traversal)"
        elif ".." in name:
            why = "contains '..'"
        elif len(name) > 128:
            why = "is longer than 128 characters"
        else:
            why = "contains characters outside [A-Za-z0-9._+-] or starts with '.', '-', '+' or '_'"
        raise UnsafeInput(source, f"refusing {what} {name!r}: {why}")
    return name


def safe_join(root: str | os.PathLike, *parts: str, source: str = "listing") -> Path:
    """Join untrusted path components below ``root``, refusing anything that escapes it.

    Every component must pass :func:`safe_component`; the joined path is then resolved
    (following symbolic links that already exist) and must still lie inside ``root``.

    Parameters
    ----------
    root : path
        The directory the result must stay in (e.g. the raw data tree).
    *parts : str
        Untrusted components (e.g. the exposure name and the file name from a listing).
    source : str
        Where the names came from, for error messages.

    Returns
    -------
    Path
        ``root / part0 / part1 ...`` (not resolved).
    """
    root = Path(root)
    if not parts:
        raise UnsafeInput(source, "no path components given")
    for part in parts:
        safe_component(part, what="path component", source=source)
    path = root.joinpath(*parts)
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafeInput(source, f"refusing path {path}: it resolves to {real}, outside {real_root}")
    return path


def _host_port(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise UnsafeInput(url, "the URL has an invalid port") from None
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, (parts.hostname or "").lower(), port


def check_url(url: str, *, base: str, allowed_hosts: Iterable[str] = ()) -> str:
    """Check that an untrusted URL is http(s) on the datastore's host, and return it.

    Parameters
    ----------
    url : str
        URL from a listing (relative URLs are resolved against ``base``).
    base : str
        The datastore URL the listing came from.
    allowed_hosts : iterable of str
        Other hosts that may serve files, as ``host`` (any port) or ``host:port``.

    Returns
    -------
    str
        The absolute URL.

    Raises
    ------
    UnsafeInput
        Another scheme (file:, ftp:, ...), user credentials in the URL, or a host that is
        neither the datastore's nor allowed.
    """
    if not isinstance(url, str) or not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise UnsafeInput(base, f"refusing URL {url!r}: empty or contains white space/control characters")
    full = urljoin(base, url)
    parts = urlsplit(full)
    if parts.scheme.lower() not in ("http", "https"):
        raise UnsafeInput(full, f"refusing URL scheme {parts.scheme!r}: only http and https are fetched")
    if parts.username or parts.password:
        raise UnsafeInput(full, "refusing a URL with user credentials")
    scheme, host, port = _host_port(full)
    _, base_host, base_port = _host_port(base)
    if (host, port) == (base_host, base_port):
        return full
    for allowed in allowed_hosts:
        allowed = allowed.lower().strip()
        if ":" in allowed:
            a_host, a_port = allowed.rsplit(":", 1)
            if host == a_host and str(port) == a_port:
                return full
        elif host == allowed:
            return full
    raise UnsafeInput(full, f"refusing URL on host {host}:{port}: not the datastore "
                            f"({base_host}:{base_port}) and not in the allowed hosts")


# ------------------------------------------------------------------------------ time

_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=timezone.utc)


def mjd_to_iso(mjd: float) -> str:
    """Modified Julian Date (UTC, days) -> ISO 8601 ``YYYY-MM-DDTHH:MM:SS.sss`` (UTC).

    Leap seconds are ignored (as in POSIX time); the round trip is exact to 1 ms.
    """
    if not math.isfinite(mjd):
        return "-"
    t = _MJD_EPOCH + timedelta(days=float(mjd))
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def iso_to_mjd(text: str) -> float:
    """ISO 8601 time (UTC unless it carries an offset) -> Modified Julian Date (days)."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"time {text!r} is neither an MJD nor an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (t - _MJD_EPOCH).total_seconds() / 86400.0


def parse_time(value: str | float) -> float:
    """An MJD (number) or an ISO 8601 time (text) -> MJD (days, UTC)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        mjd = float(text)
    except ValueError:
        return iso_to_mjd(text)
    if not math.isfinite(mjd):
        raise ValueError(f"time {text!r} is not a finite MJD")
    return mjd


# ------------------------------------------------------------------------------ listings

LISTING_VERSION = 1
EXPOSURE_COLUMNS = ("exp_name", "dateobs", "mjd_obs", "filter", "ra", "dec", "posangle",
                    "exptime", "airmass", "camera", "nchips", "uri")
CHIP_COLUMNS = ("chip", "bytes", "md5", "file", "uri")
_EXPOSURE_MAGIC = f"# ps1mpi-datastore exposures v{LISTING_VERSION}"
_CHIP_MAGIC = f"# ps1mpi-datastore chips v{LISTING_VERSION}"
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ExposureRow:
    """One row of the exposure listing (units: degrees, seconds, days)."""

    exp_name: str
    dateobs: str          # ISO 8601 UTC of the exposure start
    mjd_obs: float        # MJD of the exposure start (days)
    filter: str
    ra: float             # boresight right ascension (deg)
    dec: float            # boresight declination (deg)
    posangle: float       # position angle (deg)
    exptime: float        # exposure time (s)
    airmass: float
    camera: str
    nchips: int           # chip files listed for the exposure
    uri: str              # URL of the exposure's chip listing


@dataclass(frozen=True)
class ChipRow:
    """One row of an exposure's chip listing."""

    chip: str             # chip (OTA) name, e.g. XY01
    bytes: int            # file size (bytes)
    md5: str              # md5 of the file (32 lower-case hex digits)
    file: str             # file name, e.g. o5432g0123o.XY01.fits
    uri: str              # download URL


def _token(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else repr(float(value))
    text = str(value)
    if text == "-":
        return "%2D"  # a literal dash, not the missing-value marker
    return quote(text, safe="/._+-:@!~*'(),=?&;#[]$") if text else "-"


def _format(magic: str, columns: Sequence[str], rows: Iterable[dict]) -> str:
    lines = [magic, "# " + " ".join(columns)]
    for row in rows:
        lines.append(" ".join(_token(row.get(c)) for c in columns))
    return "\n".join(lines) + "\n"


def format_exposure_listing(rows: Iterable[dict]) -> str:
    """The exposure listing as text: a magic line, a column line, one row per line.

    ``rows`` are dicts with the keys of :data:`EXPOSURE_COLUMNS`; missing or non-finite
    values are written ``-``; text is percent-encoded so that no value contains white space.
    """
    return _format(_EXPOSURE_MAGIC, EXPOSURE_COLUMNS, rows)


def format_chip_listing(rows: Iterable[dict]) -> str:
    """An exposure's chip listing as text (keys of :data:`CHIP_COLUMNS`)."""
    return _format(_CHIP_MAGIC, CHIP_COLUMNS, rows)


def _parse_table(text: str, magic: str, required: Sequence[str], url: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != magic:
        head = lines[0][:60] if lines else ""
        raise ListingError(url, f"not a datastore listing: first line {head!r}, expected {magic!r}")
    if len(lines) < 2 or not lines[1].startswith("#"):
        raise ListingError(url, "listing has no column line after its first line")
    columns = lines[1][1:].split()
    missing = [c for c in required if c not in columns]
    if missing:
        raise ListingError(url, f"listing lacks columns {missing}")
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = line.split()
        if len(tokens) != len(columns):
            raise ListingError(url, f"line {number}: {len(tokens)} values for {len(columns)} columns")
        rows.append({c: ("" if t == "-" else unquote(t)) for c, t in zip(columns, tokens)})
    return rows


def _num(row: dict, key: str, url: str, kind=float):
    text = row[key]
    if text == "":
        return math.nan if kind is float else -1
    try:
        return kind(text)
    except ValueError:
        raise ListingError(url, f"column {key}: {text!r} is not a {kind.__name__}") from None


def parse_exposure_listing(text: str, *, url: str = "listing") -> list[ExposureRow]:
    """Parse the exposure listing; relative chip-listing URLs are resolved against ``url``."""
    out = []
    for row in _parse_table(text, _EXPOSURE_MAGIC, EXPOSURE_COLUMNS, url):
        if not row["exp_name"] or not row["uri"]:
            raise ListingError(url, f"exposure row without a name or a chip-listing URL: {row}")
        out.append(ExposureRow(
            exp_name=row["exp_name"], dateobs=row["dateobs"], mjd_obs=_num(row, "mjd_obs", url),
            filter=row["filter"], ra=_num(row, "ra", url), dec=_num(row, "dec", url),
            posangle=_num(row, "posangle", url), exptime=_num(row, "exptime", url),
            airmass=_num(row, "airmass", url), camera=row["camera"],
            nchips=_num(row, "nchips", url, int), uri=urljoin(url, row["uri"])))
    return out


def parse_chip_listing(text: str, *, url: str = "listing") -> list[ChipRow]:
    """Parse an exposure's chip listing; sizes must be non-negative, checksums 32 hex digits."""
    out = []
    for row in _parse_table(text, _CHIP_MAGIC, CHIP_COLUMNS, url):
        size = _num(row, "bytes", url, int)
        md5 = row["md5"].lower()
        if size < 0:
            raise ListingError(url, f"chip {row['chip']!r}: missing or negative size")
        if not _MD5_RE.fullmatch(md5):
            raise ListingError(url, f"chip {row['chip']!r}: checksum {row['md5']!r} is not an md5")
        if not row["chip"] or not row["file"] or not row["uri"]:
            raise ListingError(url, f"chip row without a chip name, file name or URL: {row}")
        out.append(ChipRow(chip=row["chip"], bytes=size, md5=md5, file=row["file"],
                           uri=urljoin(url, row["uri"])))
    return out


# ------------------------------------------------------------------------------ transfers


@dataclass
class DownloadResult:
    """What one download did (sizes in bytes, times in seconds)."""

    url: str
    path: Path
    bytes: int
    md5: str
    seconds: float          # wall time of the whole download
    t_network: float        # connecting, waiting for the server, receiving
    t_md5: float            # hashing
    t_disk: float           # writing, fsync and rename
    extra: dict = field(default_factory=dict)

    @property
    def mb_s(self) -> float:
        """Rate over the whole download (MB/s, 1 MB = 1e6 bytes)."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else math.inf


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeInput(url, f"refusing URL scheme {parts.scheme!r}: only http and https are fetched")
    if not parts.hostname:
        raise ConnectionFailed(url, "the URL has no host")
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    try:
        conn = cls(parts.hostname, parts.port, timeout=timeout)
    except ValueError as err:
        raise ConnectionFailed(url, f"bad URL: {err}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return conn, target


def _open(url: str, timeout: float, method: str = "GET") -> tuple[http.client.HTTPConnection,
                                                                  http.client.HTTPResponse]:
    """Send a request and return the connection and response (status 200 only)."""
    conn, target = _connect(url, timeout)
    try:
        conn.request(method, target, headers={"Accept-Encoding": "identity",
                                              "User-Agent": "ps1mpi-summitcopy"})
        resp = conn.getresponse()
    except (socket.timeout, TimeoutError):
        conn.close()
        raise DownloadTimeout(url, f"no answer within {timeout:g} s") from None
    except (ConnectionError, OSError, http.client.HTTPException) as err:
        conn.close()
        raise ConnectionFailed(url, f"connection failed: {type(err).__name__}: {err}") from None
    if resp.status != 200:
        detail = ""
        try:
            detail = resp.read(300).decode("utf-8", "replace").strip().splitlines()[0:1]
            detail = detail[0] if detail else ""
        except Exception:  # noqa: BLE001 - the status is what matters
            detail = ""
        conn.close()
        raise HTTPStatusError(url, resp.status, f"{resp.reason}{': ' + detail if detail else ''}")
    return conn, resp


def _content_length(url: str, resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConnectionFailed(url, f"bad Content-Length header {value!r}") from None
    if n < 0:
        raise ConnectionFailed(url, f"negative Content-Length header {value!r}")
    return n


def fetch(url: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20) -> bytes:
    """GET a small document (a listing) whole, refusing more than ``max_bytes``.

    Raises the :class:`DownloadError` subclasses of :func:`download`.
    """
    conn, resp = _open(url, timeout)
    try:
        length = _content_length(url, resp)
        if length is not None and length > max_bytes:
            raise OversizeBody(url, f"document of {length} bytes exceeds the limit of {max_bytes}")
        chunks = []
        total = 0
        while True:
            try:
                chunk = resp.read(min(1 << 16, max_bytes + 1 - total))
            except (socket.timeout, TimeoutError):
                raise DownloadTimeout(url, f"body stalled for more than {timeout:g} s") from None
            except http.client.IncompleteRead as err:
                raise TruncatedBody(url, f"body ended after {total + len(err.partial)} of "
                                         f"{length} bytes") from None
            except (ConnectionError, OSError, http.client.HTTPException) as err:
                raise TruncatedBody(url, f"connection lost after {total} bytes: {err}") from None
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise OversizeBody(url, f"document exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if length is not None and total < length:
            raise TruncatedBody(url, f"body ended after {total} of {length} bytes")
        return b"".join(chunks)
    finally:
        conn.close()


def list_exposures(base_url: str, *, since: str | float | None = None, timeout: float = 30.0
                   ) -> list[ExposureRow]:
    """The datastore's exposure listing, optionally only exposures starting at or after
    ``since`` (an MJD, or an ISO 8601 time)."""
    url = urljoin(base_url if base_url.endswith("/") else base_url + "/", "index.txt")
    if since is not None:
        url += "?" + urlencode({"since": str(since)})
    text = fetch(url, timeout=timeout).decode("utf-8", "replace")
    return parse_exposure_listing(text, url=url)


def list_chips(url: str, *, timeout: float = 30.0) -> list[ChipRow]:
    """An exposure's chip listing (``url`` from :attr:`ExposureRow.uri`)."""
    text = fetch(url, timeout=timeout).decode("utf-8", "replace")
    return parse_chip_listing(text, url=url)


def download(url: str, dest: str | os.PathLike, *, size: int | None = None,
             md5: str | None = None, timeout: float = 30.0, deadline_s: float | None = None,
             chunk_bytes: int = 1 << 20, fsync: bool = True) -> DownloadResult:
    """Download ``url`` to ``dest`` atomically, verifying size and md5 while streaming.

    The body is written to a temporary file beside ``dest`` (``.<name>.part-<random>``),
    hashed as it arrives, and renamed to ``dest`` only when the byte count equals the listed
    ``size`` (and the announced Content-Length) and the md5 equals ``md5``. On any failure
    the temporary file is removed and ``dest`` is untouched (an older file there stays).

    Parameters
    ----------
    url : str
        The file's URL (http or https). Redirects are not followed.
    dest : path
        Final path; its directory is created if needed.
    size : int, optional
        Listed size (bytes). A body announced or found to be larger is refused
        (:class:`OversizeBody`) without reading past the limit; a shorter one is
        :class:`TruncatedBody`.
    md5 : str, optional
        Listed md5 (hex). A different checksum raises :class:`ChecksumMismatch`.
    timeout : float
        Seconds allowed for connecting and for each wait on the socket.
    deadline_s : float, optional
        Seconds allowed for the whole transfer (catches servers that trickle data).
    chunk_bytes : int
        Bytes read, hashed and written per step.
    fsync : bool
        Flush the file to stable storage before the rename (crash safety).

    Returns
    -------
    DownloadResult
        Sizes, checksum and the time split between network, md5 and disk.

    Raises
    ------
    ConnectionFailed, HTTPStatusError
        Fault 2 (system).
    DownloadTimeout
        Fault 6.
    TruncatedBody, OversizeBody, ChecksumMismatch
        Fault 5 (data).
    """
    if size is not None and size < 0:
        raise ValueError(f"download {url}: listed size must be >= 0, got {size}")
    if md5 is not None and not _MD5_RE.fullmatch(md5.lower()):
        raise ValueError(f"download {url}: listed md5 {md5!r} is not 32 hex digits")
    if chunk_bytes <= 0:
        raise ValueError(f"download {url}: chunk_bytes must be positive, got {chunk_bytes}")
    dest = Path(dest)
    t0 = time.perf_counter()
    deadline = None if deadline_s is None else t0 + deadline_s
    conn, resp = _open(url, timeout)
    t_net = time.perf_counter() - t0
    t_md5 = 0.0
    t_disk = 0.0
    tmp = dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")
    hasher = hashlib.md5()
    total = 0
    try:
        length = _content_length(url, resp)
        if size is not None and length is not None and length > size:
            raise OversizeBody(url, f"server announces {length} bytes, more than the listed "
                                    f"{size}; refused")
        expected = size if size is not None else length
        limit = size if size is not None else (length if length is not None else None)
        t = time.perf_counter()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "wb")
        t_disk += time.perf_counter() - t
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        with fh:
            while True:
                if deadline is not None and time.perf_counter() > deadline:
                    raise DownloadTimeout(url, f"transfer not finished within {deadline_s:g} s "
                                               f"({total} bytes received)")
                want = chunk_bytes if limit is None else min(chunk_bytes, limit + 1 - total)
                t = time.perf_counter()
                try:
                    n = resp.readinto(view[:max(want, 1)])
                except (socket.timeout, TimeoutError):
                    raise DownloadTimeout(url, f"body stalled for more than {timeout:g} s after "
                                               f"{total} bytes") from None
                except http.client.IncompleteRead as err:
                    got = total + len(err.partial or b"")
                    raise TruncatedBody(url, f"body ended after {got} of {expected} bytes") from None
                except (ConnectionError, OSError, http.client.HTTPException) as err:
                    raise TruncatedBody(url, f"connection lost after {total} of {expected} bytes: "
                                             f"{type(err).__name__}: {err}") from None
                t_net += time.perf_counter() - t
                if not n:
                    break
                total += n
                if limit is not None and total > limit:
                    raise OversizeBody(url, f"body exceeds the listed size of {limit} bytes; "
                                            "refused")
                t = time.perf_counter()
                hasher.update(view[:n])
                t_md5 += time.perf_counter() - t
                t = time.perf_counter()
                fh.write(view[:n])
                t_disk += time.perf_counter() - t
            t = time.perf_counter()
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
            t_disk += time.perf_counter() - t
        if expected is not None and total < expected:
            raise TruncatedBody(url, f"body ended after {total} of {expected} bytes")
        if length is not None and total != length:
            raise TruncatedBody(url, f"received {total} bytes, the server announced {length}")
        digest = hasher.hexdigest()
        if md5 is not None and digest != md5.lower():
            raise ChecksumMismatch(url, f"md5 of the {total} bytes received is {digest}, the "
                                        f"listing says {md5.lower()}")
        t = time.perf_counter()
        os.replace(tmp, dest)
        t_disk += time.perf_counter() - t
    finally:
        conn.close()
        if tmp.exists():
            tmp.unlink()
    return DownloadResult(url=url, path=dest, bytes=total, md5=digest,
                          seconds=time.perf_counter() - t0, t_network=t_net, t_md5=t_md5,
                          t_disk=t_disk)
