"""Inspect and repair a campaign's processing ledger.

Subcommands:
  create LEDGER [--campaign FILE]    make a new, empty ledger
  status LEDGER                      per table: counts by state, faults, bad quality, rate
  show LEDGER TABLE KEY              one item's row and its whole history (KEY: row or name)
  faults LEDGER [--table T]          faulted elements with their reasons
  revert LEDGER --table T [--quality] [--rows ...]
                                     clear faults (or bad quality) so the items are redone
  export LEDGER TABLE --out FILE     a table to CSV (.csv) or FITS (.fits) for pandas/astropy

Reading commands work while a job writes the ledger; create and revert need the write lock.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from ..infra.ledger import Ledger, LedgerError
from ..infra.schema import TABLE_NAMES, TABLES, State

DESCRIPTION = __doc__


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ps1mpi ledger", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="make a new ledger")
    c.add_argument("ledger", type=Path)
    c.add_argument("--campaign", type=Path, help="campaign definition (TOML)")
    s = sub.add_parser("status", help="counts by state per table")
    s.add_argument("ledger", type=Path)
    s.add_argument("--json", action="store_true", help="print JSON")
    sh = sub.add_parser("show", help="one item's row and history")
    sh.add_argument("ledger", type=Path)
    sh.add_argument("table", choices=TABLE_NAMES)
    sh.add_argument("key", help="row number, or a name (exp_name, skycell, or exp_name.chip)")
    f = sub.add_parser("faults", help="faulted elements and reasons")
    f.add_argument("ledger", type=Path)
    f.add_argument("--table", choices=TABLE_NAMES)
    r = sub.add_parser("revert", help="clear faults so items are retried")
    r.add_argument("ledger", type=Path)
    r.add_argument("--table", choices=TABLE_NAMES, required=True)
    r.add_argument("--quality", action="store_true", help="redo bad-quality elements instead")
    r.add_argument("--rows", type=int, nargs="*", help="only these rows")
    e = sub.add_parser("export", help="a table to CSV or FITS")
    e.add_argument("ledger", type=Path)
    e.add_argument("table", choices=TABLE_NAMES)
    e.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def status(ledger: Ledger) -> dict[str, dict]:
    """Counts by state for every non-empty table, with the completion rate of the last hour."""
    out = {}
    events = ledger.events()
    now = time.time()
    for name in TABLE_NAMES:
        if ledger.nrows(name) == 0:
            continue
        counts = ledger.counts(name)
        mine = events[(events["table"] == TABLE_NAMES.index(name))
                      & (events["state"] == State.DONE) & (events["time"] > now - 3600)]
        counts["done_per_min_last_hour"] = round(len(mine) / 60.0, 2)
        out[name] = counts
    return out


def _row_for(ledger: Ledger, table: str, key: str) -> int:
    if key.isdigit():
        return int(key)
    cols = TABLES[table].column_names
    for col in ("exp_name", "skycell"):
        if col in cols:
            if "chip" in cols and "." in key and col == "exp_name":
                exp, chip = key.rsplit(".", 1)
                rows = np.intersect1d(ledger.find(table, "exp_name", exp),
                                      ledger.find(table, "chip", chip))
            else:
                rows = ledger.find(table, col, key)
            if rows.size:
                return int(rows[-1])
    raise LedgerError(f"{ledger.path}: no row of {table} named {key!r}")


def _fmt_time(t: float) -> str:
    return "-" if not np.isfinite(t) else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "create":
            campaign = {}
            if args.campaign:
                with open(args.campaign, "rb") as fh:
                    campaign = tomllib.load(fh)
            Ledger.create(args.ledger, campaign=campaign).close()
            print(f"created {args.ledger}")
            return 0
        if args.action == "revert":
            with Ledger.open(args.ledger, "a") as led:
                rows = led.revert(args.table, args.rows, what="quality" if args.quality else "faults")
            print(f"reverted {rows.size} rows of {args.table}")
            return 0
        with Ledger.open(args.ledger) as led:
            if args.action == "status":
                st = status(led)
                if args.json:
                    print(json.dumps(st, indent=1))
                else:
                    print(f"{'table':<22}{'total':>9}{'new':>9}{'run':>7}{'done':>9}{'drop':>7}"
                          f"{'faulted':>9}{'badqual':>9}{'done/min':>10}")
                    for name, c in st.items():
                        print(f"{name:<22}{c['total']:>9}{c['new']:>9}{c['run']:>7}{c['done']:>9}"
                              f"{c['drop']:>7}{c['faulted']:>9}{c['bad_quality']:>9}"
                              f"{c['done_per_min_last_hour']:>10}")
                return 0
            if args.action == "show":
                row = _row_for(led, args.table, args.key)
                if row >= led.nrows(args.table):
                    raise LedgerError(f"{args.ledger}: {args.table} has no row {row}")
                data = led.read(args.table, [row])
                hosts = led.host_names()
                print(f"{args.table}[{row}]")
                for col, val in data.items():
                    v = val[0]
                    if col == "state":
                        v = f"{State(v).name.lower()}"
                    elif col == "message":
                        v = led.message_text(v)[0] or "-"
                    elif col == "host":
                        v = hosts[v] if v < len(hosts) else "-"
                    elif isinstance(v, bytes):
                        v = v.decode()
                    print(f"  {col:<16} {v}")
                print("history:")
                for ev in led.events(table=args.table, rows=[row]):
                    msg = led.message_text(ev["message"])[0]
                    host = hosts[ev["host"]] if ev["host"] < len(hosts) else "-"
                    print(f"  {_fmt_time(ev['time'])} {State(ev['state']).name.lower():<5} "
                          f"fault={ev['fault']} quality={ev['quality']} rank={ev['rank']} "
                          f"host={host} duration={ev['duration']:.2f}s {msg}")
                return 0
            if args.action == "faults":
                tables = [args.table] if args.table else [t for t in TABLE_NAMES if led.nrows(t)]
                n = 0
                for t in tables:
                    fault = led.column(t, "fault")
                    rows = np.flatnonzero(fault)
                    for r, m in zip(rows, led.message_text(led.column(t, "message", rows))):
                        print(f"{t}[{r}] fault={fault[r]} nfault={led.column(t, 'nfault', [r])[0]} {m}")
                        n += 1
                print(f"{n} faulted")
                return 0
            if args.action == "export":
                export(led, args.table, args.out)
                print(f"wrote {args.out}")
                return 0
    except (LedgerError, OSError, tomllib.TOMLDecodeError) as err:
        print(f"ps1mpi ledger {args.action}: {err}", file=sys.stderr)
        return 2
    return 2


def export(ledger: Ledger, table: str, out: Path) -> None:
    """Write a table with its messages decoded, as CSV or FITS (by the file's suffix)."""
    from astropy.table import Table

    data = ledger.read(table)
    data["message"] = np.array(ledger.message_text(data["message"]))
    hosts = np.array(ledger.host_names() or ["-"])
    data["host"] = hosts[np.clip(data["host"], 0, hosts.size - 1)]
    data["state"] = np.array([State(s).name.lower() for s in data["state"]])
    t = Table({k: (np.char.decode(v) if v.dtype.kind == "S" else v) for k, v in data.items()})
    fmt = {".csv": "ascii.csv", ".fits": "fits"}.get(out.suffix.lower())
    if fmt is None:
        raise LedgerError(f"{out}: export writes .csv or .fits files")
    t.write(out, format=fmt, overwrite=True)
