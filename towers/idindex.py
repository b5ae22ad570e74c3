"""The row of each of millions of string ids, in about 30 bytes per id instead of ~120.

A ``dict`` from id to row costs, per id, the id's own ``str`` object (~57 bytes for a short one),
a dict entry and an ``int`` object: about 0.6 GB at 5M users, beside a user table of 1.2 GB. This
keeps the ids as ONE string (joined by NUL, the checkpoint's packed form, ``_pack_ids`` in
towers/features.py) with the start of each id, and looks them up by hash: the ids' 64-bit hashes
sorted, binary search, then the candidate id compared character for character (so a hash collision
or an unknown id never returns a wrong row). Measured A/B in BENCHMARKS.md (training at scale).

Python's own ``hash`` of a ``str`` is used: salted per process, which is fine because the index is
built in the process that uses it and never stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

SEP = "\x00"


class IdIndex:
    """Rows 1..n of ``ids`` (distinct strings, in that order); 0 for an id not in it."""

    def __init__(self, text: str, starts: np.ndarray, hashes: np.ndarray | None = None) -> None:
        # id i is text[starts[i]:starts[i + 1] - 1]; starts has n + 1 entries, the last len(text) + 1
        self._text, self._starts = text, starts
        n = len(starts) - 1
        if hashes is None:
            hashes = np.fromiter((hash(s) for s in self._each()), dtype=np.int64, count=n)
        self._order = np.argsort(hashes, kind="stable").astype(np.int32 if n < 2**31 else np.int64)
        self._hashes = hashes[self._order]

    @classmethod
    def of(cls, ids: Iterable[str]) -> IdIndex:
        ids = ids if isinstance(ids, list) else list(ids)
        lens = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        starts = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens + 1, out=starts[1:])
        hashes = np.fromiter((hash(s) for s in ids), dtype=np.int64, count=len(ids))
        return cls(SEP.join(ids), starts, hashes)

    @classmethod
    def joined(cls, text: str, count: int) -> IdIndex:
        """From ``SEP.join(ids)`` of ``count`` ids that contain no SEP (the packed checkpoint form)."""
        if count == 0:
            return cls("", np.zeros(1, dtype=np.int64))
        # character positions of the separators (one byte per character when the text is ASCII)
        codes = (np.frombuffer(text.encode("ascii"), dtype=np.uint8) if text.isascii()
                 else np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
        seps = np.flatnonzero(codes == ord(SEP))
        del codes
        if len(seps) != count - 1:
            raise ValueError(f"packed ids: {len(seps) + 1} found, {count} expected")
        starts = np.concatenate([[0], seps + 1, [len(text) + 1]]).astype(np.int64)
        return cls(text, starts)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._text[self._starts[i]:self._starts[i + 1] - 1]

    def _each(self, block: int = 1 << 16) -> Iterator[str]:
        """The ids in order, one at a time (the row offsets become Python ints a block at a time)."""
        text = self._text
        for lo in range(0, len(self), block):
            bounds = self._starts[lo:lo + block + 1].tolist()
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                yield text[a:b - 1]

    def tolist(self) -> list[str]:
        return list(self._each())

    def packed(self) -> dict[str, Any] | None:
        """``{"joined", "sep", "count"}`` when no id contains SEP (else None: store a list)."""
        if self._text.count(SEP) != max(0, len(self) - 1):
            return None
        return {"joined": self._text, "sep": SEP, "count": len(self)}

    def row(self, key: str) -> int:
        return int(self.rows([key])[0])

    def rows(self, keys: Sequence[Any]) -> np.ndarray:
        """(len(keys),) int64 rows, 0 where a key is not an id (keys are compared as given: normalise first)."""
        n = len(self)
        out = np.zeros(len(keys), dtype=np.int64)
        if n == 0 or len(keys) == 0:
            return out
        q = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys))
        at = np.minimum(np.searchsorted(self._hashes, q), n - 1)
        found = np.flatnonzero(self._hashes[at] == q)
        cand = self._order[at[found]].astype(np.int64)
        text = self._text
        same = [text[a:b - 1] == keys[j] for j, a, b in
                zip(found.tolist(), self._starts[cand].tolist(), self._starts[cand + 1].tolist(), strict=True)]
        ok = np.asarray(same, dtype=bool)
        out[found[ok]] = cand[ok] + 1
        for j in found[~ok].tolist():  # the first id with this hash is another one: look at the rest
            out[j] = self._scan(keys[j], int(at[j]) + 1, int(q[j]))
        return out

    def _scan(self, key: Any, k: int, h: int) -> int:
        while k < len(self) and self._hashes[k] == h:
            i = int(self._order[k])
            if self._text[self._starts[i]:self._starts[i + 1] - 1] == key:
                return i + 1
            k += 1
        return 0

    def nbytes(self) -> int:
        return (len(self._text) * (4 if not self._text.isascii() else 1) + self._starts.nbytes
                + self._order.nbytes + self._hashes.nbytes)
