"""The monitor page of a real (small) campaign, loaded in a real headless Chromium: the page
loads, its tables show the ledger's numbers, its images (sky map, focal plane, stack preview)
exist and decode in the browser, and the sky map lights exactly the registered pointings.

The campaign: three testcam exposures served by the local datastore, one chip of the third
failing on every request (so the page has a fault to show and that exposure is never
registered), run to `--until register` by `ps1mpi campaign` on one rank; then
`ps1mpi monitor` writes the page. Chromium (Debian's, run as root with --no-sandbox) loads it
from a loopback HTTP server; a harness page of the same origin frames it and reports what the
browser made of it. Skipped, with the reason, when Chromium is not installed.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ps1mpi.algorithms.jpeg import focal_plane_mosaic
from ps1mpi.geometry.camera import load_camera
from ps1mpi.infra.ledger import Ledger
from ps1mpi.infra.schema import TABLE_NAMES
from ps1mpi.sim.datastore import FaultSpec, start_datastore
from ps1mpi.stages.stack import preview_image
from tests.slurm_util import chromium, chromium_missing, repo_env, small_night, write_night

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))

NIGHT = small_night(3)
BROKEN = NIGHT[2]["name"]  # its chip XY01 always answers 500: the exposure never registers
WINDOW = (1280, 2400)

# Same-origin harness: frames the monitor page and, once it and its images have loaded, writes
# what the browser sees (tables as rendered text, each image's decode result) into #result.
HARNESS = """<!doctype html><html><head><meta charset='utf-8'><title>harness</title></head>
<body><pre id=result>pending</pre>
<iframe id=page src='/report/index.html' style='width:1200px;height:2000px'></iframe>
<script>
function tableAfter(doc, id) {
  const h = doc.getElementById(id);
  let el = h ? h.nextElementSibling : null;
  if (!el || el.tagName !== 'TABLE') return null;
  return Array.from(el.rows).map(r => Array.from(r.cells).map(c => c.textContent.trim()));
}
document.getElementById('page').addEventListener('load', async () => {
  const doc = document.getElementById('page').contentDocument;
  const images = await Promise.all(Array.from(doc.images).map(async im => {
    let decoded = true, error = '';
    try { await im.decode(); } catch (e) { decoded = false; error = String(e); }
    return {src: im.getAttribute('src'), id: im.id, complete: im.complete, decoded: decoded,
            error: error, width: im.naturalWidth, height: im.naturalHeight};
  }));
  const sky = doc.getElementById('sky');
  document.getElementById('result').textContent = JSON.stringify({
    title: doc.title, h1: doc.querySelector('h1').textContent,
    progress: tableAfter(doc, 'progress'), faults: tableAfter(doc, 'faults'),
    timings: tableAfter(doc, 'timings'),
    sky: sky && sky.nextElementSibling ? sky.nextElementSibling.textContent : null,
    images: images});
});
</script></body></html>"""


class _Handler(SimpleHTTPRequestHandler):
    """Serves the campaign directory, plus the harness at /__harness__.html."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] == "/__harness__.html":
            body = HARNESS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output quiet
        pass


def _plant_products(camp: Path, led: Ledger) -> dict[str, Path]:
    """A focal-plane JPEG and a stack preview where the camera and stack stages put them,
    made by their own picture functions (those stages are not part of this small campaign)."""
    cam = load_camera("testcam")
    exp = NIGHT[0]["name"]
    chips = [c.decode() for c in led.column("rawImfile", "chip")]
    exps = [e.decode() for e in led.column("rawImfile", "exp_name")]
    means = led.column("rawImfile", "mean")
    shape = (-(-cam.chip_ny // 16), -(-cam.chip_nx // 16))
    ramp = np.linspace(0.0, 50.0, shape[1])[None, :] * np.ones(shape)
    binned = {c: m + ramp for c, e, m in zip(chips, exps, means) if e == exp}
    jpg = camp / "camera" / exp / f"{exp}.jpg"
    jpg.parent.mkdir(parents=True)
    Image.fromarray(focal_plane_mosaic(binned, camera=cam, binning=16)).save(jpg, format="JPEG")
    yy, xx = np.mgrid[0:200, 0:200]
    star = 100.0 + 5000.0 * np.exp(-((xx - 90.0) ** 2 + (yy - 120.0) ** 2) / (2 * 3.0 ** 2))
    png = camp / "stack" / "skycell.1000.050" / "skycell.1000.050.r.deep.0.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(preview_image(star.astype(np.float32), np.zeros(star.shape, np.uint16),
                                  size=100), "L").save(png, format="PNG")
    return {"focal": jpg, "stack": png}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitor")
    store, camp = base / "datastore", base / "campaign"
    write_night(store, NIGHT)
    fault = FaultSpec(error_rate=1.0, match=f"/{BROKEN}/{BROKEN}.XY01.fits")
    with start_datastore(store, faults=fault) as ds:
        run = subprocess.run([sys.executable, "-m", "ps1mpi", "campaign", "--ledger",
                              str(camp / "ledger.h5"), "--datastore", ds.url, "--until",
                              "register", "--no-report"], capture_output=True, text=True,
                             env=repo_env(), timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # 1: finished, with faults
    with Ledger.open(camp / "ledger.h5") as led:
        products = _plant_products(camp, led)
    mon = subprocess.run([sys.executable, "-m", "ps1mpi", "monitor", "--ledger",
                          str(camp / "ledger.h5"), "--out", str(camp / "report")],
                         capture_output=True, text=True, env=repo_env(), timeout=120)
    assert mon.returncode == 0 and "wrote" in mon.stdout, mon.stdout + mon.stderr
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(camp)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        harness = chromium(["--virtual-time-budget=15000", "--dump-dom",
                            f"{url}/__harness__.html"], profile=base / "profile1")
        shot = base / "page.png"
        screen = chromium([f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}",
                           "--virtual-time-budget=5000", f"{url}/report/index.html"],
                          profile=base / "profile2")
    finally:
        server.shutdown()
        server.server_close()
    m = re.search(r"<pre id=\"result\">(.*?)</pre>", harness.stdout, re.S)
    assert m, f"no result in the dumped DOM:\n{harness.stdout[:2000]}\n{harness.stderr[-2000:]}"
    seen = json.loads(html.unescape(m.group(1)))
    assert screen.returncode == 0, screen.stderr[-2000:]
    return {"camp": camp, "seen": seen, "shot": shot, "products": products}


def _cells(rows: list[list[str]] | None) -> dict[str, list[str]]:
    assert rows, "table missing from the page"
    return {r[0]: r for r in rows[1:]}


def test_progress_table_shows_the_ledger_counts(campaign):
    seen = campaign["seen"]
    assert seen["title"].startswith("ps1mpi monitor")
    rows = _cells(seen["progress"])
    header = seen["progress"][0]
    assert header[:9] == ["table", "stage", "total", "done", "new", "run", "drop", "faulted",
                          "bad quality"], header
    with Ledger.open(campaign["camp"] / "ledger.h5") as led:
        expected = {t: led.counts(t) for t in TABLE_NAMES if led.nrows(t)}
    assert set(rows) == set(expected) == {"summitExp", "summitImfile", "rawExp", "rawImfile"}
    for table, c in expected.items():
        shown = [int(v) for v in rows[table][2:9]]
        assert shown == [c["total"], c["done"], c["new"], c["run"], c["drop"], c["faulted"],
                         c["bad_quality"]], (table, rows[table], c)
        frac = round(100 * (c["done"] + c["drop"]) / c["total"])
        assert rows[table][9] == f"{frac}%", rows[table]
    # the campaign's known outcome: 11 of 12 chips, 2 of 3 exposures registered
    assert expected["summitImfile"]["done"] == 11 and expected["summitImfile"]["faulted"] == 1
    assert expected["rawExp"]["done"] == expected["rawExp"]["total"] == 2


def test_faults_table_names_the_failed_chip_and_its_reason(campaign):
    rows = campaign["seen"]["faults"]
    assert rows and rows[0] == ["table", "row", "fault", "reason"], rows
    with Ledger.open(campaign["camp"] / "ledger.h5") as led:
        fault = led.column("summitImfile", "fault")
        bad = np.flatnonzero(fault)
        reason = led.message_text(led.column("summitImfile", "message", bad))[0]
        exp = led.column("summitImfile", "exp_name")[bad[0]].decode()
        chip = led.column("summitImfile", "chip")[bad[0]].decode()
    assert (exp, chip) == (BROKEN, "XY01")
    assert rows[1:] == [["summitImfile", str(bad[0]), str(fault[bad[0]]), reason]], rows
    assert "500" in reason, reason


def test_timings_count_the_done_units(campaign):
    rows = _cells(campaign["seen"]["timings"])
    with Ledger.open(campaign["camp"] / "ledger.h5") as led:
        assert int(rows["summitcopy"][1]) == led.counts("summitImfile")["done"]
        assert int(rows["register"][1]) == led.counts("rawImfile")["done"]
    assert float(rows["summitcopy"][2]) > 0.0


def test_every_image_exists_and_decodes_in_the_browser(campaign):
    images = campaign["seen"]["images"]
    by_src = {im["src"]: im for im in images}
    products = campaign["products"]
    expected = {"coverage.png": campaign["camp"] / "report" / "coverage.png",
                "../camera/o5000t0001o/o5000t0001o.jpg": products["focal"],
                "../stack/skycell.1000.050/skycell.1000.050.r.deep.0.png": products["stack"]}
    assert set(by_src) == set(expected), by_src
    for src, path in expected.items():
        im = by_src[src]
        assert im["complete"] and im["decoded"], im
        with Image.open(path) as pil:
            pil.load()  # decodes here too
            assert (im["width"], im["height"]) == pil.size, (im, pil.size)
    assert by_src["coverage.png"]["id"] == "skymap"
    assert (by_src["coverage.png"]["width"], by_src["coverage.png"]["height"]) == (360, 360)


def test_sky_map_lights_exactly_the_registered_pointings(campaign):
    text = campaign["seen"]["sky"]
    m = re.search(r"(\d+) exposures; RA ([\d.]+)\.\.([\d.]+) deg, Dec ([-\d.]+)\.\.([-\d.]+) deg",
                  text or "")
    assert m, text
    n, ra_min, ra_max, dec_min, dec_max = int(m[1]), *map(float, m.groups()[1:])
    with Ledger.open(campaign["camp"] / "ledger.h5") as led:
        ra, dec = led.column("rawExp", "ra"), led.column("rawExp", "dec")
    assert n == ra.size == 2
    sky = np.asarray(Image.open(campaign["camp"] / "report" / "coverage.png"))
    size = sky.shape[0]
    # RA increases to the left, Dec upwards; pixel centres span the extent's ends
    x = np.round((ra_max - ra) / (ra_max - ra_min) * (size - 1)).astype(int)
    y = np.round((dec_max - dec) / (dec_max - dec_min) * (size - 1)).astype(int)
    labels, nblobs = ndimage.label(sky > 0)
    assert nblobs == 2, nblobs  # the unregistered third pointing is not on the map
    found = set()
    for xi, yi in zip(x, y):
        # (the page rounds the extent to 0.01 deg, about 2 map pixels)
        window = (slice(yi - 2, yi + 3), slice(xi - 2, xi + 3))
        assert sky[window].max() == 255, (xi, yi)  # one exposure in each pixel: both the max
        found |= set(labels[window][sky[window] == 255].tolist())
    assert found == {1, 2}  # each pointing is its own spot


def test_screenshot_shows_the_rendered_page(campaign):
    with Image.open(campaign["shot"]) as shot:
        assert shot.size == WINDOW
        rgb = np.asarray(shot.convert("RGB")).astype(int)
    # the progress bars' green (#3a7) and the faulted count's red (#b00) are drawn
    green = np.all(np.abs(rgb - [0x33, 0xAA, 0x77]) <= 2, axis=2).sum()
    red = np.all(np.abs(rgb - [0xBB, 0x00, 0x00]) <= 40, axis=2).sum()
    assert green > 500 and red > 5, (green, red)
    white = np.all(rgb >= 250, axis=2).sum()
    assert white > 0.3 * rgb.shape[0] * rgb.shape[1]  # a page, not a blank or error screen
    # the sky map drawn at its size: a 360x360 black square holding the two bright pointings
    labels, n = ndimage.label(np.all(rgb <= 3, axis=2))
    assert n > 0
    areas = ndimage.sum(np.ones(labels.shape), labels, index=np.arange(1, n + 1))
    ys, xs = ndimage.find_objects(labels)[int(np.argmax(areas))]
    assert (ys.stop - ys.start, xs.stop - xs.start) == (360, 360), (ys, xs)
    inside = rgb[ys, xs].max(axis=2)
    spots, nspots = ndimage.label(inside >= 200)
    assert nspots == 2, nspots
