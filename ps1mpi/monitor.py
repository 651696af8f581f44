"""The process monitor: a static HTML page of a campaign, made from its ledger.

The page shows progress per stage, faults and bad-quality items with their reasons, timings,
a sky map of coverage (HEALPix, via healpy), the focal-plane JPEGs of the most recent
exposures and stack previews per skycell. It only reads the ledger (safe while a job runs).
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

import healpy as hp
import numpy as np

from .infra.ledger import Ledger
from .infra.schema import TABLE_NAMES, TABLES, State

__all__ = ["write_report", "coverage_map"]

STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee} td.l,th.l{text-align:left}
.bar{background:#ddd;width:12em;height:.8em;display:inline-block}
.bar span{background:#3a7;height:100%;display:block}
.fault{color:#b00} .imgs img{max-width:320px;margin:.3em;border:1px solid #999}
"""


def coverage_map(ra: np.ndarray, dec: np.ndarray, *, size: int = 360, nside: int = 256
                 ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Counts of items per HEALPix pixel, rendered on a RA/Dec grid around the items.

    Returns an (size, size) uint8 image (brighter = more items) and its (ra_min, ra_max,
    dec_min, dec_max) extent in degrees.
    """
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    ok = np.isfinite(ra) & np.isfinite(dec)
    counts = np.zeros(hp.nside2npix(nside))
    if ok.any():
        np.add.at(counts, hp.ang2pix(nside, ra[ok], dec[ok], lonlat=True), 1)
        pad = 2.0 * hp.nside2resol(nside, arcmin=True) / 60.0 + 0.1
        dmin, dmax = dec[ok].min() - pad, dec[ok].max() + pad
        cosd = max(np.cos(np.radians(np.clip(dec[ok].mean(), -89, 89))), 0.05)
        rmid = np.degrees(np.angle(np.mean(np.exp(1j * np.radians(ra[ok])))))
        half = max(np.max(np.abs((ra[ok] - rmid + 180) % 360 - 180)) + pad / cosd,
                   (dmax - dmin) / 2 / cosd)
        rmin, rmax = rmid - half, rmid + half
    else:
        rmin, rmax, dmin, dmax = 0.0, 360.0, -90.0, 90.0
    gra, gdec = np.meshgrid(np.linspace(rmax, rmin, size), np.linspace(dmax, dmin, size))
    img = counts[hp.ang2pix(nside, gra % 360.0, np.clip(gdec, -90, 90), lonlat=True)]
    scale = img.max() or 1.0
    return (255 * np.sqrt(img / scale)).astype(np.uint8), (rmin % 360, rmax % 360, dmin, dmax)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _progress_rows(ledger: Ledger) -> list[str]:
    rows = []
    for name in TABLE_NAMES:
        if not ledger.nrows(name):
            continue
        c = ledger.counts(name)
        frac = (c["done"] + c["drop"]) / max(c["total"], 1)
        rows.append(
            f"<tr><td class=l>{name}</td><td class=l>{TABLES[name].stage}</td><td>{c['total']}</td>"
            f"<td>{c['done']}</td><td>{c['new']}</td><td>{c['run']}</td><td>{c['drop']}</td>"
            f"<td class={'fault' if c['faulted'] else ''}>{c['faulted']}</td><td>{c['bad_quality']}</td>"
            f"<td class=l><div class=bar><span style='width:{100 * frac:.0f}%'></span></div> "
            f"{100 * frac:.0f}%</td></tr>")
    return rows


def _reason_rows(ledger: Ledger, *, faults: bool) -> list[str]:
    rows = []
    for name in TABLE_NAMES:
        if not ledger.nrows(name):
            continue
        col = ledger.column(name, "fault" if faults else "quality")
        sel = col != 0
        if not faults:
            sel &= ledger.column(name, "state") == State.DONE
        idx = np.flatnonzero(sel)
        if not idx.size:
            continue
        texts = ledger.message_text(ledger.column(name, "message", idx))
        for r, code, text in list(zip(idx, col[idx], texts))[:50]:
            rows.append(f"<tr><td class=l>{name}</td><td>{r}</td><td>{code}</td>"
                        f"<td class=l>{html.escape(text or '-')}</td></tr>")
    return rows


def _timing_rows(ledger: Ledger) -> list[str]:
    rows = []
    for name in TABLE_NAMES:
        t = TABLES[name]
        if t.kind != "element" or not ledger.nrows(name):
            continue
        dur = ledger.column(name, "duration").astype(float)
        done = (ledger.column(name, "state") == State.DONE) & np.isfinite(dur)
        if done.any():
            d = dur[done]
            rows.append(f"<tr><td class=l>{t.stage}</td><td>{done.sum()}</td><td>{d.sum():.1f}</td>"
                        f"<td>{np.median(d):.2f}</td><td>{d.max():.2f}</td></tr>")
    return rows


def _images(root: Path, out: Path, pattern_dirs: list[tuple[str, str]], limit: int) -> list[str]:
    found = []
    for sub, pattern in pattern_dirs:
        base = root / sub
        if base.is_dir():
            found += sorted(base.rglob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    tags = []
    for path in found[:limit]:
        rel = os.path.relpath(path, out)
        tags.append(f"<figure style='display:inline-block'><img src='{html.escape(rel)}' "
                    f"alt='{html.escape(path.name)}'><figcaption>{html.escape(path.stem)}"
                    f"</figcaption></figure>")
    return tags


def write_report(ledger_path: str | Path, out_dir: str | Path, *, root: str | Path | None = None
                 ) -> Path:
    """Write ``out_dir/index.html`` (and its sky map) for the campaign of ``ledger_path``."""
    ledger_path = Path(ledger_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root else ledger_path.parent
    with Ledger.open(ledger_path) as led:
        campaign = led.campaign
        progress = _progress_rows(led)
        faults = _reason_rows(led, faults=True)
        quality = _reason_rows(led, faults=False)
        timings = _timing_rows(led)
        table = "rawExp" if led.nrows("rawExp") else "summitExp"
        ra = led.column(table, "ra") if led.nrows(table) else np.empty(0)
        dec = led.column(table, "dec") if led.nrows(table) else np.empty(0)
        n_exposures = int(ra.size)
    sky, extent = coverage_map(ra, dec)
    _write_png(out / "coverage.png", sky)
    focal = _images(root, out, [("camera", "*.jpg")], 12)
    stacks = _images(root, out, [("stack", "*.png"), ("stack", "*.jpg")], 24)
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ps1mpi monitor: {html.escape(str(campaign.get('name', ledger_path.stem)))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>ps1mpi campaign {html.escape(str(campaign.get('name', '')))}</h1>",
        f"<p>Ledger <code>{html.escape(str(ledger_path))}</code>, page written {now}.</p>",
        "<h2 id=progress>Progress per stage</h2><table><tr><th class=l>table</th><th class=l>stage</th>"
        "<th>total</th><th>done</th><th>new</th><th>run</th><th>drop</th><th>faulted</th>"
        "<th>bad quality</th><th class=l>complete</th></tr>", *progress, "</table>",
        "<h2 id=faults>Faults</h2>",
        ("<table><tr><th class=l>table</th><th>row</th><th>fault</th><th class=l>reason</th></tr>"
         + "".join(faults) + "</table>") if faults else "<p>None.</p>",
        "<h2 id=quality>Bad-quality items</h2>",
        ("<table><tr><th class=l>table</th><th>row</th><th>quality</th><th class=l>reason</th></tr>"
         + "".join(quality) + "</table>") if quality else "<p>None.</p>",
        "<h2 id=timings>Timings</h2><table><tr><th class=l>stage</th><th>units</th><th>total s</th>"
        "<th>median s</th><th>max s</th></tr>", *timings, "</table>",
        f"<h2 id=sky>Sky coverage</h2><p>{n_exposures} exposures; RA {extent[0]:.2f}..{extent[1]:.2f} deg, "
        f"Dec {extent[2]:.2f}..{extent[3]:.2f} deg (HEALPix nside 256).</p>"
        "<img id=skymap src='coverage.png' alt='sky coverage'>",
        "<h2 id=focalplane>Focal planes of recent exposures</h2><div class=imgs>",
        *(focal or ["<p>None yet.</p>"]), "</div>",
        "<h2 id=stacks>Stack previews</h2><div class=imgs>", *(stacks or ["<p>None yet.</p>"]), "</div>",
        f"<script type='application/json' id=campaign>{html.escape(json.dumps(campaign))}</script>",
        "</body></html>",
    ]
    page = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, page)
    return page
