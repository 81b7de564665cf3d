"""Byte-bounded prefix KV caches: the HBM cache of a ranking instance and its DRAM expander.

An HBM entry is *pinned* from the moment a pre-infer job is admitted (its bytes are
reserved) until the ranking request that it was made for consumes it; pinned entries are
never evicted, so when pinned bytes fill the cache, admission fails. Unpinned entries are
evicted in LRU order (or dropped when older than the TTL) to make room; an evicted entry
goes to the DRAM expander if there is one, whose own LRU bound drops the oldest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class Entry:
    user: int
    nbytes: int
    ready: bool          # False while its pre-infer job has not finished
    pins: int            # ranking requests still waiting to consume it
    stamp_ms: float      # last use (LRU/TTL clock)
    by_pre: bool = False # filled by a pre-infer job
    hits: int = 0


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expired: int = 0
    admitted: int = 0
    rejected: int = 0
    evicted_bytes: int = 0


@dataclass
class PrefixCache:
    """HBM prefix cache of one instance. Keys are user ids; values Entries."""

    capacity: int
    ttl_ms: float | None = None
    expander: "DramTier | None" = None
    entries: OrderedDict = field(default_factory=OrderedDict)   # LRU order: oldest first
    used: int = 0
    pinned: int = 0
    counters: CacheCounters = field(default_factory=CacheCounters)

    def lookup(self, user: int, now: float) -> Entry | None:
        """A ready entry for the user, refreshed in LRU order; None on a miss."""
        e = self.entries.get(user)
        if e is None or not e.ready:
            return None
        if self._expired(e, now) and e.pins == 0:
            self._drop(user, expired=True)
            return None
        e.stamp_ms = now
        self.entries.move_to_end(user)
        return e

    def reserve(self, user: int, nbytes: int, now: float, pin: bool = True) -> Entry | None:
        """Reserve room for a new entry (not ready yet), evicting unpinned ones as needed.

        Returns None, changing nothing, if the bytes cannot be found among unpinned entries.
        """
        if user in self.entries:
            raise ValueError(f"user {user} already has an entry")
        if nbytes > self.capacity - self.pinned:
            self.counters.rejected += 1
            return None
        self._make_room(nbytes, now)
        e = Entry(user, nbytes, ready=False, pins=1 if pin else 0, stamp_ms=now)
        self.entries[user] = e
        self.used += nbytes
        if pin:
            self.pinned += nbytes
        self.counters.admitted += 1
        return e

    def fill(self, user: int, now: float) -> None:
        """The pre-infer job finished: the entry's KV is now in HBM."""
        e = self.entries[user]
        e.ready, e.stamp_ms = True, now
        self.entries.move_to_end(user)

    def unpin(self, user: int) -> None:
        e = self.entries[user]
        if e.pins:
            e.pins -= 1
            if e.pins == 0:
                self.pinned -= e.nbytes

    def discard(self, user: int) -> None:
        """Drop an entry outright (a pre-infer job that was abandoned)."""
        e = self.entries.pop(user)
        self.used -= e.nbytes
        if e.pins:
            self.pinned -= e.nbytes

    def _expired(self, e: Entry, now: float) -> bool:
        return self.ttl_ms is not None and now - e.stamp_ms > self.ttl_ms

    def _make_room(self, nbytes: int, now: float) -> None:
        if self.ttl_ms is not None:
            for user in [u for u, e in self.entries.items() if e.pins == 0 and self._expired(e, now)]:
                self._drop(user, expired=True)
        if self.used + nbytes <= self.capacity:
            return
        for user in [u for u, e in self.entries.items() if e.pins == 0]:
            self._drop(user, expired=False)
            if self.used + nbytes <= self.capacity:
                return
        raise AssertionError("reserve() checked there was room among unpinned entries")

    def _drop(self, user: int, expired: bool) -> None:
        e = self.entries.pop(user)
        self.used -= e.nbytes
        if expired:
            self.counters.expired += 1
        else:
            self.counters.evictions += 1
            self.counters.evicted_bytes += e.nbytes
        if self.expander is not None and e.ready:
            self.expander.put(user, e.nbytes)


@dataclass
class DramTier:
    """Host-DRAM expander: evicted prefixes kept for reuse, LRU within a byte bound."""

    capacity: int
    entries: OrderedDict = field(default_factory=OrderedDict)   # user -> nbytes
    used: int = 0
    hits: int = 0
    puts: int = 0
    drops: int = 0

    def put(self, user: int, nbytes: int) -> None:
        if nbytes > self.capacity:
            return
        if user in self.entries:
            self.used -= self.entries.pop(user)
        while self.used + nbytes > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old
            self.drops += 1
        self.entries[user] = nbytes
        self.used += nbytes
        self.puts += 1

    def take(self, user: int) -> int | None:
        """Bytes of the user's prefix if held (it moves back to HBM, so leaves DRAM)."""
        nbytes = self.entries.pop(user, None)
        if nbytes is not None:
            self.used -= nbytes
            self.hits += 1
        return nbytes
