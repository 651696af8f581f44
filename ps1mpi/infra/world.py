"""The MPI world every stage runs in: one abstraction, the same for one rank or thousands.

A :class:`World` wraps an MPI communicator. With one rank (plain ``python`` or
``mpiexec -n 1``) it is simply a communicator of size one: there is no serial special case.

Collectives move numpy arrays through MPI buffer calls (``Bcast``, ``Gatherv``,
``Allreduce``), never pickles, and wait with a deadline: a waiting rank polls its request and
raises :class:`CollectiveTimeout` instead of blocking forever on a peer that died or raised.
Polling sleeps between tests so that waiting ranks do not steal the CPU from working ones
(important when ranks oversubscribe the cores).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

__all__ = ["World", "CollectiveTimeout", "wait_for"]

DEFAULT_TIMEOUT = 3600.0


class CollectiveTimeout(RuntimeError):
    """A collective or message did not complete within its deadline."""


def wait_for(request: MPI.Request, *, timeout: float = DEFAULT_TIMEOUT, what: str = "MPI request",
             status: MPI.Status | None = None) -> float:
    """Wait for ``request`` by polling with a growing sleep; raise after ``timeout`` seconds.

    Returns the seconds spent waiting.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    delay = 2e-5
    while True:
        done = request.Test(status) if status is not None else request.Test()
        if done:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            request.Cancel()
            raise CollectiveTimeout(f"{what} did not complete within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.01)


@dataclass
class World:
    """An MPI communicator with buffer-based, deadline-guarded collectives.

    ``wait_s`` accumulates the seconds this rank has spent blocked in this world's collectives
    (every call below goes through :meth:`wait`); a stage run reads it to report the time
    lost waiting for peers. A world made by :meth:`split` starts its own count at zero.
    """

    comm: MPI.Intracomm
    wait_s: float = field(default=0.0, compare=False)

    @classmethod
    def from_mpi(cls, comm: MPI.Intracomm | None = None) -> "World":
        """The job's world (a duplicate of ``MPI.COMM_WORLD`` unless a communicator is given)."""
        return cls((comm or MPI.COMM_WORLD).Dup())

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    @property
    def host(self) -> str:
        return socket.gethostname()

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def split(self, color: int, key: int | None = None) -> "World":
        """Sub-communicator of the ranks sharing ``color`` (collective over this world)."""
        return World(self.comm.Split(color, self.rank if key is None else key))

    def wait(self, request: MPI.Request, *, timeout: float = DEFAULT_TIMEOUT,
             what: str = "MPI request") -> None:
        """:func:`wait_for` ``request``, adding the time waited to :attr:`wait_s`."""
        t0 = time.monotonic()
        try:
            wait_for(request, timeout=timeout, what=what)
        finally:
            self.wait_s += time.monotonic() - t0

    def free(self) -> None:
        if self.comm != MPI.COMM_WORLD:
            self.comm.Free()

    # ------------------------------------------------------------------ collectives
    def barrier(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.wait(self.comm.Ibarrier(), timeout=timeout, what="barrier")

    def bcast_array(self, array: np.ndarray | None, *, root: int = 0,
                    timeout: float = DEFAULT_TIMEOUT) -> np.ndarray:
        """Broadcast an array of any shape/dtype from ``root`` (others pass None)."""
        meta = None
        if self.rank == root:
            array = np.ascontiguousarray(array)
            meta = (array.dtype.str, array.shape)
        meta = self.bcast_object(meta, root=root, timeout=timeout)
        if self.rank != root:
            array = np.empty(meta[1], dtype=np.dtype(meta[0]))
        self.wait(self.comm.Ibcast(_buffer(array), root=root), timeout=timeout, what="Bcast")
        return array

    def bcast_object(self, obj, *, root: int = 0, timeout: float = DEFAULT_TIMEOUT):
        """Broadcast a small Python object (metadata only; arrays go through bcast_array)."""
        payload = np.frombuffer(_pickle(obj), np.uint8) if self.rank == root else None
        n = np.array([payload.size if payload is not None else 0], np.int64)
        self.wait(self.comm.Ibcast(n, root=root), timeout=timeout, what="Bcast (size)")
        buf = payload.copy() if payload is not None else np.empty(int(n[0]), np.uint8)
        self.wait(self.comm.Ibcast(buf, root=root), timeout=timeout, what="Bcast (object)")
        return _unpickle(buf.tobytes())

    def gatherv(self, array: np.ndarray, *, root: int = 0,
                timeout: float = DEFAULT_TIMEOUT) -> np.ndarray | None:
        """Concatenate 1-D (or structured) arrays from every rank on ``root`` along axis 0.

        All ranks must pass arrays of the same dtype and trailing shape. Returns the
        concatenation on ``root`` and None elsewhere.
        """
        array = np.ascontiguousarray(array)
        counts = self.allgather_int(array.shape[0], timeout=timeout)
        item = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        recv = None
        out = None
        if self.rank == root:
            out = np.empty((int(counts.sum()),) + array.shape[1:], dtype=array.dtype)
            sizes = counts * item
            displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            recv = [out.view(np.uint8).reshape(-1), (sizes.tolist(), displs.tolist()), MPI.BYTE]
        send = [array.view(np.uint8).reshape(-1), MPI.BYTE]
        self.wait(self.comm.Igatherv(send, recv, root=root), timeout=timeout, what="Gatherv")
        return out

    def allgather_int(self, value: int, *, timeout: float = DEFAULT_TIMEOUT) -> np.ndarray:
        out = np.empty(self.size, np.int64)
        self.wait(self.comm.Iallgather(np.array([value], np.int64), out), timeout=timeout,
                 what="Allgather")
        return out

    def allreduce(self, array: np.ndarray, *, op: str = "sum",
                  timeout: float = DEFAULT_TIMEOUT) -> np.ndarray:
        """Element-wise reduction of an array over all ranks (``op``: sum, min, max)."""
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        mpi_op = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op]
        self.wait(self.comm.Iallreduce(array, out, op=mpi_op), timeout=timeout, what="Allreduce")
        return out

    def agree(self, ok: bool, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when every rank passes True: call before a collective step that a failed peer
        would otherwise never join."""
        return bool(self.allreduce(np.array([0 if ok else 1], np.int32), op="max",
                                   timeout=timeout)[0] == 0)


def _buffer(array: np.ndarray):
    return array.view(np.uint8).reshape(-1) if array.dtype.kind in "SUVO" or array.dtype.names else array


def _pickle(obj) -> bytes:
    import pickle
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _unpickle(data: bytes):
    import pickle
    return pickle.loads(data)
