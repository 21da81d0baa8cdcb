"""A compact column of strings: what a latent store's index keeps per item (names, label values as written).

A Python ``list[str]`` costs ~60 B per short string plus an 8-byte pointer; for 10⁷ items that is gigabytes in
every process that opens the store (each DataLoader worker, each torchrun rank). :class:`StrColumn` keeps the
UTF-8 bytes of all values in one ``bytes`` object with an ``int64`` end offset per value, and, for columns with
few distinct values (labels), the distinct values once plus an ``int32`` code per item. It reads like a
read-only list of ``str`` (indexing, iteration, ``len``, ``==`` with a list or another column).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np


class StrColumn(Sequence[str]):
    """Read-only strings in one buffer: value ``u`` is ``data[ends[u]:ends[u + 1]]`` (UTF-8); with ``codes``,
    item ``j`` is value ``codes[j]`` (each distinct value stored once)."""

    def __init__(self, data: bytes, ends: np.ndarray, codes: np.ndarray | None = None) -> None:
        self._data, self._ends, self._codes = data, ends, codes
        self._ascii = data.isascii()  # then byte offsets are character offsets: one decode serves all

    @classmethod
    def from_strings(cls, values: Iterable[str], *, coded: bool = False) -> StrColumn:
        """A column of ``values``; ``coded``: each distinct value stored once, an ``int32`` code per item."""
        codes = None
        if coded:
            seen: dict[str, int] = {}
            codes = np.fromiter((seen.setdefault(v, len(seen)) for v in values), dtype=np.int32)
            values = list(seen)
        values = values if isinstance(values, list) else list(values)
        text = "".join(values)
        lengths = map(len, values) if text.isascii() else (len(v.encode()) for v in values)
        ends = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(lengths, dtype=np.int64, count=len(values)), out=ends[1:])
        return cls(text.encode(), ends, codes)

    @classmethod
    def concat(cls, parts: Sequence[StrColumn]) -> StrColumn:
        """The columns one after the other (coded if any part is: codes renumbered over the distinct values)."""
        if not any(p._codes is not None for p in parts):
            ends = [np.zeros(1, dtype=np.int64)]
            shift = 0
            for p in parts:
                ends.append(p._ends[1:] + shift)
                shift += int(p._ends[-1])
            return cls(b"".join(p._data for p in parts), np.concatenate(ends))
        seen: dict[str, int] = {}
        codes = []
        for p in parts:
            uniq, own = p.factorize()
            remap = np.fromiter((seen.setdefault(v, len(seen)) for v in uniq), dtype=np.int32, count=len(uniq))
            codes.append(remap[own] if len(own) else own.astype(np.int32))
        out = cls.from_strings(list(seen))
        return cls(out._data, out._ends, np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32))

    def factorize(self) -> tuple[list[str], np.ndarray]:
        """The distinct values and, per item, the position of its value among them (``int32``)."""
        if self._codes is not None:
            return self._values(), self._codes
        seen: dict[str, int] = {}
        codes = np.fromiter((seen.setdefault(v, len(seen)) for v in self), dtype=np.int32, count=len(self))
        return list(seen), codes

    def _value(self, u: int) -> str:
        return self._data[self._ends[u]:self._ends[u + 1]].decode()

    def _values(self) -> list[str]:
        """Every stored value (the distinct ones, for a coded column), decoded at once."""
        if not self._ascii:
            return [self._value(u) for u in range(len(self._ends) - 1)]
        text, ends = self._data.decode(), self._ends.tolist()
        return [text[a:b] for a, b in zip(ends[:-1], ends[1:])]

    def __len__(self) -> int:
        return len(self._ends) - 1 if self._codes is None else len(self._codes)

    @overload
    def __getitem__(self, j: int) -> str: ...

    @overload
    def __getitem__(self, j: slice) -> list[str]: ...

    def __getitem__(self, j: int | slice) -> str | list[str]:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        n = len(self)
        if not -n <= j < n:
            raise IndexError(f"index {j} out of range for {n} items")
        j = int(j) % n
        return self._value(j if self._codes is None else int(self._codes[j]))

    def __iter__(self) -> Iterator[str]:
        values = self._values()
        return iter(values) if self._codes is None else (values[c] for c in self._codes.tolist())

    def tolist(self) -> list[str]:
        return list(self)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, (StrColumn, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are not hashable

    def __repr__(self) -> str:
        head = list(self[:5])
        return f"StrColumn({head!r}{' …' if len(self) > 5 else ''}, {len(self)} items)"

    def __reduce__(self) -> tuple[Any, ...]:
        return StrColumn, (self._data, self._ends, self._codes)
