"""The processing ledger: one HDF5 file per campaign that records what was done, and decides
what is done next.

Layout of the file (schema in :mod:`ps1mpi.infra.schema`)::

    /schema_version          int scalar
    /campaign                JSON text of the campaign definition
    /tables/<table>/<column> one resizable, chunked dataset per column
    /events                  every state change (time, table, row, state, fault, quality,
                             rank, host, duration, message)
    /messages                text of fault and quality reasons, referenced by index
    /hosts                   host names, referenced by index

Rules this module enforces:

- One writer. ``Ledger.open(path, "a")`` takes an exclusive lock (``flock`` on
  ``<path>.lock``); a second writer gets :class:`LedgerBusy` naming the holder. The kernel
  drops the lock when the process dies, so a crashed job never blocks its restart.
- Crash safety. The writer runs in HDF5 SWMR mode and flushes after every batch, so the file
  is consistent at every instant a reader (or a restart after SIGKILL) may look at it. On
  reopening for writing the superblock's "open for write" flag left by a dead writer is cleared
  (what ``h5clear -s`` does) and elements left in state RUN by the dead job are reverted to NEW.
- Readers (``Ledger.open(path)``) may open the file at any time, also while a job writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .schema import (EVENT_DTYPE, HOST_DTYPE, MESSAGE_DTYPE, SCHEMA_VERSION, TABLE_NAMES, TABLES,
                     Fault, State, Table)

__all__ = ["Ledger", "LedgerError", "LedgerBusy", "LedgerVersionError", "State", "Fault"]

CHUNK_ROWS = 1 << 12  # small chunks: cheap read-modify-write of a few rows; queries stay fast
EVENT_CHUNK = 1 << 14


class LedgerError(RuntimeError):
    """A ledger cannot be used as asked; the message names the file and the problem."""


class LedgerBusy(LedgerError):
    """Another process holds the ledger open for writing."""


class LedgerVersionError(LedgerError):
    """The ledger was written with another schema version."""


# --------------------------------------------------------------------------------------------
# Clearing the superblock's consistency flags after a crash (what `h5clear -s` does).

def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: the checksum HDF5 puts on its metadata."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    words = bytes(data)
    i = 0
    while length > 12:
        wa, wb, wc = struct.unpack_from("<III", words, i)
        a = (a + wa) & m
        b = (b + wb) & m
        c = (c + wc) & m
        a = (a - c) & m; a ^= _rot(c, 4); c = (c + b) & m
        b = (b - a) & m; b ^= _rot(a, 6); a = (a + c) & m
        c = (c - b) & m; c ^= _rot(b, 8); b = (b + a) & m
        a = (a - c) & m; a ^= _rot(c, 16); c = (c + b) & m
        b = (b - a) & m; b ^= _rot(a, 19); a = (a + c) & m
        c = (c - b) & m; c ^= _rot(b, 4); b = (b + a) & m
        length -= 12
        i += 12
    if length == 0:
        return c
    wa, wb, wc = struct.unpack_from("<III", words[i:i + 12] + bytes(12))
    a = (a + wa) & m
    b = (b + wb) & m
    c = (c + wc) & m
    c ^= b; c = (c - _rot(b, 14)) & m
    a ^= c; a = (a - _rot(c, 11)) & m
    b ^= a; b = (b - _rot(a, 25)) & m
    c ^= b; c = (c - _rot(b, 16)) & m
    a ^= c; a = (a - _rot(c, 4)) & m
    b ^= a; b = (b - _rot(a, 14)) & m
    c ^= b; c = (c - _rot(b, 24)) & m
    return c


def clear_open_flags(path: str | os.PathLike) -> bool:
    """Clear the "file is open for writing" flags a killed HDF5 writer leaves in the superblock.

    Returns True when flags were set and have been cleared. Only superblock versions 2 and 3
    (``libver="latest"``, which the ledger always uses) carry these flags.
    """
    with open(path, "r+b") as fh:
        head = bytearray(fh.read(64))
        if head[:8] != b"\x89HDF\r\n\x1a\n":
            raise LedgerError(f"{path}: not an HDF5 file (bad signature)")
        if head[8] not in (2, 3):
            return False
        size_of_offsets = head[9]
        n = 12 + 4 * size_of_offsets
        stored = struct.unpack_from("<I", head, n)[0]
        if _lookup3(bytes(head[:n])) != stored:
            raise LedgerError(f"{path}: superblock checksum mismatch; the file is damaged")
        if head[11] == 0:
            return False
        head[11] = 0
        struct.pack_into("<I", head, n, _lookup3(bytes(head[:n])))
        fh.seek(0)
        fh.write(head[:n + 4])
        fh.flush()
        os.fsync(fh.fileno())
    return True


# --------------------------------------------------------------------------------------------

def _as_rows(rows: Iterable[int] | np.ndarray | int) -> np.ndarray:
    return np.atleast_1d(np.asarray(rows, dtype=np.int64))


def _clusters(sorted_rows: np.ndarray, gap: int = 4096) -> list[tuple[int, int]]:
    """Index ranges [i, j) of ``sorted_rows`` whose consecutive gaps are below ``gap``."""
    if sorted_rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) > gap) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [sorted_rows.size]])
    return list(zip(starts.tolist(), ends.tolist()))


def _encode(values, dtype: np.dtype) -> np.ndarray:
    arr = np.asarray(values)
    if dtype.kind == "S" and arr.dtype.kind == "U":
        arr = np.char.encode(arr, "utf-8")
    return arr.astype(dtype, copy=False)


class Ledger:
    """A campaign's processing ledger (see the module docstring for the rules).

    Use :meth:`create` for a new ledger and :meth:`open` for an existing one; both work as
    context managers. Only the writer (mode ``"a"``) may call the methods that change rows.
    """

    def __init__(self, path: Path, h5: h5py.File, writable: bool, lock_fd: int | None):
        self.path = path
        self._h5 = h5
        self.writable = writable
        self._lock_fd = lock_fd
        self._hosts: dict[str, int] = {}
        if writable:
            names = self._h5["hosts"][...]
            self._hosts = {n.decode(): i for i, n in enumerate(names)}
        self._pending_flush = False

    # ---------------------------------------------------------------- opening and closing
    @classmethod
    def create(cls, path: str | os.PathLike, *, campaign: dict | None = None,
               exist_ok: bool = False) -> "Ledger":
        """Create a new ledger with every table of the schema and open it for writing."""
        path = Path(path)
        if path.exists():
            if exist_ok:
                return cls.open(path, "a")
            raise LedgerError(f"{path}: a ledger already exists here")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._lock(path)
        tmp = path.with_name(path.name + ".creating")
        try:
            with h5py.File(tmp, "w", libver="latest", locking=False) as f:
                f.create_dataset("schema_version", data=SCHEMA_VERSION)
                f.create_dataset("campaign", data=json.dumps(campaign or {}, sort_keys=True))
                f.create_dataset("created", data=time.time())
                tables = f.create_group("tables")
                for table in TABLES.values():
                    g = tables.create_group(table.name)
                    for col in table.columns:
                        g.create_dataset(col.name, shape=(0,), maxshape=(None,), dtype=col.dtype,
                                         chunks=(CHUNK_ROWS,), compression="lzf", shuffle=True)
                f.create_dataset("events", shape=(0,), maxshape=(None,), dtype=EVENT_DTYPE,
                                 chunks=(EVENT_CHUNK,), compression="lzf")
                f.create_dataset("messages", shape=(0,), maxshape=(None,), dtype=MESSAGE_DTYPE,
                                 chunks=(4096,), compression="lzf")
                f.create_dataset("hosts", shape=(0,), maxshape=(None,), dtype=HOST_DTYPE,
                                 chunks=(256,))
            os.replace(tmp, path)
        except BaseException:
            os.close(lock_fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls._open_writer(path, lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "Ledger":
        """Open a ledger: ``"r"`` to read (any time, any process), ``"a"`` to write (one job)."""
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"{path}: no ledger here (create one with `ps1mpi ledger create`)")
        if mode == "r":
            try:
                h5 = h5py.File(path, "r", libver="latest", swmr=True, locking=False)
            except OSError as err:
                raise LedgerError(f"{path}: cannot open the ledger: {err}") from err
            ledger = cls(path, h5, False, None)
            ledger._check_version()
            return ledger
        if mode != "a":
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        return cls._open_writer(path, cls._lock(path))

    @classmethod
    def _lock(cls, path: Path) -> int:
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LedgerBusy(f"{path}: the ledger is open for writing by another job ({holder}); "
                             "only one job may write a ledger at a time") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        return fd

    @classmethod
    def _open_writer(cls, path: Path, lock_fd: int) -> "Ledger":
        try:
            clear_open_flags(path)  # safe: we hold the lock, so any previous writer is dead
            h5 = h5py.File(path, "a", libver="latest", locking=False)
        except (OSError, LedgerError) as err:
            os.close(lock_fd)
            raise LedgerError(f"{path}: cannot open the ledger for writing: {err}") from err
        ledger = cls(path, h5, True, lock_fd)
        try:
            ledger._check_version()
            ledger._revert_stale_runs()
            h5.swmr_mode = True
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _check_version(self) -> None:
        version = int(self._h5["schema_version"][()])
        if version != SCHEMA_VERSION:
            raise LedgerVersionError(
                f"{self.path}: ledger schema version {version}, this ps1mpi reads version "
                f"{SCHEMA_VERSION}; use the ps1mpi release that wrote it or start a new ledger")

    def _revert_stale_runs(self) -> None:
        """Elements left in RUN by a job that is gone go back to NEW (they are redone)."""
        for table in TABLES.values():
            if table.kind != "element":
                continue
            stale = np.flatnonzero(self.column(table.name, "state") == State.RUN)
            if stale.size:
                self.transition(table.name, stale, State.NEW,
                                message="reverted: the job that was running it is gone")
        self.flush()

    def close(self) -> None:
        if self._h5 is not None:
            if self.writable:
                self._h5.flush()
            self._h5.close()
            self._h5 = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Make everything written so far durable and visible to readers."""
        self._h5.flush()
        self._pending_flush = False

    def refresh(self) -> None:
        """Readers: see what the writer flushed since the file was opened."""
        if not self.writable:
            for table in TABLES.values():
                for col in table.columns:
                    self._h5["tables"][table.name][col.name].refresh()
            for name in ("events", "messages", "hosts"):
                self._h5[name].refresh()

    # ---------------------------------------------------------------- reading
    @property
    def campaign(self) -> dict:
        raw = self._h5["campaign"][()]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def table(self, name: str) -> Table:
        try:
            return TABLES[name]
        except KeyError:
            raise LedgerError(f"{self.path}: no table {name!r}; tables are "
                              f"{', '.join(TABLE_NAMES)}") from None

    def _ds(self, table: str, column: str) -> h5py.Dataset:
        self.table(table).column(column)
        return self._h5["tables"][table][column]

    def nrows(self, table: str) -> int:
        return int(self._h5["tables"][self.table(table).name]["state"].shape[0])

    def column(self, table: str, name: str, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """One column, whole or at ``rows`` (any order)."""
        ds = self._ds(table, name)
        if rows is None:
            return ds[...]
        rows = _as_rows(rows)
        if rows.size == 0:
            return np.empty(0, ds.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * rows.size + CHUNK_ROWS:
            return ds[lo:hi][rows - lo]
        order = np.argsort(rows, kind="stable")
        out = np.empty(rows.size, ds.dtype)
        srt = rows[order]
        for i, j in _clusters(srt, CHUNK_ROWS):
            a, b = int(srt[i]), int(srt[j - 1]) + 1
            out[order[i:j]] = ds[a:b][srt[i:j] - a]
        return out

    def read(self, table: str, rows=None, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Several columns as a dict of arrays (all columns by default)."""
        cols = columns or self.table(table).column_names
        return {c: self.column(table, c, rows) for c in cols}

    def find(self, table: str, column: str, value) -> np.ndarray:
        """Rows where ``column == value`` (strings compared as bytes)."""
        col = self.column(table, column)
        if col.dtype.kind == "S" and isinstance(value, str):
            value = value.encode()
        return np.flatnonzero(col == value)

    def pending(self, table: str, *, retry_cap: int = 0) -> np.ndarray:
        """Elements to process: NEW, and either never faulted or faulted fewer than ``retry_cap`` times."""
        state = self.column(table, "state")
        new = state == State.NEW
        if not new.any():
            return np.empty(0, np.int64)
        fault = self.column(table, "fault")
        ok = fault == 0
        if retry_cap > 0:
            ok |= self.column(table, "nfault") < retry_cap
        return np.flatnonzero(new & ok)

    def message_text(self, index: int | np.ndarray) -> list[str]:
        idx = _as_rows(index)
        msgs = self._h5["messages"]
        return ["" if i < 0 else msgs[int(i)].decode(errors="replace") for i in idx]

    def host_names(self) -> list[str]:
        return [h.decode() for h in self._h5["hosts"][...]]

    def events(self, *, table: str | None = None, rows=None) -> np.ndarray:
        """State changes, optionally of one table (and rows), in time order."""
        ev = self._h5["events"][...]
        if table is not None:
            ev = ev[ev["table"] == TABLE_NAMES.index(self.table(table).name)]
            if rows is not None:
                ev = ev[np.isin(ev["row"], _as_rows(rows))]
        return ev

    # ---------------------------------------------------------------- writing
    def _require_writer(self) -> None:
        if not self.writable:
            raise LedgerError(f"{self.path}: opened read-only")

    def host_index(self, host: str | None = None) -> int:
        host = host or socket.gethostname()
        if host not in self._hosts:
            ds = self._h5["hosts"]
            n = ds.shape[0]
            ds.resize((n + 1,))
            ds[n] = host.encode()[:64]
            self._hosts[host] = n
        return self._hosts[host]

    def _add_messages(self, messages: Sequence[str]) -> np.ndarray:
        out = np.full(len(messages), -1, np.int64)
        texts = [(i, m) for i, m in enumerate(messages) if m]
        if texts:
            ds = self._h5["messages"]
            n = ds.shape[0]
            ds.resize((n + len(texts),))
            ds[n:] = np.array([m.encode("utf-8", errors="replace")[:240] for _, m in texts],
                              dtype=MESSAGE_DTYPE)
            for k, (i, _) in enumerate(texts):
                out[i] = n + k
        return out

    def append(self, table: str, n: int | None = None, **columns) -> np.ndarray:
        """Append rows; columns not given take their fill value. Returns the new row numbers."""
        self._require_writer()
        spec = self.table(table)
        if n is None:
            if not columns:
                raise ValueError("append needs n or at least one column")
            n = max(np.size(v) for v in columns.values())
        unknown = set(columns) - set(spec.column_names)
        if unknown:
            raise LedgerError(f"{self.path}: table {table} has no columns {sorted(unknown)}")
        start = self.nrows(table)
        group = self._h5["tables"][table]
        for col in spec.columns:
            ds = group[col.name]
            ds.resize((start + n,))
            if col.name in columns:
                values = np.broadcast_to(_encode(columns[col.name], ds.dtype), (n,))
            else:
                values = np.full(n, col.fill, dtype=ds.dtype)
            ds[start:start + n] = values
        self._pending_flush = True
        return np.arange(start, start + n, dtype=np.int64)

    def update(self, table: str, rows, **columns) -> None:
        """Set columns at ``rows`` (scalar values broadcast). Rows may be in any order."""
        self._require_writer()
        rows = _as_rows(rows)
        if rows.size == 0:
            return
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        if srt[-1] >= self.nrows(table) or srt[0] < 0:
            raise LedgerError(f"{self.path}: {table} has no row {int(srt[-1])}")
        clusters = _clusters(srt)
        for name, values in columns.items():
            ds = self._ds(table, name)
            vals = np.broadcast_to(_encode(values, ds.dtype), rows.shape)[order]
            for i, j in clusters:
                a, b = int(srt[i]), int(srt[j - 1]) + 1
                if b - a == j - i:  # contiguous: no need to read first
                    block = np.array(vals[i:j])
                else:
                    block = ds[a:b]
                    block[srt[i:j] - a] = vals[i:j]
                ds[a:b] = block
        self._pending_flush = True

    def transition(self, table: str, rows, state: int | np.ndarray, *, fault=0, quality=0,
                   rank=-1, host: str | None = None, t_start=np.nan, t_end=None,
                   duration=np.nan, message: str | Sequence[str] = "", **columns) -> None:
        """Change the state of rows and record the change in the history.

        ``fault``, ``quality``, ``rank``, ``t_start``, ``duration``, ``message`` and extra
        ``columns`` (summary metadata) may be scalars or per-row arrays. A non-zero fault
        increments ``nfault`` (the retry counter) and sends the element back to NEW.
        """
        self._require_writer()
        rows = _as_rows(rows)
        if rows.size == 0:
            return
        n = rows.size
        now = time.time()
        t_end = now if t_end is None else t_end
        fault = np.broadcast_to(np.asarray(fault, np.uint8), (n,))
        quality = np.broadcast_to(np.asarray(quality, np.uint16), (n,))
        state = np.broadcast_to(np.asarray(state, np.uint8), (n,)).copy()
        state[fault != 0] = State.NEW
        messages = [message] * n if isinstance(message, str) else list(message)
        msg_idx = self._add_messages(messages)
        host_idx = self.host_index(host)
        updates = dict(columns)
        updates.update(state=state, fault=fault, quality=quality, rank=rank, host=host_idx)
        if np.any(msg_idx >= 0) or isinstance(message, str):
            updates["message"] = msg_idx
        if np.any(fault != 0):
            nfault = self.column(table, "nfault", rows).astype(np.int64)
            updates["nfault"] = np.minimum(nfault + (fault != 0), 255)
        started = np.asarray(state) == State.RUN
        if np.any(started):
            updates["t_start"] = np.where(started, now, self.column(table, "t_start", rows))
        if np.any(~np.isnan(np.atleast_1d(t_start))):
            updates["t_start"] = t_start
        if np.any(~started):
            updates["t_end"] = np.where(started, np.nan, t_end)
            updates["duration"] = np.where(started, np.nan, duration)
        self.update(table, rows, **updates)
        ev = np.empty(n, EVENT_DTYPE)
        ev["time"] = now
        ev["table"] = TABLE_NAMES.index(table)
        ev["row"] = rows
        ev["state"] = state
        ev["fault"] = fault
        ev["quality"] = quality
        ev["rank"] = rank
        ev["host"] = host_idx
        ev["duration"] = duration
        ev["message"] = msg_idx
        ds = self._h5["events"]
        m = ds.shape[0]
        ds.resize((m + n,))
        ds[m:] = ev

    def revert(self, table: str, rows=None, *, what: str = "faults") -> np.ndarray:
        """Clear faults so the elements are retried (the IPP's revert tools).

        ``what="faults"``: faulted elements (fault != 0) get fault 0 and a fresh retry count.
        ``what="quality"``: done elements with bad quality go back to NEW to be reprocessed.
        Returns the rows reverted.
        """
        self._require_writer()
        if what == "faults":
            sel = np.flatnonzero(self.column(table, "fault") != 0)
        elif what == "quality":
            sel = np.flatnonzero((self.column(table, "quality") != 0)
                                 & (self.column(table, "state") == State.DONE))
        else:
            raise ValueError(f"what must be 'faults' or 'quality', not {what!r}")
        if rows is not None:
            sel = np.intersect1d(sel, _as_rows(rows))
        if sel.size:
            self.update(table, sel, nfault=0)
            self.transition(table, sel, State.NEW, message=f"revert {what}")
            self.update(table, sel, fault=0, quality=0)
        self.flush()
        return sel

    # ---------------------------------------------------------------- summaries
    def counts(self, table: str) -> dict[str, int]:
        """Counts by state, plus faulted and bad-quality elements."""
        state = self.column(table, "state")
        out = {s.name.lower(): int(np.count_nonzero(state == s)) for s in State}
        out["faulted"] = int(np.count_nonzero(self.column(table, "fault")))
        out["bad_quality"] = int(np.count_nonzero(self.column(table, "quality")))
        out["total"] = int(state.size)
        return out
