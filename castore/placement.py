"""Placement: which peers hold the chunks of a placement group (PG). A pure function.

Weighted rendezvous hashing (HRW) with Ceph's straw2 draw `ln(u)/w`, over PGs (the top bits of
a ChunkId), zone-first. The same inputs give the same answer on every peer, whatever order the
peers are given in: no I/O, no clock, no randomness. Membership decides which peers are placed
(`PeerInfo.live`); this module only ranks them. Imports only the standard library, blake3 and
castore.ids.

How u is drawn (why not a plain hash of (pg, peer)): every peer gets a pseudo-random permutation
of the PGs, a 4-round Feistel network keyed by blake3(peer id), and u falls in the stratum
`1 - (perm(pg) + jitter) / P`. Per PG the u of different peers are independent and uniform, as
straw2 needs; but the map can be run backwards, so the PGs where a peer draws best are listed
without scoring every (PG, peer) pair. That is what makes `PlacementTable` cost O(P·R) to build
instead of O(P·N) (10,000 peers × 2**19 PGs would be 5·10^9 hashes), and a join or a leave cost
O(P·R/N).

Scores are doubles from math.log1p, so peers agree wherever libm rounds log1p alike (as
correctly rounded ones do); with differing libms two peers could disagree only on a PG where two
scores agree to ~1e-16. Ceph's straw2 uses a fixed-point ln for this reason.
"""
from __future__ import annotations

import functools
import gc
import math
import struct
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress, count

from blake3 import blake3

from castore.ids import ChunkId, PeerId

__all__ = ["MAX_PG_BITS", "PeerInfo", "PlacementTable", "effective_redundancy", "holders",
           "pg_of", "preference_list", "recommended_pg_bits", "recommended_pg_count", "score"]

MAX_PG_BITS = 21            # 2M PGs: enough for ~60,000 peers at 100 PG copies per peer
_JITTER_BITS = 32           # u has bits + 32 bits; with bits <= 21 it is exact in a double
_DOMAIN = b"castore/placement/v1"
_SLACK = 2                  # prefix entries kept past the holders, so most leaves need no rescan
_SCAN_BELOW = 32            # below this many peers a table simply scores every (PG, peer) pair
_BANDS = (7.0, 16.0)        # expected candidates per PG after each enumeration band


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer as placement sees it.

    weight: capacity in bytes or any relative weight (> 0, finite); a peer gets PGs in
        proportion to it. Keep every weight under total/R: a peer cannot hold two copies of a
        PG, so the heaviest peers end up a little under their share.
    zone: the failure domain (machine, room); copies of a PG go to distinct zones first.
        None: the peer is a zone of its own.
    live: whether the peer is placed. Membership sets it False once a peer is "out" (dead past
        down_out_interval, or removed); a peer that is merely suspect or down stays live here,
        so a restart moves nothing, and writers skip it for now by walking further down the
        preference list (hinted handoff).
    """

    id: PeerId
    weight: float = 1.0
    zone: str | None = None
    live: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.id, PeerId):
            raise TypeError(f"PeerInfo.id must be a PeerId, got {type(self.id).__name__}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"peer weight must be positive and finite, got {self.weight!r}")


# -- placement groups ----------------------------------------------------------------------

def pg_of(cid: ChunkId, bits: int) -> int:
    """The PG of a chunk: the top `bits` bits of its id (0 <= bits <= MAX_PG_BITS).

    Splitting (bits -> bits + 1) maps PG g to the two children 2g and 2g + 1.
    """
    _check_bits(bits)
    return int.from_bytes(cid.digest[:8], "big") >> (64 - bits)


def recommended_pg_bits(peers: int, redundancy: int = 3, per_peer: int = 100) -> int:
    """The smallest k with 2**k · redundancy / peers >= per_peer (PG copies per peer).

    About 100 PG copies per peer keep the load of the fullest peer within ~1.4× the mean at
    10,000 peers. Raises ValueError if even MAX_PG_BITS is too few, or on non-positive input.
    """
    if peers < 1 or redundancy < 1 or per_peer < 1:
        raise ValueError("peers, redundancy and per_peer must be positive")
    need = -(-per_peer * peers // redundancy)           # ceil(per_peer · N / R)
    bits = max(0, (need - 1).bit_length())
    if bits > MAX_PG_BITS:
        raise ValueError(f"{peers} peers need more than 2**{MAX_PG_BITS} PGs")
    return bits


def recommended_pg_count(peers: int, redundancy: int = 3, per_peer: int = 100) -> int:
    """2 ** recommended_pg_bits(...): the smallest power of two P with P·R/N >= per_peer."""
    return 1 << recommended_pg_bits(peers, redundancy, per_peer)


def effective_redundancy(r: int, peers: Iterable[PeerInfo]) -> int:
    """R_eff = min(r, live peers): how many copies a chunk gets. 1 peer: no redundancy."""
    return min(r, sum(1 for p in peers if p.live))


def _check_bits(bits: int) -> None:
    if not 0 <= bits <= MAX_PG_BITS:
        raise ValueError(f"PG bits must be in 0..{MAX_PG_BITS}, got {bits}")


def _pg(target: int | ChunkId, bits: int) -> int:
    _check_bits(bits)
    if isinstance(target, ChunkId):
        return pg_of(target, bits)
    if not 0 <= target < 1 << bits:
        raise ValueError(f"PG {target} is out of range for {bits} bits")
    return target


# -- the draw: u per (PG, peer), and its inverse per peer ----------------------------------

@dataclass(frozen=True, slots=True)
class _Geometry:
    """Feistel halves (a high bits, b low bits) and round tables of one PG count."""

    bits: int
    a: int
    b: int
    ma: int
    mb: int
    t1: list[int]           # 2**b entries of a bits
    t2: list[int]           # 2**a entries of b bits
    t3: list[int]           # 2**b entries of 16 bits (low a bits feed the network)
    t4: list[int]           # 2**a entries of 16 bits (low b bits feed the network)
    scale: float            # 2**-(bits + 32): d * scale = 1 - u, exactly


@functools.cache
def _geometry(bits: int) -> _Geometry:
    a, b = bits // 2, bits - bits // 2
    ma, mb = (1 << a) - 1, (1 << b) - 1
    sizes = (1 << b, 1 << a, 1 << b, 1 << a)
    raw = blake3(_DOMAIN + b"/tables" + bytes([bits])).digest(2 * sum(sizes))
    words = struct.unpack(f"<{sum(sizes)}H", raw)
    tables: list[list[int]] = []
    pos = 0
    for size in sizes:
        tables.append(list(words[pos:pos + size]))
        pos += size
    t1, t2, t3, t4 = tables
    return _Geometry(bits, a, b, ma, mb, [x & ma for x in t1], [x & mb for x in t2], t3, t4,
                     2.0 ** -(bits + _JITTER_BITS))


@functools.lru_cache(maxsize=1 << 17)
def _keys(seed: bytes, digest: bytes, bits: int) -> tuple[int, ...]:
    """One peer's round keys (k1, k2, k3, c3, k4, c4): k_i whiten the table index of round i;
    c3 and c4 pad the last two round outputs, which makes u uniform and independent across
    peers for any one PG."""
    g = _geometry(bits)
    h = blake3(_DOMAIN + b"/peer" + bytes([bits]) + len(seed).to_bytes(2, "big") + seed + digest)
    k1, k2, k3, c3, k4, c4 = struct.unpack("<6H", h.digest(12))
    return (k1 & g.mb, k2 & g.ma, k3 & g.mb, c3, k4 & g.ma, c4)


def _draw(pg: int, key: tuple[int, ...], g: _Geometry) -> int:
    """d = (1 - u) · 2**(bits + 32) of one (PG, peer): stratum perm(pg), then 32 jitter bits."""
    k1, k2, k3, c3, k4, c4 = key
    b = g.b
    left, right = pg >> b, pg & g.mb
    left, right = right, left ^ g.t1[right ^ k1]
    left, right = right, left ^ g.t2[right ^ k2]
    v3 = g.t3[right ^ k3] ^ c3
    left, right = right, left ^ (v3 & g.ma)
    v4 = g.t4[right ^ k4] ^ c4
    left, right = right, left ^ (v4 & g.mb)
    return (((left << b) | right) << _JITTER_BITS) | (v3 << 16) | v4


def _undraw(key: tuple[int, ...], g: _Geometry, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """(pg, d) of the PGs whose stratum under this peer is in [start, stop): _draw backwards."""
    k1, k2, k3, c3, k4, c4 = key
    b, ma, mb = g.b, g.ma, g.mb
    t1, t2, t3, t4 = g.t1, g.t2, g.t3, g.t4
    for s in range(start, stop):
        left, right = s >> b, s & mb
        v4 = t4[left ^ k4] ^ c4
        left, right = right ^ (v4 & mb), left
        v3 = t3[left ^ k3] ^ c3
        left, right = right ^ (v3 & ma), left
        left, right = right ^ t2[left ^ k2], left
        left, right = right ^ t1[left ^ k1], left
        yield (left << b) | right, (s << _JITTER_BITS) | (v3 << 16) | v4


def _cost(d: int, weight: float, g: _Geometry) -> float:
    """-ln(u)/w, the negated straw2 score: smaller is better."""
    return -math.log1p(-d * g.scale) / weight


def _strata_below(t: float, weight: float, bits: int) -> int:
    """A stop stratum past every stratum that can hold a cost <= t (a little past, to be safe)."""
    if t < 0:
        return 0
    return min(1 << bits, int(-math.expm1(-t * weight) * (1 << bits)) + 2)


# -- ranking and the zone-first pick -------------------------------------------------------

def _prepare(peers: Iterable[PeerInfo]) -> tuple[PeerInfo, ...]:
    """The live peers, sorted by id; raises ValueError on a duplicate id."""
    all_peers = list(peers)
    if len({p.id for p in all_peers}) != len(all_peers):
        raise ValueError("peer ids must be unique")
    return tuple(sorted((p for p in all_peers if p.live), key=lambda p: p.id.digest))


def _zone(p: PeerInfo) -> str | PeerId:
    return p.zone if p.zone is not None else p.id


def _shape(live: Sequence[PeerInfo], r: int) -> tuple[int, int, bool]:
    """(R_eff, zones a PG must span, whether every peer is a zone of its own)."""
    if r < 1:
        raise ValueError(f"redundancy must be at least 1, got {r}")
    r_eff = min(r, len(live))
    distinct = all(p.zone is None for p in live)
    zones = len(live) if distinct else len({_zone(p) for p in live})
    return r_eff, min(r_eff, zones), distinct


def _pick(prefix: Sequence[PeerInfo], r_eff: int, want: int,
          distinct: bool) -> tuple[tuple[PeerInfo, ...], int] | None:
    """The holders chosen from an exact prefix of a preference list, and how much of the prefix
    the choice used; None if the prefix is too short to decide.

    Walk the list taking the best peer of each zone not yet used until `want` zones are used,
    then fill up to r_eff in list order. The holders come back in preference order.
    """
    if distinct:
        return (tuple(prefix[:r_eff]), r_eff) if len(prefix) >= r_eff else None
    chosen = [False] * len(prefix)
    used: set[str | PeerId] = set()
    end = 0
    for i, p in enumerate(prefix):
        if len(used) == want:
            break
        z = _zone(p)
        if z not in used:
            used.add(z)
            chosen[i] = True
            end = i + 1
    if len(used) < want:
        return None
    extra = r_eff - want
    for i in range(len(prefix)):
        if not extra:
            break
        if not chosen[i]:
            chosen[i] = True
            extra -= 1
            end = max(end, i + 1)
    if extra:
        return None
    return tuple(p for p, c in zip(prefix, chosen) if c), end


def _ranked(pg: int, live: Sequence[PeerInfo], bits: int,
            seed: bytes) -> list[tuple[float, bytes, PeerInfo]]:
    """Every live peer as (cost, id digest, peer), best first: the whole preference list."""
    g = _geometry(bits)
    ranked = [(_cost(_draw(pg, _keys(seed, p.id.digest, bits), g), p.weight, g), p.id.digest, p)
              for p in live]
    ranked.sort()       # (cost, digest) is unique, so peers themselves are never compared
    return ranked


def score(target: int | ChunkId, peer: PeerInfo, *, bits: int, seed: bytes = b"") -> float:
    """The straw2 score ln(u)/weight of a peer for a PG (or a chunk's PG); higher is better.

    u is in (0, 1], so the score is <= 0. Depends only on (PG, peer id, weight, bits, seed).
    """
    pg = _pg(target, bits)
    g = _geometry(bits)
    return -_cost(_draw(pg, _keys(seed, peer.id.digest, bits), g), peer.weight, g)


def preference_list(target: int | ChunkId, peers: Iterable[PeerInfo], *, bits: int,
                    seed: bytes = b"") -> tuple[PeerId, ...]:
    """Every live peer, best score first (ties: lower id): the order reads try after the holders,
    and where writers look for stand-ins when a holder is down.

    target is a PG number below 2**bits, or a ChunkId. seed (the cluster id) must be the same
    on every peer. Raises ValueError on a duplicate peer id or an out-of-range PG or bits.
    O(N log N) per call; `PlacementTable` answers for every PG at once.
    """
    live = _prepare(peers)
    return tuple(e[2].id for e in _ranked(_pg(target, bits), live, bits, seed))


def holders(target: int | ChunkId, peers: Iterable[PeerInfo], r: int, *, bits: int,
            seed: bytes = b"") -> tuple[PeerId, ...]:
    """The R_eff = min(r, live peers) peers that hold a PG, in preference order.

    Zone-first: the best peer of each zone is taken, in preference order, before any zone gets
    a second copy; so with at least r zones no zone holds two copies. The first holder is the
    PG's primary (it owns the PG's repair). Joining or leaving changes only the PGs whose holders
    gain the new peer or lost the old one. Same errors as preference_list.
    """
    live = _prepare(peers)
    pg = _pg(target, bits)
    r_eff, want, distinct = _shape(live, r)
    if not live:
        return ()
    picked = _pick([e[2] for e in _ranked(pg, live, bits, seed)], r_eff, want, distinct)
    assert picked is not None           # the whole list always decides
    return tuple(p.id for p in picked[0])


# -- every PG at once ----------------------------------------------------------------------

_Entry = tuple[tuple[PeerInfo, ...], float, tuple[PeerInfo, ...]]    # (prefix, bound, holders)


@dataclass(frozen=True, slots=True)
class _Base:
    """The PGs a build settled in its first band, in one flat array of `width` slots per PG:
    PG pg's best candidates are (cost, index into live) pairs from slots[pg·2·width], best
    first, min(seen[pg], width) of them. They are every live peer costing at most the PG's
    bound: `bound` if seen[pg] <= width, else the last kept cost (seen[pg] == width + 1 says
    some were dropped). Every peer being its own zone, the first R_eff of them hold the PG."""

    live: tuple[PeerInfo, ...]
    width: int
    slots: array[float]
    seen: bytearray
    bound: float

    def entry(self, pg: int, r_eff: int) -> _Entry:
        first, seen, width = 2 * self.width * pg, self.seen[pg], self.width
        n = min(seen, width)
        prefix = tuple(self.live[int(i)] for i in self.slots[first + 1:first + 2 * n:2])
        bound = self.bound if seen <= width else self.slots[first + 2 * n - 2]
        return prefix, bound, prefix[:r_eff]


class PlacementTable:
    """`holders()` of every PG for one set of peers, built and updated without scoring all pairs.

    Equal to `holders(pg, peers, r, bits=bits, seed=seed)` for every pg (the tests check this).
    An immutable value: with_peer and without_peer return a new table that shares what did not
    change. Costs, for N live peers and P = 2**bits: build about 16·P draws (20 s of CPU for
    10,000 peers and 2**19 PGs on this 2-core box), join and leave O(P·R/N) draws (plus an O(N)
    rescan of the rare PG whose kept candidates run out). Memory: ~85 bytes per PG.

    Per PG it keeps an exact prefix of the preference list, every live peer whose cost is at most
    the PG's bound, long enough to decide the holders with a few to spare: a join changes only
    the PGs where the newcomer costs at most their bound, a leave only those where the leaver does.
    """

    __slots__ = ("bits", "r", "seed", "_live", "_index", "_r_eff", "_want", "_distinct",
                 "_base", "_over", "_t_max", "_token", "_parent", "_touched")

    bits: int
    r: int
    seed: bytes
    _live: tuple[PeerInfo, ...]
    _index: dict[PeerId, PeerInfo]
    _r_eff: int
    _want: int
    _distinct: bool
    _base: _Base | None
    _over: dict[int, _Entry]        # PGs not in _base, or changed since the build
    _t_max: float                   # the largest bound of any PG
    _token: object                  # identifies this table to the ones derived from it
    _parent: object | None          # the _token of the table this one was derived from
    _touched: set[int]              # the PGs whose entries differ from that table's

    @classmethod
    def build(cls, peers: Iterable[PeerInfo], r: int, *, bits: int,
              seed: bytes = b"") -> PlacementTable:
        """The table of the live peers among `peers`. Raises ValueError like holders()."""
        _check_bits(bits)
        t = cls._empty(_prepare(peers), r, bits, seed)
        if t._live:
            with _gc_paused():
                if len(t._live) < _SCAN_BELOW:
                    for pg in range(1 << bits):
                        t._rescan(pg)
                else:
                    t._enumerate()
        return t

    @classmethod
    def _empty(cls, live: tuple[PeerInfo, ...], r: int, bits: int, seed: bytes) -> PlacementTable:
        t = cls.__new__(cls)
        t.bits, t.r, t.seed, t._live = bits, r, seed, live
        t._index = {p.id: p for p in live}
        t._r_eff, t._want, t._distinct = _shape(live, r)
        t._base, t._over, t._t_max = None, {}, -math.inf
        t._token, t._parent, t._touched = object(), None, set()
        return t

    def _derive(self, live: tuple[PeerInfo, ...]) -> PlacementTable | None:
        """A copy for a new live set, or None if R_eff or the number of zones to span changes
        (then every PG may change, and only a rebuild will do)."""
        t = PlacementTable._empty(live, self.r, self.bits, self.seed)
        if (t._r_eff, t._want) != (self._r_eff, self._want) or not live:
            return None
        t._base, t._over, t._t_max = self._base, dict(self._over), self._t_max
        t._parent = self._token
        return t

    # -- queries ---------------------------------------------------------------------------
    @property
    def peers(self) -> tuple[PeerInfo, ...]:
        """The live peers, sorted by id."""
        return self._live

    @property
    def r_eff(self) -> int:
        return self._r_eff

    def holders(self, pg: int) -> tuple[PeerId, ...]:
        """Same as the module-level holders(pg, ...) for this table's peers."""
        pg = _pg(pg, self.bits)
        return tuple(p.id for p in self._entry(pg)[2]) if self._live else ()

    def assignment(self) -> list[tuple[PeerId, ...]]:
        """holders(pg) of every PG, in PG order."""
        n_pgs, over, r_eff = 1 << self.bits, self._over, self._r_eff
        if not self._live:
            return [()] * n_pgs
        if self._base is None:
            return [tuple(p.id for p in over[pg][2]) for pg in range(n_pgs)]
        ids = [p.id for p in self._base.live]
        slots, stride = self._base.slots, 2 * self._base.width
        return [tuple(p.id for p in over[pg][2]) if pg in over else
                tuple(ids[int(i)] for i in slots[pg * stride + 1:pg * stride + 2 * r_eff:2])
                for pg in range(n_pgs)]

    def holder_indices(self) -> list[tuple[int, ...]]:
        """holders(pg) of every PG as indices into .peers, in PG order (for bookkeeping)."""
        n_pgs, over, r_eff = 1 << self.bits, self._over, self._r_eff
        if not self._live:
            return [()] * n_pgs
        pos = {p.id: i for i, p in enumerate(self._live)}
        if self._base is None:
            return [tuple(pos[p.id] for p in over[pg][2]) for pg in range(n_pgs)]
        remap = [pos.get(p.id, -1) for p in self._base.live]
        slots, stride = self._base.slots, 2 * self._base.width
        return [tuple(pos[p.id] for p in over[pg][2]) if pg in over else
                tuple(remap[int(i)] for i in slots[pg * stride + 1:pg * stride + 2 * r_eff:2])
                for pg in range(n_pgs)]

    def loads(self) -> dict[PeerId, int]:
        """How many PGs each live peer holds (0 included)."""
        counts = Counter(pid for h in self.assignment() for pid in h)
        return {p.id: counts.get(p.id, 0) for p in self._live}

    def changed(self, other: PlacementTable) -> list[int]:
        """The PGs whose holder sets differ between two tables of the same bits."""
        if other.bits != self.bits:
            raise ValueError("tables of different PG counts")
        if other._parent is self._token:
            pgs: Iterable[int] = sorted(other._touched)
        elif self._parent is other._token:
            pgs = sorted(self._touched)
        elif self._base is other._base and self._live and other._live:
            # tables derived from a common one share every entry that did not change
            mine, theirs = self._over, other._over
            pgs = sorted(pg for pg in mine.keys() | theirs.keys()
                         if mine.get(pg) is not theirs.get(pg))
        else:
            pgs = range(1 << self.bits)
        return [pg for pg in pgs if set(self.holders(pg)) != set(other.holders(pg))]

    # -- updates ---------------------------------------------------------------------------
    def with_peer(self, peer: PeerInfo) -> PlacementTable:
        """The table after `peer` joins (a peer that is not live changes nothing).

        Raises ValueError if a peer with this id is already placed.
        """
        if peer.id in self._index:
            raise ValueError(f"{peer.id!r} is already placed")
        if not peer.live:
            return self
        live = tuple(sorted(self._live + (peer,), key=lambda p: p.id.digest))
        t = self._derive(live)
        if t is None:
            return PlacementTable.build(live, self.r, bits=self.bits, seed=self.seed)
        g = _geometry(self.bits)
        for pg, cost in self._draws_upto(peer, self._t_max, g):
            prefix, bound, _ = t._entry(pg)
            if cost > bound:
                continue
            ranked = [(t._cost_of(pg, q, g), q.id.digest, q) for q in prefix]
            ranked.append((cost, peer.id.digest, peer))
            ranked.sort()
            t._store(pg, ranked, bound)
        return t

    def without_peer(self, peer_id: PeerId) -> PlacementTable:
        """The table after a peer leaves (goes out). Raises ValueError if it is not placed."""
        peer = self._index.get(peer_id)
        if peer is None:
            raise ValueError(f"{peer_id!r} is not placed")
        t = self._derive(tuple(p for p in self._live if p is not peer))
        if t is None:
            return PlacementTable.build([p for p in self._live if p is not peer], self.r,
                                        bits=self.bits, seed=self.seed)
        g = _geometry(self.bits)
        for pg, cost in self._draws_upto(peer, self._t_max, g):
            prefix, bound, _ = t._entry(pg)
            if cost > bound:
                continue                # then, by the prefix invariant, peer is not in it
            rest = [(t._cost_of(pg, q, g), q.id.digest, q) for q in prefix if q is not peer]
            if not t._store(pg, rest, bound):
                t._rescan(pg)
        return t

    # -- internals -------------------------------------------------------------------------
    def _entry(self, pg: int) -> _Entry:
        e = self._over.get(pg)
        if e is not None:
            return e
        assert self._base is not None
        return self._base.entry(pg, self._r_eff)

    def _cost_of(self, pg: int, p: PeerInfo, g: _Geometry) -> float:
        return _cost(_draw(pg, _keys(self.seed, p.id.digest, self.bits), g), p.weight, g)

    def _draws_upto(self, peer: PeerInfo, t: float, g: _Geometry) -> Iterator[tuple[int, float]]:
        """(pg, cost) of every PG where `peer` costs at most t (and a few more)."""
        key = _keys(self.seed, peer.id.digest, self.bits)
        stop = 1 << self.bits if math.isinf(t) else _strata_below(t, peer.weight, self.bits)
        for pg, d in _undraw(key, g, 0, stop):
            yield pg, _cost(d, peer.weight, g)

    def _store(self, pg: int, ranked: list[tuple[float, bytes, PeerInfo]], bound: float,
               slack: bool = False) -> bool:
        """Keep pg's entry from `ranked`: (cost, digest, peer) of every live peer costing at most
        bound, best first. False if they cannot decide the holders (with slack: cannot decide
        them with _SLACK to spare). A long prefix is cut, and its bound lowered to match."""
        prefix = [e[2] for e in ranked]
        picked = _pick(prefix, self._r_eff, self._want, self._distinct)
        if picked is None or (slack and len(prefix) < picked[1] + _SLACK):
            return False
        holders, keep = picked[0], picked[1] + _SLACK
        if len(ranked) > keep + _SLACK:
            while keep < len(ranked) and ranked[keep][0] == ranked[keep - 1][0]:
                keep += 1               # cut between two different costs only
            if keep < len(ranked):
                prefix, bound = prefix[:keep], ranked[keep - 1][0]
        self._over[pg] = (tuple(prefix), bound, holders)
        self._t_max = max(self._t_max, bound)
        self._touched.add(pg)
        return True

    def _rescan(self, pg: int) -> None:
        """Rank every live peer for pg (O(N)), for a PG whose kept candidates ran out."""
        if not self._store(pg, _ranked(pg, self._live, self.bits, self.seed), math.inf):
            raise AssertionError("the whole preference list always decides")

    def _enumerate(self) -> None:
        """Fill every PG: list, peer by peer, the PGs where it costs at most t (a band of about
        m candidates per PG), for growing t, until a PG's candidates decide its holders.

        Within a band a PG's candidates are exactly the live peers costing at most t, so, sorted,
        they are an exact prefix of its preference list. In the first band, when every peer is
        its own zone, each PG keeps only its best R_eff + _SLACK candidates, in flat arrays,
        sorted as they come (the columns of _Base): sorting or grouping millions of candidates
        afterwards would cost more than drawing them. Other PGs take the exact path: all their
        candidates, into _over. Those still undecided after the last band are rescanned.
        """
        g, live, bits, seed = _geometry(self.bits), self._live, self.bits, self.seed
        n_pgs = 1 << bits
        width = self._r_eff + _SLACK
        stride, full = 2 * width, width + 1
        # costs and peers interleaved, so that a candidate costs one cache miss, not two; the
        # counts in a bytearray small enough to stay in cache
        slots: array[float] = array("d", bytes(8 * n_pgs * stride))
        seen = bytearray(n_pgs)
        tied: set[int] = set()
        open_ = bytearray(b"\x01") * n_pgs
        pending: dict[int, list[tuple[float, int]]] = {}   # undecided PGs' candidates so far
        weights = [p.weight for p in live]
        b, ma, mb = g.b, g.ma, g.mb
        t1, t2, t3, t4 = g.t1, g.t2, g.t3, g.t4
        inv_p, j16, j32, log1p = 2.0 ** -bits, 2.0 ** -16, 2.0 ** -_JITTER_BITS, math.log1p
        lo = -1.0
        for band, m in enumerate(_BANDS):
            hi = _threshold(weights, m)
            columns = band == 0 and self._distinct
            found: list[tuple[int, float, int]] = []
            add = found.append
            for i, p in enumerate(live):
                w = p.weight
                k1, k2, k3, c3, k4, c4 = _keys(seed, p.id.digest, bits)
                s0 = max(0, _strata_below(lo, w, bits) - 4)
                stop = _strata_below(hi, w, bits)
                # _undraw inlined, one run of strata with the same high half at a time (round 4
                # is then undone once per run): this loop is most of a build
                while s0 < stop:
                    high = s0 >> b
                    run_stop = min(stop, (high + 1) << b)
                    v4 = t4[high ^ k4] ^ c4
                    low_mask = v4 & mb
                    k3_run = low_mask ^ k3
                    x0 = (high << b) + v4 * j32     # every partial sum of x is exact: == _cost
                    for low in range(s0 & mb, run_stop - (high << b)):
                        v3 = t3[low ^ k3_run] ^ c3
                        left = high ^ (v3 & ma)
                        right = low ^ low_mask ^ t2[left ^ k2]
                        pg = ((left ^ t1[right ^ k1]) << b) | right
                        if not open_[pg]:
                            continue
                        cost = -log1p(-(x0 + low + v3 * j16) * inv_p) / w
                        if not lo < cost <= hi:
                            continue
                        if not columns:
                            add((pg, cost, i))
                            continue
                        # insert into the PG's sorted slots; peers come in index (= id) order,
                        # so a candidate of equal cost goes after, as ties rank by id
                        c = seen[pg]
                        first = pg * stride
                        if c < width:
                            seen[pg] = c + 1
                            j = first + c + c
                        else:
                            j = first + stride - 2
                            last = slots[j]
                            if cost >= last:
                                if cost == last:
                                    tied.add(pg)    # the bound would not separate them
                                continue
                            if c == width:
                                seen[pg] = full
                            if last == slots[j - 2]:
                                tied.add(pg)
                        while j > first and slots[j - 2] > cost:
                            slots[j] = slots[j - 2]
                            slots[j + 1] = slots[j - 1]
                            j -= 2
                        slots[j] = cost
                        slots[j + 1] = i
                    s0 = run_stop
            final = band == len(_BANDS) - 1
            if columns:
                self._base = _Base(live, width, slots, seen, hi)
                self._t_max = max(self._t_max, hi)
                need = width if not final else self._r_eff
                for pg in compress(count(), map(need.__gt__, seen)):
                    first = pg * stride
                    n = seen[pg]
                    pending[pg] = [(c, int(i)) for c, i in zip(slots[first:first + 2 * n:2],
                                                               slots[first + 1:first + 2 * n:2])]
                for pg in tied:
                    pending.pop(pg, None)
                    self._rescan(pg)
                open_ = bytearray(n_pgs)
                for pg in pending:
                    open_[pg] = 1
                continue_with = []          # they have too few candidates to settle
            else:
                for pg, cost, i in found:
                    pending.setdefault(pg, []).append((cost, i))
                if band == 0:
                    for pg in range(n_pgs):
                        pending.setdefault(pg, [])
                continue_with = list(pending)
            for pg in continue_with:
                ranked = pending[pg]
                ranked.sort()
                if self._settle_indexed(pg, ranked, hi, slack=not final):
                    del pending[pg]
                    open_[pg] = 0
            lo = hi
        for pg in pending:
            self._rescan(pg)

    def _settle_indexed(self, pg: int, ranked: list[tuple[float, int]], bound: float,
                        slack: bool) -> bool:
        """_store for (cost, index into self._live) pairs, best first."""
        live = self._live
        if self._distinct:
            # the common case, _store without _pick: every peer is its own zone
            r_eff = self._r_eff
            if len(ranked) < r_eff + (_SLACK if slack else 0):
                return False
            keep = r_eff + _SLACK
            if len(ranked) > keep + _SLACK:
                while keep < len(ranked) and ranked[keep][0] == ranked[keep - 1][0]:
                    keep += 1
                if keep < len(ranked):
                    ranked, bound = ranked[:keep], ranked[keep - 1][0]
            prefix = tuple([live[i] for _, i in ranked])
            self._over[pg] = (prefix, bound, prefix[:r_eff])
            self._t_max = max(self._t_max, bound)
            self._touched.add(pg)
            return True
        return self._store(pg, [(cost, live[i].id.digest, live[i]) for cost, i in ranked],
                           bound, slack)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector: a build makes ~10^6 objects that all live as long as the
    table, and the collector would rescan them again and again without finding garbage. Only
    delays collection; harmless if another thread builds at the same time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _threshold(weights: Sequence[float], m: float) -> float:
    """The cost t at which a PG expects m candidates: sum(1 - exp(-t·w)) = m (Newton from below,
    which a concave increasing function allows without overshooting)."""
    t = 0.0
    for _ in range(30):
        f = sum(-math.expm1(-t * w) for w in weights) - m
        df = sum(w * math.exp(-t * w) for w in weights)
        step = -f / df
        t += step
        if step <= t * 1e-9:
            break
    return t
