"""Downloads that verify what they receive, and refusal of hostile listing content."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ps1mpi.infra import http
from ps1mpi.infra.runtime import fault_code

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _head(self, status=200, length=None, close=False):
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if close or length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def do_GET(self):
        sent = self.server.sent
        if self.path == "/ok":
            self._head(length=len(PAYLOAD))
            self.wfile.write(PAYLOAD)
        elif self.path == "/status500":
            self._head(500, length=5, close=True)
            self.wfile.write(b"boom\n")
        elif self.path == "/slow":
            time.sleep(1.5)
            self._head(length=len(PAYLOAD))
            self.wfile.write(PAYLOAD)
        elif self.path == "/trickle":
            self._head(length=len(PAYLOAD))
            try:
                for i in range(0, len(PAYLOAD), 65536):
                    self.wfile.write(PAYLOAD[i:i + 65536])
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/short":
            self._head(length=len(PAYLOAD), close=True)
            self.wfile.write(PAYLOAD[:1000])
        elif self.path == "/nolength-huge":
            # no Content-Length: the body is delimited by closing the connection; keep sending
            # far more than any listed size and count what we managed to send
            self._head(length=None)
            try:
                for _ in range(2000):
                    self.wfile.write(b"\0" * 65536)
                    sent.append(65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/evil")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._head(404, length=0, close=True)


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients hang up on purpose in these tests


@pytest.fixture(scope="module")
def server():
    srv = _Quiet(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.sent = []
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ------------------------------------------------------------------------------ downloads

def test_download_verifies_and_reports_time_split(server, tmp_path):
    _, base = server
    dest = tmp_path / "raw" / "o1.XY01.fits"
    res = http.download(f"{base}/ok", dest, size=len(PAYLOAD), md5=PAYLOAD_MD5, chunk_bytes=100_000)
    assert dest.read_bytes() == PAYLOAD
    assert res.bytes == len(PAYLOAD) and res.md5 == PAYLOAD_MD5 and res.path == dest
    assert min(res.t_network, res.t_md5, res.t_disk) >= 0
    assert res.t_md5 > 0 and res.t_disk > 0
    assert res.t_network + res.t_md5 + res.t_disk <= res.seconds * 1.01
    assert res.mb_s > 0
    assert _leftovers(dest.parent) == [dest.name]  # no temporary file left


def test_checksum_mismatch_is_data_fault_and_leaves_nothing(server, tmp_path):
    _, base = server
    dest = tmp_path / "x.fits"
    with pytest.raises(http.ChecksumMismatch) as info:
        http.download(f"{base}/ok", dest, size=len(PAYLOAD), md5="0" * 32)
    assert info.value.fault == 5 and fault_code(info.value) == 5
    assert f"{base}/ok" in str(info.value) and PAYLOAD_MD5 in str(info.value)
    assert _leftovers(tmp_path) == []


def test_failed_download_keeps_an_existing_file(server, tmp_path):
    _, base = server
    dest = tmp_path / "x.fits"
    dest.write_bytes(b"old")
    with pytest.raises(http.ChecksumMismatch):
        http.download(f"{base}/ok", dest, md5="f" * 32)
    assert dest.read_bytes() == b"old" and _leftovers(tmp_path) == ["x.fits"]


def test_http_error_is_system_fault(server, tmp_path):
    _, base = server
    with pytest.raises(http.HTTPStatusError) as info:
        http.download(f"{base}/status500", tmp_path / "x")
    assert info.value.status == 500 and info.value.fault == 2 and fault_code(info.value) == 2
    assert "HTTP 500" in str(info.value) and "/status500" in str(info.value)
    with pytest.raises(http.HTTPStatusError) as info:
        http.download(f"{base}/missing", tmp_path / "x")
    assert info.value.status == 404
    # redirects are not followed (they could lead to another host)
    with pytest.raises(http.HTTPStatusError) as info:
        http.download(f"{base}/redirect", tmp_path / "x")
    assert info.value.status == 302
    assert _leftovers(tmp_path) == []


def test_connection_refused_is_system_fault(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    with pytest.raises(http.ConnectionFailed) as info:
        http.download(f"http://127.0.0.1:{port}/x", tmp_path / "x", timeout=2)
    assert info.value.fault == 2 and f"127.0.0.1:{port}" in str(info.value)


def test_timeout_waiting_for_answer(server, tmp_path):
    _, base = server
    t0 = time.monotonic()
    with pytest.raises(http.DownloadTimeout) as info:
        http.download(f"{base}/slow", tmp_path / "x", timeout=0.3)
    assert time.monotonic() - t0 < 1.4
    assert info.value.fault == 6 and fault_code(info.value) == 6
    assert _leftovers(tmp_path) == []


def test_deadline_catches_trickling_server(server, tmp_path):
    _, base = server
    with pytest.raises(http.DownloadTimeout) as info:
        http.download(f"{base}/trickle", tmp_path / "x", timeout=5, deadline_s=0.35,
                      chunk_bytes=65536)
    assert "within 0.35 s" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_truncated_body_is_data_fault(server, tmp_path):
    _, base = server
    with pytest.raises(http.TruncatedBody) as info:
        http.download(f"{base}/short", tmp_path / "x", size=len(PAYLOAD))
    assert info.value.fault == 5 and "1000 of" in str(info.value)
    # also without a listed size: the announced Content-Length is checked
    with pytest.raises(http.TruncatedBody):
        http.download(f"{base}/short", tmp_path / "x")
    assert _leftovers(tmp_path) == []


def test_oversize_refused_from_announced_length(server, tmp_path):
    _, base = server
    with pytest.raises(http.OversizeBody) as info:
        http.download(f"{base}/ok", tmp_path / "x", size=len(PAYLOAD) - 1)
    assert info.value.fault == 5 and "announces" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_oversize_refused_while_streaming_without_reading_it_all(server, tmp_path):
    srv, base = server
    srv.sent.clear()
    limit = 100_000
    with pytest.raises(http.OversizeBody):
        http.download(f"{base}/nolength-huge", tmp_path / "x", size=limit, chunk_bytes=65536)
    assert _leftovers(tmp_path) == []
    # the client stopped after limit + 1 bytes; the server could not push the whole 131 MB
    time.sleep(0.2)
    assert sum(srv.sent) < 2000 * 65536 // 2


def test_fetch_limits_document_size(server):
    _, base = server
    assert http.fetch(f"{base}/ok") == PAYLOAD
    with pytest.raises(http.OversizeBody):
        http.fetch(f"{base}/ok", max_bytes=1000)


def test_bad_arguments_named(tmp_path):
    with pytest.raises(ValueError, match="listed md5"):
        http.download("http://127.0.0.1:1/x", tmp_path / "x", md5="xyz")
    with pytest.raises(ValueError, match="listed size"):
        http.download("http://127.0.0.1:1/x", tmp_path / "x", size=-1)
    with pytest.raises(http.UnsafeInput):
        http.download("file:///etc/passwd", tmp_path / "x")


# ------------------------------------------------------------------------------ untrusted names

@pytest.mark.parametrize("name", ["o5432g0123o", "o5432g0123o.XY01.fits", "XY01", "a-b_c+d.e"])
def test_safe_component_accepts_plain_names(name):
    assert http.safe_component(name) == name


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/../../b", "/etc/passwd", "a/b",
                                  "..\\x", ".hidden", "-rf", "a b", "a\x00b", "a\nb", "é.fits",
                                  "x" * 129, "a..b", "C:evil"])
def test_safe_component_refuses_hostile_names(name):
    with pytest.raises(http.UnsafeInput) as info:
        http.safe_component(name, what="file name", source="http://ds/idx")
    assert info.value.fault == 5 and "http://ds/idx" in str(info.value)


def test_safe_join_stays_inside_root(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    assert http.safe_join(root, "o1", "o1.XY01.fits") == root / "o1" / "o1.XY01.fits"
    with pytest.raises(http.UnsafeInput):
        http.safe_join(root, "..", "etc")
    # a symbolic link inside the tree that points outside is refused too
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "o2")
    with pytest.raises(http.UnsafeInput, match="outside"):
        http.safe_join(root, "o2", "o2.XY01.fits")


def test_check_url_hosts():
    base = "http://127.0.0.1:8080/index.txt"
    assert http.check_url("http://127.0.0.1:8080/o1/o1.XY01.fits", base=base).endswith("XY01.fits")
    assert http.check_url("/o1/x.fits", base=base) == "http://127.0.0.1:8080/o1/x.fits"
    for bad in ("http://evil.example/x", "http://127.0.0.1:9999/x", "file:///etc/passwd",
                "ftp://127.0.0.1:8080/x", "http://user:pw@127.0.0.1:8080/x", "http://127.0.0.1:8080/a b"):
        with pytest.raises(http.UnsafeInput):
            http.check_url(bad, base=base)
    assert http.check_url("http://mirror.example:81/x", base=base,
                          allowed_hosts=["mirror.example:81"]) == "http://mirror.example:81/x"
    assert http.check_url("http://mirror.example/x", base=base, allowed_hosts=["MIRROR.example"])
    with pytest.raises(http.UnsafeInput):
        http.check_url("http://mirror.example:82/x", base=base, allowed_hosts=["mirror.example:81"])


# ------------------------------------------------------------------------------ listings and time

def test_listing_round_trip_and_errors():
    rows = [{"exp_name": "o1", "dateobs": "2010-01-01T00:00:00.000", "mjd_obs": 55197.0,
             "filter": "r", "ra": 1.5, "dec": -2.25, "posangle": float("nan"), "exptime": 45.0,
             "airmass": 1.2, "camera": "my cam", "nchips": 4, "uri": "/o1/index.txt"}]
    text = http.format_exposure_listing(rows)
    (row,) = http.parse_exposure_listing(text, url="http://h:1/index.txt")
    assert row.camera == "my cam" and row.uri == "http://h:1/o1/index.txt"
    assert row.ra == 1.5 and row.dec == -2.25 and row.nchips == 4
    assert row.posangle != row.posangle  # missing -> NaN
    with pytest.raises(http.ListingError, match="not a datastore listing"):
        http.parse_exposure_listing("<html>oops</html>", url="u")
    with pytest.raises(http.ListingError, match="line 3"):
        http.parse_exposure_listing(text.replace(" 4 ", " "), url="u")
    chips = http.format_chip_listing([{"chip": "XY01", "bytes": 10, "md5": "a" * 32,
                                       "file": "o1.XY01.fits", "uri": "/o1/o1.XY01.fits"}])
    (c,) = http.parse_chip_listing(chips, url="http://h:1/o1/index.txt")
    assert (c.chip, c.bytes, c.md5, c.uri) == ("XY01", 10, "a" * 32, "http://h:1/o1/o1.XY01.fits")
    with pytest.raises(http.ListingError, match="not an md5"):
        http.parse_chip_listing(chips.replace("a" * 32, "zz"), url="u")
    with pytest.raises(http.ListingError, match="negative size"):
        http.parse_chip_listing(chips.replace(" 10 ", " -5 "), url="u")


def test_time_conversions():
    assert http.mjd_to_iso(51544.5) == "2000-01-01T12:00:00.000"
    assert http.iso_to_mjd("2000-01-01T12:00:00") == 51544.5
    assert http.iso_to_mjd("2000-01-01T13:00:00+01:00") == 51544.5
    assert http.parse_time("55000.25") == 55000.25
    assert abs(http.iso_to_mjd(http.mjd_to_iso(55123.456789)) - 55123.456789) < 1e-8
    with pytest.raises(ValueError, match="neither an MJD"):
        http.parse_time("yesterday")
