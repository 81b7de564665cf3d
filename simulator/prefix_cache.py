"""Byte-bounded prefix KV caches: the HBM cache of a ranking instance and its DRAM expander.

An HBM entry is *pinned* from the moment a pre-infer job is admitted (its bytes are
reserved) until the ranking request that it was made for consumes it; pinned entries are
never evicted, so when pinned bytes fill the cache, admission fails. Unpinned entries are
evicted in LRU order (or dropped when older than the TTL) to make room; an evicted entry
goes to the DRAM expander if there is one, whose own LRU bound drops the oldest.

Under an HBM pool (hbm_pool.py) the capacity moves at run time: `resize` shrinks it by
evicting unpinned entries in LRU order, never below the pinned bytes, and grows it for
free. A `GhostList` remembers recently evicted prefixes (ids and bytes only), so that a
later reference to one tells how many more bytes would have kept it (`stack_depth`).
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
    ghost: "GhostList | None" = None
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
        if self.ghost is not None:
            self.ghost.forget(user)
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

    def resize(self, capacity: int, now: float) -> int:
        """Move the capacity to `capacity` bytes, evicting unpinned entries (LRU first) when
        shrinking. Pinned bytes cannot be evicted, so the capacity stops at what remains in
        use; returns the capacity reached (>= the one asked for)."""
        if capacity < self.used:
            victims, need = [], self.used - capacity
            for u, e in self.entries.items():
                if e.pins == 0:
                    victims.append(u)
                    need -= e.nbytes
                    if need <= 0:
                        break
            for user in victims:
                self._drop(user, expired=False)
        self.capacity = max(int(capacity), self.used)
        return self.capacity

    def stack_depth(self, user: int) -> int | None:
        """LRU stack depth of the user's prefix in bytes: the bytes of entries used more
        recently, plus its own. A resident prefix (ready or pending) is at most `used` deep;
        one in the ghost list lies beyond all resident bytes; None if neither holds it.
        A cache of capacity c would have kept it iff its depth <= c (LRU inclusion)."""
        e = self.entries.get(user)
        if e is not None:
            depth = 0
            for u in reversed(self.entries):
                depth += self.entries[u].nbytes
                if u == user:
                    return depth
        if self.ghost is not None:
            d = self.ghost.depth(user)
            if d is not None:
                return self.used + d
        return None

    def _expired(self, e: Entry, now: float) -> bool:
        return self.ttl_ms is not None and now - e.stamp_ms > self.ttl_ms

    def _make_room(self, nbytes: int, now: float) -> None:
        if self.ttl_ms is not None:
            for user in [u for u, e in self.entries.items() if e.pins == 0 and self._expired(e, now)]:
                self._drop(user, expired=True)
        need = self.used + nbytes - self.capacity
        victims = []                       # the oldest unpinned entries that make the room
        for user, e in self.entries.items():
            if need <= 0:
                break
            if e.pins == 0:
                victims.append(user)
                need -= e.nbytes
        if need > 0:
            raise AssertionError("reserve() checked there was room among unpinned entries")
        for user in victims:
            self._drop(user, expired=False)

    def _drop(self, user: int, expired: bool) -> None:
        e = self.entries.pop(user)
        self.used -= e.nbytes
        if expired:
            self.counters.expired += 1
        else:
            self.counters.evictions += 1
            self.counters.evicted_bytes += e.nbytes
            if self.ghost is not None and e.ready:
                self.ghost.put(user, e.nbytes)
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


@dataclass
class GhostList:
    """Ids and sizes of recently evicted prefixes, LRU within a byte bound (no data)."""

    capacity: int
    entries: OrderedDict = field(default_factory=OrderedDict)   # user -> nbytes, oldest first
    used: int = 0

    def put(self, user: int, nbytes: int) -> None:
        self.forget(user)
        if nbytes > self.capacity:
            return
        while self.used + nbytes > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old
        self.entries[user] = nbytes
        self.used += nbytes

    def forget(self, user: int) -> None:
        nbytes = self.entries.pop(user, None)
        if nbytes is not None:
            self.used -= nbytes

    def depth(self, user: int) -> int | None:
        """Bytes evicted after the user's prefix, plus its own; None if not remembered."""
        if user not in self.entries:
            return None
        depth = 0
        for u in reversed(self.entries):
            depth += self.entries[u]
            if u == user:
                return depth
        return None
