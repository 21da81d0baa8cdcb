"""Batch bytes handed from DataLoader workers to the main process through shared memory that is reused.

PyTorch moves every tensor a worker returns into a new shared-memory segment, and the receiving process maps it;
for batches of small latents the fresh pages of those segments (a page fault and zeroing per 4 KiB) and the file
descriptor passed per tensor cost more than reading and checking the latents (bench/RESULTS.md). Here each
worker's iteration keeps a few shared-memory *slots* (Linux ``memfd``): a batch's bytes are written into a free
slot (one ``pwritev`` of the items' bytes, no gather copy first), the slot's descriptor goes to the receiving
process with the first batch that uses it and is kept there, and the receiver reads the bytes out into memory of
its own, builds the batch, and marks the slot free. A slot is written again only once marked free, so nothing
the receiver holds shares memory with a slot; slots are added while all are in flight (the DataLoader's prefetch
bounds how many). Without ``memfd`` (not Linux) the bytes go pickled through the DataLoader's pipe instead.

The receiver closes a worker iteration's descriptors with its last batch; for an iteration abandoned midway, when
the same worker (persistent workers) hands over its next batch, or once the worker process has exited (checked
when another iteration starts handing over).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import DupFd
from typing import Any

_HEAD = 64  # a slot: its state byte (0 free, 1 in flight), then the batch's bytes from this offset
_IOV = 1024  # buffers per pwritev (IOV_MAX on Linux)
Chunks = Sequence[bytes | bytearray | memoryview]


def hand_over(batches: Iterator[tuple[Chunks, int, Callable[..., Any], tuple]]) -> Iterator[Any]:
    """For a DataLoader worker: each ``(chunks, nbytes, build, args)`` as an object that the receiving process
    unpickles into ``build(data, *args)``, ``data`` a new ``bytearray`` of the ``nbytes`` bytes of ``chunks``
    joined. ``build`` must be picklable (a module-level function). The chunks are read before the next batch is
    asked for, so they may be views of a buffer the producer reuses."""
    slots = _Slots() if hasattr(os, "memfd_create") else None
    held: _Handed | _Pickled | None = None  # one batch of lookahead: the last one tells the receiver to close the slots
    try:
        for chunks, nbytes, build, args in batches:
            item: _Handed | _Pickled | None = None
            if slots is not None:
                try:
                    item = _Handed(slots.token, *slots.put(chunks, nbytes), nbytes, build, args, _take_ended())
                except OSError:  # no memfd here after all (e.g. a sandbox): the pipe
                    slots.close()
                    slots = None
            if item is None:
                item = _Pickled(b"".join(chunks), build, args)
            if held is not None:
                yield held
            held = item
        if held is not None:
            held.last = True
            yield held
    finally:
        if slots is not None:
            slots.close()


_ended: list[str] = []  # in a worker: iterations whose slots were closed before the receiver heard of it


def _take_ended() -> list[str]:
    out = _ended[:]
    del _ended[: len(out)]
    return out


class _Slots:
    """One worker iteration's slots (memfd descriptors), and which ones the receiver has been sent."""

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.sent: set[int] = set()

    def put(self, chunks: Chunks, nbytes: int) -> tuple[int, Any]:
        """Write the chunks into a free slot (a new one if none is free); returns it and, the first time it is
        used, its descriptor to send."""
        free = (i for i, fd in enumerate(self.fds) if self.sizes[i] >= nbytes and os.pread(fd, 1, 0) == b"\0")
        slot = next(free, None)
        if slot is None:
            fd = os.memfd_create("medlatent-batch", os.MFD_CLOEXEC)
            os.ftruncate(fd, _HEAD + nbytes)
            self.fds.append(fd)
            self.sizes.append(nbytes)
            slot = len(self.fds) - 1
        fd = self.fds[slot]
        os.pwrite(fd, b"\1", 0)
        end = _HEAD
        for a in range(0, len(chunks), _IOV):
            end += os.pwritev(fd, chunks[a:a + _IOV], end)
        if end - _HEAD != nbytes:
            raise OSError(f"wrote {end - _HEAD} of {nbytes} bytes into a batch slot")
        if slot in self.sent:
            return slot, None
        self.sent.add(slot)
        return slot, DupFd(fd)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        if self.sent:
            _ended.append(self.token)  # the receiver still holds these, unless the last batch went out
        self.fds, self.sent = [], set()


class _Handed:
    """A batch in a slot, as the worker's queue pickles it: the slot, its descriptor the first time, the builder."""

    __slots__ = ("token", "slot", "fd", "nbytes", "build", "args", "ended", "last")

    def __init__(self, token: str, slot: int, fd: Any, nbytes: int, build: Callable[..., Any],
                 args: tuple, ended: list[str]) -> None:
        self.token, self.slot, self.fd, self.nbytes, self.build, self.args = token, slot, fd, nbytes, build, args
        self.ended, self.last = ended, False

    def __reduce__(self) -> tuple[Any, tuple]:
        return _receive, (self.token, self.slot, self.fd, self.nbytes, self.last, self.ended, self.build, self.args)


class _Pickled:
    """A batch's bytes pickled whole (where there are no slots)."""

    __slots__ = ("data", "build", "args", "last")

    def __init__(self, data: bytes, build: Callable[..., Any], args: tuple) -> None:
        self.data, self.build, self.args, self.last = data, build, args, False

    def __reduce__(self) -> tuple[Any, tuple]:
        return _unpickle, (self.data, self.build, self.args)


def _unpickle(data: bytes, build: Callable[..., Any], args: tuple) -> Any:
    return build(bytearray(data), *args)  # writable: tensors may be written to


# the receiving process: the slots' descriptors of each worker iteration (token → slot → fd)
_received: dict[str, dict[int, int]] = {}
_lock = threading.Lock()


def _receive(token: str, slot: int, fd: Any, nbytes: int, last: bool, ended: list[str],
             build: Callable[..., Any], args: tuple) -> Any:
    with _lock:
        for old in ended:  # iterations of this worker that were abandoned
            for d in _received.pop(old, {}).values():
                os.close(d)
        if token not in _received:
            _close_exited()
            _received[token] = {}
        fds = _received[token]
        if fd is not None:
            fds[slot] = fd.detach()
        desc = fds[slot]
        try:
            data = bytearray(nbytes)
            got = os.preadv(desc, [data], _HEAD)
            os.pwrite(desc, b"\0", 0)  # free: the worker may write its next batch into the slot
        finally:
            if last:
                for d in _received.pop(token).values():
                    os.close(d)
    if got != nbytes:
        raise OSError(f"read {got} of {nbytes} bytes of a batch from its DataLoader worker")
    return build(data, *args)


def _forget_in_child() -> None:
    """A process forked from a receiver (e.g. the workers of another DataLoader) does not receive its batches."""
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for fds in _received.values():
        for d in fds.values():
            os.close(d)
    _received.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _close_exited() -> None:
    """Close the descriptors of iterations whose worker process has exited (abandoned before their last batch)."""
    for token in list(_received):
        try:
            os.kill(int(token.split("-")[0]), 0)
        except ProcessLookupError:
            for d in _received.pop(token).values():
                os.close(d)
        except OSError:  # e.g. not permitted to signal it: it exists
            pass
