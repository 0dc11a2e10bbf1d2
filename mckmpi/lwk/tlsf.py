"""A TLSF (two-level segregated fit) allocator: bounded-time alloc and free over a range.

Allocator choice: TLSF (two-level segregated fit), not a buddy system. Both have bounded
time, but TLSF does alloc and free in O(1) with a fixed number of steps (one bitmap search,
at most one split, at most two merges) while a buddy allocator loops over up to log2(size)
orders to split and to coalesce; and a buddy rounds every request up to a power of two
(up to 50 % internal waste), whereas TLSF splits exactly (64-byte granularity) and bounds the
search waste by its 32 second-level classes per power of two. The hot path is plain Python
list indexing and integer arithmetic on tables preallocated at boot. It creates no container
(so the cyclic GC cannot start in the middle of an operation), only ints; once the
interpreter's heap holds their working set, an operation neither faults nor enters the
kernel (`mckmpi bench memory` measures both).
"""

from __future__ import annotations

from collections.abc import Iterator

ALIGNMENT = 64
"""Every block starts on a 64-byte boundary (one cache line, AVX-512 vectors)."""

_SHIFT = 6  # log2(ALIGNMENT): the allocator counts in 64-byte units
_SLI = 5  # log2 of the number of second-level classes per power of two
_USED = -1  # descriptor class marker: block handed out
_SPARE = -2  # descriptor class marker: descriptor not describing any block

# The hot paths spell these as literals (a module-global lookup per use costs more than the
# arithmetic): 63 = ALIGNMENT - 1, 6 = _SHIFT (bytes to units) and _SLI + 1 (first level of
# a class), 5 = _SLI (second-level bits). Changing a constant means changing them too.
if (ALIGNMENT - 1, _SHIFT, _SLI + 1, _SLI) != (63, 6, 6, 5):
    raise ImportError("tlsf: the literals of alloc/free no longer match the constants")


def _class_of(units: int) -> int:
    """Free-list class holding blocks of `units` (rounded down): exact below 64 units."""
    s = units.bit_length() - _SLI - 1
    return (s << _SLI) + (units >> s) if s > 0 else units


class Allocator:
    """TLSF bookkeeping over the byte range [0, size) in 64-byte units.

    Blocks are described by slots in parallel lists (offset, length, physical neighbours,
    free-list links, class); a handle is a slot index. Free blocks sit in doubly linked lists,
    one per (first level, second level) class, and one integer bitmap says which lists are
    non-empty, so finding a fitting block is one shift and one lowest-set-bit. The slot
    tables are preallocated for `capacity` blocks and double when a heap needs more (live
    blocks + free blocks, at most twice the live blocks plus one): that amortised growth is
    the only step of unbounded cost, and it never happens below the boot-time capacity.
    """

    __slots__ = ("size", "allocations", "frees", "free_blocks", "_used", "_peak", "_heads",
                 "_bitmap", "_off", "_len", "_prev", "_next", "_fnext", "_fprev", "_cls",
                 "_spare")

    def __init__(self, size: int, capacity: int = 4096) -> None:
        units = size >> _SHIFT
        if units < 1:
            raise ValueError(f"allocator size must be at least {ALIGNMENT} bytes, got {size}")
        self.size = units << _SHIFT
        self.allocations = self.frees = 0
        self._used = self._peak = 0
        self._heads = [-1] * (_class_of(units) + 1)
        self._bitmap = 0
        cap = max(2, capacity)
        self._off = [0] * cap
        self._len = [0] * cap
        self._prev = [-1] * cap
        self._next = [-1] * cap
        self._fnext = list(range(1, cap + 1))  # spare slots are chained through _fnext
        self._fnext[-1] = -1
        self._fprev = [-1] * cap
        self._cls = [_SPARE] * cap
        self._spare = 1
        self._len[0] = units
        c = _class_of(units)
        self._heads[c] = 0
        self._fnext[0] = -1
        self._cls[0] = c
        self._bitmap = 1 << c
        self.free_blocks = 1

    @property
    def in_use(self) -> int:
        """Bytes in live blocks (requests rounded up to 64 bytes)."""
        return self._used << _SHIFT

    @property
    def peak(self) -> int:
        """Highest `in_use` seen."""
        return self._peak << _SHIFT

    @property
    def live(self) -> int:
        """Number of blocks handed out and not freed."""
        return self.allocations - self.frees

    def offset(self, handle: int) -> int:
        """Byte offset of a live block."""
        return self._off[handle] << _SHIFT

    def block_size(self, handle: int) -> int:
        """Size in bytes of a live block (its request rounded up to 64 bytes)."""
        return self._len[handle] << _SHIFT

    def alloc(self, nbytes: int) -> int:
        """Hand out a block of at least `nbytes`; its handle, or -1 when nothing fits."""
        u = (nbytes + 63) >> 6 or 1  # 64-byte units (ALIGNMENT - 1, _SHIFT)
        s = u.bit_length() - 6  # first level minus _SLI + 1
        # Round the request up to the next class boundary: every block there fits.
        idx = (s << 5) + ((u + (1 << s) - 1) >> s) if s > 0 else u
        m = self._bitmap >> idx
        if not m:
            return -1
        idx += (m & -m).bit_length() - 1
        heads = self._heads
        fnext = self._fnext
        h = heads[idx]
        x = fnext[h]
        heads[idx] = x
        if x < 0:
            self._bitmap ^= 1 << idx
        else:
            self._fprev[x] = -1
        cls = self._cls
        cls[h] = _USED
        length = self._len
        rem = length[h] - u
        if rem:
            d = self._spare
            if d < 0:
                d = self._grow()
            self._spare = fnext[d]
            length[h] = u
            length[d] = rem
            off = self._off
            off[d] = off[h] + u
            nxt = self._next
            x = nxt[h]
            nxt[d] = x
            if x >= 0:
                self._prev[x] = d
            nxt[h] = d
            self._prev[d] = h
            s = rem.bit_length() - 6
            c = (s << 5) + (rem >> s) if s > 0 else rem
            x = heads[c]
            fnext[d] = x
            fprev = self._fprev
            fprev[d] = -1
            if x < 0:
                self._bitmap |= 1 << c
            else:
                fprev[x] = d
            heads[c] = d
            cls[d] = c
        else:
            self.free_blocks -= 1
        used = self._used + u
        self._used = used
        if used > self._peak:
            self._peak = used
        self.allocations += 1
        return h

    def free(self, handle: int) -> None:
        """Return a live block, merging it with free physical neighbours."""
        h = handle
        cls = self._cls
        if h < 0 or cls[h] != _USED:
            raise ValueError(f"allocator handle {handle} is not a live block")
        length = self._len
        nxt = self._next
        prv = self._prev
        fnext = self._fnext
        fprev = self._fprev
        u = length[h]
        self._used -= u
        self.frees += 1
        p = prv[h]
        if p >= 0:
            c = cls[p]
            if c >= 0:
                a = fprev[p]
                b = fnext[p]
                if a >= 0:
                    fnext[a] = b
                else:
                    self._heads[c] = b
                    if b < 0:
                        self._bitmap ^= 1 << c
                if b >= 0:
                    fprev[b] = a
                u += length[p]
                x = nxt[h]
                nxt[p] = x
                if x >= 0:
                    prv[x] = p
                cls[h] = _SPARE
                fnext[h] = self._spare
                self._spare = h
                h = p
                self.free_blocks -= 1
        n = nxt[h]
        if n >= 0:
            c = cls[n]
            if c >= 0:
                a = fprev[n]
                b = fnext[n]
                if a >= 0:
                    fnext[a] = b
                else:
                    self._heads[c] = b
                    if b < 0:
                        self._bitmap ^= 1 << c
                if b >= 0:
                    fprev[b] = a
                u += length[n]
                x = nxt[n]
                nxt[h] = x
                if x >= 0:
                    prv[x] = h
                cls[n] = _SPARE
                fnext[n] = self._spare
                self._spare = n
                self.free_blocks -= 1
        length[h] = u
        s = u.bit_length() - 6
        c = (s << 5) + (u >> s) if s > 0 else u
        heads = self._heads
        x = heads[c]
        fnext[h] = x
        fprev[h] = -1
        if x < 0:
            self._bitmap |= 1 << c
        else:
            fprev[x] = h
        heads[c] = h
        cls[h] = c
        self.free_blocks += 1

    def _grow(self) -> int:
        """Double the slot tables; return the first new slot (the rest become spares)."""
        cap = len(self._off)
        self._off += [0] * cap
        self._len += [0] * cap
        self._prev += [-1] * cap
        self._next += [-1] * cap
        self._fnext += range(cap + 1, 2 * cap + 1)
        self._fnext[-1] = -1
        self._fprev += [-1] * cap
        self._cls += [_SPARE] * cap
        return cap

    def largest_free(self) -> int:
        """Bytes in the largest free block (scans one free list: not for the hot path)."""
        if not self._bitmap:
            return 0
        h = self._heads[self._bitmap.bit_length() - 1]
        best = 0
        while h >= 0:
            best = max(best, self._len[h])
            h = self._fnext[h]
        return best << _SHIFT

    def blocks(self) -> Iterator[tuple[int, int, bool]]:
        """Every block in address order as (offset, size, is_free)."""
        h = 0  # slot 0 always describes the block at offset 0: merges keep the lower slot
        while h >= 0:
            yield self._off[h] << _SHIFT, self._len[h] << _SHIFT, self._cls[h] >= 0
            h = self._next[h]

    def stats(self) -> dict[str, int | float]:
        """Counters and fragmentation (1 - largest free / total free; 0 when nothing free)."""
        total_free = self.size - self.in_use
        largest = self.largest_free()
        return {
            "in_use": self.in_use,
            "peak": self.peak,
            "allocations": self.allocations,
            "frees": self.frees,
            "live": self.live,
            "free_blocks": self.free_blocks,
            "largest_free": largest,
            "fragmentation": 1.0 - largest / total_free if total_free else 0.0,
        }
