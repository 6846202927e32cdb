"""Point-in-time graph features of the transfer network: closed cycles and links to confirmed accounts.

Both specs follow the protocol of :class:`features.engine.Agg` (``name``, ``source``, ``qkeys``,
``columns()``, ``batch(sources, query)``, ``online()``) and only use edges whose *first contact*
happened strictly before the query time and cases closed strictly before it.

* :class:`Cycle`: does the transfer ``s -> d`` close a 3-cycle, i.e. was there a path ``d -> x -> s``?
* :class:`ConfirmedLinks`: counterparties with a confirmed case (1-hop) and counterparties that are
  themselves linked to another confirmed account (2-hop).

Batch executors are vectorised joins over the first-contact edge table; online executors keep
adjacency dicts and answer a query without scanning history. Self-transfers are not edges.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd

T_COL = "_t"
INF = np.iinfo(np.int64).max
_SPAN = np.int64(1) << np.int64(31)
_CHUNK = 4_000_000  # 2-hop paths materialised at once in the batch join


def _codes(*cols: pd.Series) -> tuple[list[np.ndarray], int]:
    """Shared integer codes of several id columns (-1 = missing) and the number of distinct ids."""
    both = pd.concat([c.astype(object) for c in cols], ignore_index=True)
    codes, uniques = pd.factorize(both, use_na_sentinel=True)
    codes = codes.astype(np.int64)
    bounds = np.cumsum([0, *(len(c) for c in cols)])
    return [codes[a:b] for a, b in pairwise(bounds)], len(uniques)


def _objects(values: pd.Series) -> list:
    """Python objects of a column, None for missing values."""
    return values.to_numpy(dtype=object, na_value=None).tolist()


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _before(skey: np.ndarray, st: np.ndarray, qkey: np.ndarray, qt: np.ndarray):
    """For each query (key, t): number of source rows with that key and time < t, latest and earliest time."""
    n = len(qkey)
    if not len(skey):
        return np.zeros(n), np.full(n, np.nan), np.full(n, np.nan)
    uniq, dense = np.unique(skey, return_inverse=True)
    pos = np.clip(np.searchsorted(uniq, qkey), 0, len(uniq) - 1)
    qdense = np.where((uniq[pos] == qkey) & (qkey >= 0), pos, -1)
    t0 = min(int(st.min()), int(qt.min())) - 1 if len(qt) else int(st.min()) - 1  # offsets stay < _SPAN
    order = np.lexsort((st, dense))
    sts = st[order]
    comb = dense[order] * _SPAN + (sts - t0)
    base = np.maximum(qdense, 0) * _SPAN
    hi = np.searchsorted(comb, base + (qt - t0), side="left")
    lo = np.searchsorted(comb, base, side="left")
    has = (hi > lo) & (qdense >= 0)
    count = np.where(qdense >= 0, hi - lo, 0).astype(np.float64)
    last = np.where(has, sts[np.clip(hi - 1, 0, None)], np.nan)
    first = np.where(has, sts[np.clip(lo, 0, len(sts) - 1)], np.nan)
    return count, last, first


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _rank(group: np.ndarray) -> np.ndarray:
    """0-based position of each row within its group, in row order."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    within = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    rank = np.empty(len(g), np.int64)
    rank[order] = within
    return rank


def first_contacts(src: np.ndarray, dst: np.ndarray, t: np.ndarray, n: int):
    """Directed first-contact edges ``(a, b, t_ab)`` in creation order (time, then row order; no self-loops)."""
    ok = np.flatnonzero((src >= 0) & (dst >= 0) & (src != dst))
    order = ok[np.argsort(t[ok], kind="stable")]
    _, first = np.unique(src[order] * n + dst[order], return_index=True)
    idx = order[np.sort(first)]
    return src[idx], dst[idx], t[idx]


@dataclass(frozen=True)
class Cycle:
    """Does a transfer ``s -> d`` at ``t`` close a 3-cycle: a path ``d -> x -> s`` established before ``t``.

    Columns: ``<name>_n`` (distinct intermediates ``x`` whose path time ``max(t_dx, t_xs) < t``, with
    first-contact edge times), ``<name>_since_last`` / ``<name>_since_first`` (seconds since the newest /
    oldest such path formed; NaN without one). Hubs are bounded: an edge ``a -> b`` may be the first leg
    only if ``a`` was among ``b``'s first ``max_rank`` distinct senders, and ``b -> c`` the second leg only
    if ``c`` was among ``b``'s first ``max_rank`` distinct receivers (ranked by first-contact time, then row
    order), identically in batch and online, whatever order the online state receives the transfers in.
    """

    name: str
    source: str = "events"
    edge: tuple[str, str] = ("source_account", "target_account")
    max_rank: int = 50

    @property
    def qkeys(self) -> tuple[str, ...]:
        return self.edge

    def columns(self) -> list[str]:
        return [f"{self.name}_n", f"{self.name}_since_last", f"{self.name}_since_first"]

    def paths(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame):
        """2-hop paths ``a -> b -> c`` closing a queried edge ``c -> a``: codes of ``a``, ``c``, path time."""
        ev = sources[self.source]
        s_col, d_col = self.edge
        (es, ed, qs, qd), n = _codes(ev[s_col], ev[d_col], query[s_col], query[d_col])
        a, b, t = first_contacts(es, ed, ev[T_COL].to_numpy(np.int64), n)
        in_rank, out_rank = _rank(b), _rank(a)
        qpair = np.unique(qs[(qs >= 0) & (qd >= 0)] * n + qd[(qs >= 0) & (qd >= 0)])
        has_in = np.zeros(n, bool)
        has_in[qd[qd >= 0]] = True  # first leg must start at a queried receiver
        has_out = np.zeros(n, bool)
        has_out[qs[qs >= 0]] = True  # second leg must end at a queried sender
        leg1 = np.flatnonzero((in_rank < self.max_rank) & has_in[a])
        leg1 = leg1[np.argsort(b[leg1], kind="stable")]
        leg2 = np.flatnonzero((out_rank < self.max_rank) & has_out[b])
        leg2 = leg2[np.argsort(a[leg2], kind="stable")]
        count2 = np.bincount(a[leg2], minlength=n)
        start2 = np.cumsum(count2) - count2
        rep = count2[b[leg1]]
        out_a, out_c, out_t = [], [], []
        ends = np.cumsum(rep)
        lo = 0
        while lo < len(leg1):
            hi = max(int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + _CHUNK, side="right")), lo + 1)
            r = rep[lo:hi]
            i1 = np.repeat(leg1[lo:hi], r)
            off = np.arange(int(r.sum())) - np.repeat(np.cumsum(r) - r, r)
            i2 = leg2[np.repeat(start2[b[leg1[lo:hi]]], r) + off]
            pa, pc = a[i1], b[i2]
            key = pc * n + pa
            pos = np.clip(np.searchsorted(qpair, key), 0, max(len(qpair) - 1, 0))
            keep = (pa != pc) & (qpair[pos] == key) if len(qpair) else np.zeros(len(key), bool)
            out_a.append(pa[keep])
            out_c.append(pc[keep])
            out_t.append(np.maximum(t[i1], t[i2])[keep])
            lo = hi
        return _cat(out_a), _cat(out_c), _cat(out_t), (qs, qd, n)

    def batch(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame) -> pd.DataFrame:
        pa, pc, pt, (qs, qd, n) = self.paths(sources, query)
        qkey = np.where((qs >= 0) & (qd >= 0), qd * n + qs, -1)
        qt = query[T_COL].to_numpy(np.int64)
        count, last, first = _before(pa * n + pc, pt, qkey, qt)
        cols = self.columns()
        return pd.DataFrame({cols[0]: count, cols[1]: qt - last, cols[2]: qt - first}, index=query.index)

    def online(self, shared: dict | None = None) -> OnlineCycle:
        return OnlineCycle(self)


_NOBODY = object()


def _first_k(first: list, node: object, t: int, moved: bool, k: int) -> tuple[bool, object]:
    """Put ``node``'s first contact at ``t`` into ``first`` (an account's first ``k`` contacts as ``(t, node)``,
    sorted by time, then arrival); ``moved``: it had a later first contact. Returns whether ``node`` is among the
    first ``k`` and the node it pushed out of them (:data:`_NOBODY` if none)."""
    if moved:
        for i, (_, other) in enumerate(first):
            if other == node:
                del first[i]
                break
    if len(first) >= k and t >= first[-1][0]:
        return False, _NOBODY
    insort(first, (t, node), key=lambda entry: entry[0])
    return True, (first.pop()[1] if len(first) > k else _NOBODY)


class OnlineCycle:
    """Online executor of :class:`Cycle`: first-contact adjacency with rank-capped leg indexes.

    Each account keeps its first ``max_rank`` distinct senders and receivers sorted by first-contact time (then
    arrival). An older edge arriving late (another replica's events, a backdated transfer) takes its place and
    pushes the last one out of the legs, so the legs are the batch ones whatever the arrival order.
    """

    def __init__(self, spec: Cycle):
        self.spec = spec
        self._out: dict[object, dict[object, int]] = defaultdict(dict)  # a -> {b: first contact}
        self._senders: dict[object, list] = defaultdict(list)  # b -> [(t, a)]: its first max_rank senders
        self._receivers: dict[object, list] = defaultdict(list)  # a -> [(t, b)]: its first max_rank receivers
        self._leg1: dict[object, dict[object, int]] = defaultdict(dict)  # a -> {b: t} usable as first leg
        self._leg2: dict[object, dict[object, int]] = defaultdict(dict)  # c -> {b: t} usable as second leg

    def ingest(self, rows: pd.DataFrame, t_col: str = T_COL) -> None:
        """Add transfers (in time order within the chunk, then row order)."""
        s_col, d_col = self.spec.edge
        ts = rows[t_col].to_numpy(np.int64)
        order = np.argsort(ts, kind="stable").tolist()
        src, dst, ts = _objects(rows[s_col]), _objects(rows[d_col]), ts.tolist()
        for i in order:
            s, d = src[i], dst[i]
            if not (_missing(s) or _missing(d) or s == d):
                self.add(s, d, ts[i])

    def add(self, s: object, d: object, t: int) -> None:
        """Add one transfer ``s -> d`` at ``t``."""
        out = self._out[s]
        prev = out.get(d)
        if prev is not None and t >= prev:
            return
        out[d] = t
        kept, dropped = _first_k(self._senders[d], s, t, prev is not None, self.spec.max_rank)
        if kept:
            self._leg1[s][d] = t
        if dropped is not _NOBODY:
            self._leg1[dropped].pop(d, None)
        kept, dropped = _first_k(self._receivers[s], d, t, prev is not None, self.spec.max_rank)
        if kept:
            self._leg2[d][s] = t
        if dropped is not _NOBODY:
            self._leg2[dropped].pop(s, None)

    def query(self, key: tuple, t: int) -> list[float]:
        s, d = key
        empty = [0.0, np.nan, np.nan]
        if _missing(s) or _missing(d) or s == d:
            return empty
        first_legs, second_legs = self._leg1.get(d), self._leg2.get(s)
        if not first_legs or not second_legs:
            return empty
        small, large = sorted((first_legs, second_legs), key=len)
        n, newest, oldest = 0, None, None
        for x, tx in small.items():
            ty = large.get(x)
            if ty is None:
                continue
            pt = max(tx, ty)
            if pt < t:
                n += 1
                newest = pt if newest is None else max(newest, pt)
                oldest = pt if oldest is None else min(oldest, pt)
        return [float(n), float(t - newest), float(t - oldest)] if n else empty


@dataclass(frozen=True)
class ConfirmedLinks:
    """Links of an account to accounts with confirmed cases, known from ``max(first contact, case close)``.

    For each query key column (``prefixes`` name them) the columns are ``<prefix>_<name>_1hop``: distinct
    counterparties ``x`` (either direction) whose link is known before ``t``, i.e.
    ``max(first_contact(a, x), confirmed_close(x)) < t``; and ``<prefix>_<name>_2hop``: distinct
    counterparties ``x`` linked (1-hop) to some confirmed ``y != a``, known from
    ``max(first_contact(a, x), link_time(x, y))``. Reads two sources: transfers and account cases.
    """

    name: str
    query_keys: tuple[str, ...] = ("source_account", "target_account")
    prefixes: tuple[str, ...] = ("src", "dst")
    sources: tuple[str, str] = ("events", "cases:account")
    edge: tuple[str, str] = ("source_account", "target_account")
    case_key: str = "entity_id"

    @property
    def source(self) -> tuple[str, str]:
        return self.sources

    @property
    def qkeys(self) -> tuple[str, ...]:
        return self.query_keys

    def columns(self) -> list[str]:
        return [f"{p}_{self.name}_{h}" for p in self.prefixes for h in ("1hop", "2hop")]

    def batch(self, sources: dict[str, pd.DataFrame], query: pd.DataFrame) -> pd.DataFrame:
        ev, cases = sources[self.sources[0]], sources[self.sources[1]]
        cases = cases[cases["confirmed"] > 0]
        s_col, d_col = self.edge
        codes, n = _codes(ev[s_col], ev[d_col], cases[self.case_key], *(query[k] for k in self.query_keys))
        es, ed, cc, qcodes = codes[0], codes[1], codes[2], codes[3:]
        et = ev[T_COL].to_numpy(np.int64)
        # undirected first contact, both orientations
        a, x, t = first_contacts(np.r_[es, ed], np.r_[ed, es], np.r_[et, et], n)
        conf = np.full(n, INF, np.int64)
        ok = cc >= 0
        np.minimum.at(conf, cc[ok], cases[T_COL].to_numpy(np.int64)[ok])
        m1 = conf[x] < INF
        l1_a, l1_x, l1_t = a[m1], x[m1], np.maximum(t[m1], conf[x[m1]])
        # the two earliest links of every account (to exclude the querying account from 2-hop)
        order = np.lexsort((l1_t, l1_a))
        ga, gx, gt = l1_a[order], l1_x[order], l1_t[order]
        starts = np.flatnonzero(np.r_[True, ga[1:] != ga[:-1]]) if len(ga) else np.zeros(0, np.int64)
        lt1, lt2, y1 = np.full(n, INF, np.int64), np.full(n, INF, np.int64), np.full(n, -1, np.int64)
        lt1[ga[starts]], y1[ga[starts]] = gt[starts], gx[starts]
        nxt = starts + 1
        two = nxt[(nxt < len(ga)) & (ga[np.clip(nxt, 0, max(len(ga) - 1, 0))] == ga[starts])]
        lt2[ga[two]] = gt[two]
        fl = np.where(y1[x] == a, lt2[x], lt1[x])
        m2 = fl < INF
        l2_a, l2_t = a[m2], np.maximum(t[m2], fl[m2])
        qt = query[T_COL].to_numpy(np.int64)
        out = {}
        cols = iter(self.columns())
        for qc in qcodes:
            out[next(cols)] = _before(l1_a, l1_t, qc, qt)[0]
            out[next(cols)] = _before(l2_a, l2_t, qc, qt)[0]
        return pd.DataFrame(out, index=query.index)

    def online(self, shared: dict | None = None) -> OnlineConfirmedLinks:
        return OnlineConfirmedLinks(self)


class OnlineConfirmedLinks:
    """Online executor of :class:`ConfirmedLinks`.

    All link times only ever decrease (first contacts and confirmed closes are minima), so each account
    keeps a sorted list of its 1-hop and 2-hop link times that is updated in place when edges or cases
    arrive; a query is two binary searches.
    """

    def __init__(self, spec: ConfirmedLinks):
        self.spec = spec
        self._nbr: dict[object, dict[object, int]] = defaultdict(dict)  # undirected first contact
        self._conf: dict[object, int] = {}  # earliest confirmed close
        self._l1: dict[tuple, int] = {}
        self._l2: dict[tuple, int] = {}
        self._l1_times: dict[object, list[int]] = defaultdict(list)
        self._l2_times: dict[object, list[int]] = defaultdict(list)
        self._top: dict[object, list[tuple[int, object]]] = {}  # two earliest (link time, counterparty)

    def ingest(self, rows: pd.DataFrame, t_col: str = T_COL, source: str | None = None) -> None:
        """Add transfers (``source`` = first source) or account cases (second source)."""
        ts = rows[t_col].to_numpy(np.int64).tolist()
        if source == self.spec.sources[1]:
            confirmed = (rows["confirmed"].to_numpy(np.float64) > 0).tolist()
            for key, t, ok in zip(_objects(rows[self.spec.case_key]), ts, confirmed, strict=True):
                if ok and not _missing(key):
                    self.add_case(key, t)
            return
        s_col, d_col = self.spec.edge
        for s, d, t in zip(_objects(rows[s_col]), _objects(rows[d_col]), ts, strict=True):
            if not (_missing(s) or _missing(d) or s == d):
                self.add_edge(s, d, t)

    def add_edge(self, a: object, x: object, t: int) -> None:
        """A transfer between ``a`` and ``x`` at ``t`` (either direction)."""
        if t >= self._nbr[a].get(x, INF):
            return
        self._nbr[a][x] = self._nbr[x][a] = t
        self._update_l1(a, x)
        self._update_l1(x, a)
        self._update_l2(a, x)
        self._update_l2(x, a)

    def add_case(self, x: object, t: int) -> None:
        """A confirmed case of ``x`` closed at ``t``."""
        if t >= self._conf.get(x, INF):
            return
        self._conf[x] = t
        for a in list(self._nbr.get(x, ())):
            self._update_l1(a, x)

    @staticmethod
    def _replace(times: list[int], old: int | None, new: int) -> None:
        if old is not None:
            del times[bisect_left(times, old)]
        insort(times, new)

    def _update_l1(self, a: object, x: object) -> None:
        close = self._conf.get(x)
        if close is None:
            return
        v = max(self._nbr[a][x], close)
        old = self._l1.get((a, x))
        if old is not None and v >= old:
            return
        self._l1[(a, x)] = v
        self._replace(self._l1_times[a], old, v)
        top = [(lt, y) for lt, y in self._top.get(a, ()) if y != x]
        new_top = sorted([*top, (v, x)], key=lambda e: e[0])[:2]
        if new_top != self._top.get(a):
            self._top[a] = new_top
            for b in list(self._nbr[a]):
                self._update_l2(b, a)

    def _update_l2(self, a: object, x: object) -> None:
        fl = next((lt for lt, y in self._top.get(x, ()) if y != a), None)
        if fl is None:
            return
        v = max(self._nbr[a][x], fl)
        old = self._l2.get((a, x))
        if old is not None and v >= old:
            return
        self._l2[(a, x)] = v
        self._replace(self._l2_times[a], old, v)

    def query(self, key: tuple, t: int) -> list[float]:
        out: list[float] = []
        for acc in key:
            if _missing(acc):
                out += [0.0, 0.0]
                continue
            l1, l2 = self._l1_times.get(acc, ()), self._l2_times.get(acc, ())
            out += [float(bisect_left(l1, t)), float(bisect_left(l2, t))]
        return out
