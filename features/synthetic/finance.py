"""Synthetic money transfers with planted laundering typologies.

Accounts (countries, currencies, activity, popularity, laundering pools, known cases) are built once;
transfers are generated chunk by chunk. Laundering shows only through amounts, timing, graph
structure and case history: normal traffic also has payroll fan-outs, popular merchants (fan-in),
quick relays, transfers just below the reporting threshold and traffic with high-risk countries,
on the same channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from features.synthetic import (
    DIGITS,
    SPAN_DAYS,
    START,
    cases_frame,
    choice,
    chunk_rng,
    decoded,
    entity_rng,
    sample_weighted,
    scrambled_ids,
    sequential_ids,
    stochastic_round,
    text,
    write_parquet,
    zipf_weights,
)

DAY, HOUR = 86_400, 3_600
THRESHOLD = 10_000.0
TYPOLOGY_WEIGHTS = {
    "structuring": 0.16, "fan_in": 0.16, "fan_out": 0.14, "cycle": 0.12, "pass_through": 0.14,
    "high_risk_corridor": 0.12, "mule": 0.16,
}
MEAN_SIZE = {"structuring": 5.5, "fan_in": 16.5, "fan_out": 16.5, "cycle": 4.0, "pass_through": 2.5,
             "high_risk_corridor": 2.0, "mule": 4.5}
COUNTRIES = {
    "US": 35, "GB": 12, "DE": 10, "FR": 7, "NL": 4, "ES": 4, "IT": 4, "JP": 4, "CN": 3, "IN": 3, "CA": 3,
    "AU": 2, "CH": 2, "SG": 2, "HK": 2, "MX": 2, "BR": 2, "AE": 1, "SE": 1, "PL": 1,
    "KY": 0.4, "PA": 0.4, "VG": 0.3, "BZ": 0.2, "SC": 0.2,
}
HIGH_RISK = ("KY", "PA", "VG", "BZ", "SC")
CURRENCY = {"US": "USD", "GB": "GBP", "DE": "EUR", "FR": "EUR", "NL": "EUR", "ES": "EUR", "IT": "EUR", "JP": "JPY",
            "CN": "CNY", "IN": "INR", "CA": "CAD", "AU": "AUD", "CH": "CHF", "SG": "SGD", "HK": "HKD", "MX": "MXN",
            "BR": "BRL", "AE": "AED", "SE": "SEK", "PL": "PLN", "KY": "USD", "PA": "USD", "VG": "USD", "BZ": "BZD",
            "SC": "SCR"}
UNITS = {"JPY": 110.0, "CNY": 7.0, "INR": 80.0, "HKD": 7.8, "MXN": 18.0, "BRL": 5.0, "AED": 3.7, "SEK": 10.0,
         "PLN": 4.0, "BZD": 2.0, "SCR": 14.0}  # currency units per "dollar"; others 1
DOMESTIC_CHANNELS = {"card": 30, "ach": 25, "mobile": 22, "wire": 10, "cash": 8, "check": 5}
INTERNATIONAL_CHANNELS = {"wire": 80, "mobile": 10, "ach": 10}
SALT_ACCOUNT = 424_242


def _expand(rng: np.random.Generator, m: int, kmin: int, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance index and position within the instance of every transfer of ``m`` instances."""
    k = rng.integers(kmin, kmax + 1, m)
    inst = np.repeat(np.arange(m), k)
    pos = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    return inst, pos


class FinanceGenerator:
    """Transfers generator: accounts at construction, transfers per chunk."""

    table = "transactions"

    def __init__(self, rows: int, seed: int, positive_rate: float):
        self.seed, self.p, self.rows = seed, positive_rate, rows
        rng = entity_rng(seed)
        self._accounts(rng, rows)
        self._pools(rng, rows)
        self.flagged = np.zeros(self.n_acc, bool)

    # ------------------------------------------------------------------------------------ entities

    def _accounts(self, rng: np.random.Generator, rows: int) -> None:
        n = self.n_acc = int(np.clip(rows // 15, 500, 2_000_000))
        self.country_names = np.array(list(COUNTRIES), dtype=object)
        w = np.array(list(COUNTRIES.values()), float)
        self.country = rng.choice(len(w), size=n, p=w / w.sum())
        self.country[: 5 * len(w)] = np.repeat(np.arange(len(w)), 5)  # every country has a few accounts
        self.currency_names = np.array([CURRENCY[c] for c in self.country_names], dtype=object)
        self.currency = self.currency_names[self.country]
        self.unit = np.array([UNITS.get(c, 1.0) for c in self.currency])
        self.business = rng.random(n) < 0.1
        self.scale = rng.lognormal(0.0, 0.5, n)
        send = rng.lognormal(0.0, 1.0, n) * np.where(self.business, 3.0, 1.0)
        self.send_cw = np.cumsum(send)
        recv = zipf_weights(rng, n, 0.8) * np.where(self.business, 10.0, 1.0)
        self.recv_cw = np.cumsum(recv)
        self.by_country = []
        for k in range(len(self.country_names)):
            idx = np.flatnonzero(self.country == k)
            self.by_country.append((idx, np.cumsum(recv[idx]), np.cumsum(send[idx])))
        self.high_risk = np.isin(self.country_names[self.country], HIGH_RISK)
        self.ids = scrambled_ids(np.arange(n), SALT_ACCOUNT, width=12, alphabet=DIGITS)
        self.opened = START - pd.to_timedelta(rng.integers(30, 3650, n), unit="D")
        self.balance = rng.lognormal(7.0, 1.5, n).round(2)

    def _pools(self, rng: np.random.Generator, rows: int) -> None:
        """Laundering pools (ordinary accounts with ordinary activity too) and the history of cases."""
        n = self.n_acc
        normal = rng.permutation(np.flatnonzero(~self.high_risk))
        n_ctrl, n_mule = max(10, n // 100), max(40, n // 20)
        self.controllers = normal[:n_ctrl]
        self.mules = normal[n_ctrl:n_ctrl + n_mule]
        self.mules_by_country = [self.mules[self.country[self.mules] == k] for k in range(len(self.country_names))]
        rest = normal[n_ctrl + n_mule:]
        both = np.concatenate([self.controllers, self.mules])
        self.smurfs = both[self.unit[both] == 1.0]
        self.dollar_like = np.flatnonzero((self.unit == 1.0) & ~self.high_risk)
        hr = rng.permutation(np.flatnonzero(self.high_risk))
        self.shells = hr[:max(1, int(len(hr) * 0.4))] if len(hr) else self.controllers
        expected = rows * self.p * TYPOLOGY_WEIGHTS["mule"] / MEAN_SIZE["mule"]
        n_known = int(np.clip(round(expected / 3), 3, len(self.mules) // 2))
        self.active_mules = self.mules[:n_known]
        reformed = rest[:n_known]
        self.known = np.concatenate([self.active_mules, reformed])
        per = 1 + rng.poisson(0.5, len(self.known))
        conf = np.repeat(self.known, per)
        clear = rng.choice(rest[n_known:], size=2 * len(conf))
        accts = np.concatenate([conf, clear])
        opened = rng.uniform(-365, -60, len(accts))
        closed = opened + rng.uniform(20, 50, len(accts))
        order = np.argsort(opened, kind="stable")
        outcome = np.array(["confirmed"] * len(conf) + ["cleared"] * len(clear), dtype=object)
        self.history = cases_frame(
            [f"H{i:08d}" for i in range(len(order))], ["account"] * len(order), decoded(self.ids[accts[order]]),
            START + pd.to_timedelta(opened[order].round(), unit="D"),
            START + pd.to_timedelta(closed[order].round(), unit="D"), outcome[order],
        )

    def _domestic(self, rng: np.random.Generator, src: np.ndarray) -> np.ndarray:
        """A receiving account in the same country as each ``src`` (by popularity)."""
        out = sample_weighted(rng, self.recv_cw, len(src))
        ctry = self.country[src]
        for k, (idx, cw, _) in enumerate(self.by_country):
            rows = np.flatnonzero(ctry == k)
            if len(rows) and len(idx):
                out[rows] = idx[sample_weighted(rng, cw, len(rows))]
        return out

    def _recruits(self, rng: np.random.Generator, n: int, anchor: np.ndarray | None = None) -> np.ndarray:
        """Pattern participants: half from the mule pool, half ordinary (unwitting or one-off) accounts;
        mostly from the country of ``anchor`` (the pattern's centre) when given."""
        out = np.where(rng.random(n) < 0.5, rng.choice(self.mules, size=n), sample_weighted(rng, self.send_cw, n))
        if anchor is None:
            return out
        local = rng.random(n) < 0.85
        ctry = self.country[anchor]
        for k, (idx, _, send_cw) in enumerate(self.by_country):
            rows = np.flatnonzero(local & (ctry == k))
            if not len(rows) or not len(idx):
                continue
            pool = self.mules_by_country[k]
            general = idx[sample_weighted(rng, send_cw, len(rows))]
            from_pool = rng.choice(pool, size=len(rows)) if len(pool) else general
            out[rows] = np.where(rng.random(len(rows)) < 0.5, from_pool, general)
        return out

    # ------------------------------------------------------------------------------------ events

    def chunk(self, index: int, n_chunks: int, n: int, offset: int) -> pa.Table:
        """Transfers of chunk ``index`` (its slice of time), planted laundering included."""
        rng = chunk_rng(self.seed, index)
        total = SPAN_DAYS * DAY
        lo, hi = total * index // n_chunks, total * (index + 1) // n_chunks
        parts = self._patterns(rng, n, lo, hi)
        planted = sum(len(p["src"]) for p in parts)
        while planted > n:  # tiny chunks: drop whole patterns
            planted -= len(parts.pop()["src"])
        parts += self._background(rng, n - planted, lo, hi)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in ("src", "tgt", "amount", "t", "channel", "typology")}
        same = cols["src"] == cols["tgt"]
        cols["tgt"][same] = (cols["tgt"][same] + 1) % self.n_acc
        t = np.clip(np.floor(cols["t"]), lo, hi - 1).astype(np.int64)
        order = np.lexsort((rng.random(len(t)), t))
        fraud = cols["typology"] != ""
        self.flagged[cols["src"][fraud]] = True
        self.flagged[cols["tgt"][fraud]] = True
        return self._assemble({k: v[order] for k, v in cols.items()}, t[order], fraud[order], offset)

    def _assemble(self, c: dict[str, np.ndarray], t: np.ndarray, fraud: np.ndarray, offset: int) -> pa.Table:
        src, tgt = c["src"], c["tgt"]
        return pa.table({
            "transaction_id": text(sequential_ids(offset, len(t), 12)),
            "timestamp": pa.array(START.to_datetime64().astype("datetime64[ns]") + t.astype("timedelta64[s]")),
            "source_account": text(self.ids[src]),
            "target_account": text(self.ids[tgt]),
            "amount": pa.array(np.maximum(np.round(c["amount"], 2), 0.01)),  # a cent at least: the API refuses 0
            "currency": text(self.currency[src]),
            "channel": text(c["channel"]),
            "source_country": text(self.country_names[self.country[src]]),
            "target_country": text(self.country_names[self.country[tgt]]),
            "is_laundering": pa.array(fraud.astype(np.int8)),
            "typology": text(c["typology"], missing=~fraud),
        })

    def _times(self, rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
        """Uniform days, daytime-heavy time of day, inside ``[lo, hi)`` seconds."""
        return self._daytime(rng, rng.uniform(lo, hi, n), lo, hi)

    @staticmethod
    def _daytime(rng: np.random.Generator, t: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Move each time to a daytime-heavy time of its day (when that stays inside ``[lo, hi)``)."""
        n = len(t)
        tod = np.where(rng.random(n) < 0.85, rng.normal(13.5 * HOUR, 3.5 * HOUR, n), rng.uniform(0, DAY, n))
        shaped = np.floor(t / DAY) * DAY + np.clip(tod, 0, DAY - 1)
        return np.where((shaped >= lo) & (shaped < hi), shaped, t)

    @staticmethod
    def _part(src, tgt, amount, t, channel, typology: str = "") -> dict[str, np.ndarray]:
        n = len(src)
        return {"src": np.asarray(src, np.int64), "tgt": np.asarray(tgt, np.int64), "amount": np.asarray(amount, float),
                "t": np.asarray(t, float), "channel": np.broadcast_to(np.asarray(channel, dtype=object), (n,)).copy(),
                "typology": np.full(n, typology, dtype=object)}

    def _background(self, rng: np.random.Generator, n: int, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        parts = []
        # payroll: a business pays 10-40 employees at once (normal fan-out)
        n_pay = stochastic_round(rng, 0.02 * n / 25)
        inst, _ = _expand(rng, n_pay, 10, 40)
        inst = inst[: max(0, n // 4)]
        if len(inst):
            payer = rng.choice(np.flatnonzero(self.business), size=n_pay)[inst]
            start = self._times(rng, n_pay, lo, hi)[inst]
            amount = np.clip(rng.normal(3000, 900, len(inst)), 500, None) * self.unit[payer]
            when = start + rng.uniform(0, 600, len(inst))
            parts.append(self._part(payer, self._domestic(rng, payer), amount.round(), when, "ach"))
        # relays: money in, most of it out again within hours (family, bills)
        n_rel = stochastic_round(rng, 0.003 * n)
        n_rel = min(n_rel, max(0, (n - sum(len(p["src"]) for p in parts)) // 2))
        if n_rel:
            hub = sample_weighted(rng, self.send_cw, n_rel)
            x = rng.lognormal(6.5, 1.0, n_rel) * self.unit[hub]
            t0 = self._times(rng, n_rel, lo, hi)
            ch = choice(rng, {"mobile": 4, "ach": 3, "wire": 3}, 2 * n_rel)
            parts.append(self._part(self._domestic(rng, hub), hub, x, t0, ch[:n_rel]))
            parts.append(self._part(hub, self._domestic(rng, hub), x * rng.uniform(0.5, 1.0, n_rel),
                                    t0 + rng.uniform(1, 20, n_rel) * HOUR, ch[n_rel:]))
        m = n - sum(len(p["src"]) for p in parts)
        src = sample_weighted(rng, self.send_cw, m)
        domestic = rng.random(m) < 0.82
        tgt = np.where(domestic, self._domestic(rng, src), sample_weighted(rng, self.recv_cw, m))
        international = self.country[src] != self.country[tgt]
        amount = rng.lognormal(np.where(self.business[src], 6.8, 4.2), 1.2) * self.scale[src] * self.unit[src]
        large = rng.random(m) < np.where(self.business[src], 0.25, 0.04)  # invoices, rent, cars, savings
        amount[large] = rng.lognormal(8.8, 1.0, int(large.sum())) * self.unit[src[large]]
        near = (rng.random(m) < 0.003) & (self.unit[src] == 1.0)  # honest payments just below the threshold
        amount[near] = rng.uniform(9000, THRESHOLD - 1, int(near.sum()))
        amount = np.where(rng.random(m) < 0.25, np.round(amount), amount)
        channel = np.where(international, choice(rng, INTERNATIONAL_CHANNELS, m), choice(rng, DOMESTIC_CHANNELS, m))
        big = large & ~international
        channel[big] = choice(rng, {"wire": 45, "ach": 40, "check": 10, "mobile": 5}, int(big.sum()))
        parts.append(self._part(src, tgt, amount, self._times(rng, m, lo, hi), channel))
        return parts

    # ------------------------------------------------------------------------------------ typologies

    def _starts(self, rng, m: int, lo: int, hi: int, dur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start times keeping ``[start, start + dur)`` inside the chunk, and a squeeze factor when too long."""
        room = hi - lo
        squeeze = np.minimum(1.0, room / np.maximum(dur, 1.0))
        start = lo + rng.random(m) * np.maximum(room - dur * squeeze, 0.0)
        return start, squeeze

    def _patterns(self, rng: np.random.Generator, n: int, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
        parts = []
        for typ, w in TYPOLOGY_WEIGHTS.items():
            m = stochastic_round(rng, n * self.p * w / MEAN_SIZE[typ])
            if m:
                parts.append(getattr(self, f"_{typ}")(rng, m, lo, hi))
        return parts

    def _windowed(self, rng, m, lo, hi, kmin, kmax, days) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``m`` instances of ``kmin..kmax`` transfers spread over ``U(*days)`` days each."""
        inst, pos = _expand(rng, m, kmin, kmax)
        dur = rng.uniform(*days, m) * DAY
        start, squeeze = self._starts(rng, m, lo, hi, dur)
        t = start[inst] + rng.random(len(inst)) * dur[inst] * squeeze[inst]
        # same daytime-heavy clock as normal traffic (the order inside these patterns does not matter)
        return inst, pos, self._daytime(rng, t, lo, hi)

    def _bosses(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Accounts at the centre of a pattern: often a controller, sometimes a first-time one."""
        general = sample_weighted(rng, self.send_cw, n)
        return np.where(rng.random(n) < 0.6, rng.choice(self.controllers, size=n), general)

    def _structuring(self, rng, m, lo, hi):
        """Several transfers just below the reporting threshold from one account within days."""
        inst, _, t = self._windowed(rng, m, lo, hi, 3, 8, (1, 5))
        s = np.where(rng.random(m) < 0.5, rng.choice(self.smurfs, size=m), rng.choice(self.dollar_like, size=m))
        targets = self._domestic(rng, np.repeat(s, 2)).reshape(m, 2)
        tgt = targets[inst, (rng.random(len(inst)) < 0.4).astype(int)]
        amount = rng.uniform(8000, THRESHOLD - 10, len(inst))
        amount = np.where(rng.random(len(inst)) < 0.5, np.round(amount, -1), amount)
        channel = choice(rng, {"cash": 45, "ach": 20, "mobile": 15, "wire": 20}, len(inst))
        return self._part(s[inst], tgt, amount, t, channel, "structuring")

    def _fan_in(self, rng, m, lo, hi):
        """Many accounts send to one within a short window."""
        inst, _, t = self._windowed(rng, m, lo, hi, 8, 25, (0.5, 3))
        tgt = self._bosses(rng, m)[inst]
        src = self._recruits(rng, len(inst), anchor=tgt)
        amount = rng.uniform(500, 5000, len(inst)) * self.unit[src]
        channel = choice(rng, {"mobile": 40, "ach": 30, "wire": 30}, len(inst))
        return self._part(src, tgt, amount, t, channel, "fan_in")

    def _fan_out(self, rng, m, lo, hi):
        """One account sends to many within a short window."""
        inst, _, t = self._windowed(rng, m, lo, hi, 8, 25, (0.5, 3))
        src = self._bosses(rng, m)[inst]
        k = np.bincount(inst, minlength=m)
        total = rng.lognormal(10.5, 0.7, m)
        amount = (total / np.maximum(k, 1))[inst] * rng.uniform(0.7, 1.3, len(inst)) * self.unit[src]
        channel = choice(rng, {"wire": 50, "ach": 30, "mobile": 20}, len(inst))
        return self._part(src, self._recruits(rng, len(inst), anchor=src), amount, t, channel, "fan_out")

    def _cycle(self, rng, m, lo, hi):
        """Round-tripping A -> B -> ... -> A within days, a little lost at each hop."""
        inst, pos = _expand(rng, m, 3, 5)
        k = np.bincount(inst, minlength=m)
        first = np.cumsum(k) - k
        boss = self._bosses(rng, m)
        members = self._recruits(rng, len(inst), anchor=boss[inst])
        members[first] = boss
        nxt = np.where(pos + 1 < k[inst], np.arange(len(inst)) + 1, first[inst])
        for _ in range(100):  # no self-transfers inside a loop
            clash = np.flatnonzero(members == members[nxt])
            if not len(clash):
                break
            members[clash] = self._recruits(rng, len(clash), anchor=members[clash])
        gaps = rng.uniform(2, 36, len(inst)) * HOUR
        elapsed = np.cumsum(gaps) - np.repeat((np.cumsum(gaps) - gaps)[first], k)
        dur = np.bincount(inst, weights=gaps, minlength=m)
        start, squeeze = self._starts(rng, m, lo, hi, dur)
        t = start[inst] + (elapsed - gaps) * squeeze[inst]
        decay = rng.uniform(0.93, 0.99, len(inst)) ** pos
        amount = rng.lognormal(9.5, 0.8, m)[inst] * decay * self.unit[members]
        channel = choice(rng, {"wire": 60, "ach": 40}, len(inst))
        return self._part(members, members[nxt], amount, t, channel, "cycle")

    def _pass_through(self, rng, m, lo, hi):
        """Money lands in an account and leaves within hours."""
        p = self._recruits(rng, m)
        src = self._recruits(rng, m, anchor=p)
        src = np.where(src == p, (src + 1) % self.n_acc, src)  # the money comes from someone else
        x = rng.lognormal(9.8, 0.9, m)
        dur = 12 * HOUR * np.ones(m)
        t0, squeeze = self._starts(rng, m, lo, hi, dur)
        two = rng.random(m) < 0.5
        outs = np.concatenate([np.arange(m), np.flatnonzero(two)])
        share = np.where(two, 0.5, 1.0)[outs] * rng.uniform(0.9, 0.99, len(outs))
        dest = np.where(rng.random(len(outs)) < 0.3, sample_weighted(rng, self.recv_cw, len(outs)),
                        self._domestic(rng, p[outs]))
        dest = np.where(dest == p[outs], (dest + 1) % self.n_acc, dest)
        parts = [self._part(src, p, x * self.unit[src], t0, "wire", "pass_through"),
                 self._part(p[outs], dest, x[outs] * share * self.unit[p[outs]],
                            t0[outs] + rng.uniform(0.5, 12, len(outs)) * HOUR * squeeze[outs],
                            choice(rng, {"wire": 70, "mobile": 30}, len(outs)), "pass_through")]
        return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}

    def _high_risk_corridor(self, rng, m, lo, hi):
        """Large transfers to/from accounts in a few high-risk countries."""
        inst, _, t = self._windowed(rng, m, lo, hi, 1, 3, (1, 7))
        pool = np.concatenate([self.controllers, self.mules])
        dom = np.where(rng.random(m) < 0.5, rng.choice(pool, size=m), sample_weighted(rng, self.send_cw, m))
        dom = np.where(self.high_risk[dom], rng.choice(pool, size=m), dom)
        shell = rng.choice(self.shells, size=m)
        out = rng.random(len(inst)) < 0.6
        src = np.where(out, dom[inst], shell[inst])
        tgt = np.where(out, shell[inst], dom[inst])
        amount = rng.lognormal(9.2, 1.0, len(inst)) * self.unit[src]
        channel = choice(rng, {"wire": 85, "ach": 15}, len(inst))
        return self._part(src, tgt, amount, t, channel, "high_risk_corridor")

    def _mule(self, rng, m, lo, hi):
        """Accounts with earlier confirmed cases collect funds and forward them (often to other known accounts)."""
        inst, _ = _expand(rng, m, 2, 5)
        mule = rng.choice(self.active_mules, size=m)
        dur = rng.uniform(0.5, 2, m) * DAY + 24 * HOUR
        start, squeeze = self._starts(rng, m, lo, hi, dur)
        t_in = start[inst] + rng.random(len(inst)) * (dur[inst] - 24 * HOUR) * squeeze[inst]
        src = self._recruits(rng, len(inst), anchor=mule[inst])
        x = rng.uniform(300, 3000, len(inst))
        last = np.maximum.reduceat(t_in, np.cumsum(np.bincount(inst, minlength=m)) - np.bincount(inst, minlength=m))
        dest = np.where(rng.random(m) < 0.5, rng.choice(self.known, size=m), rng.choice(self.controllers, size=m))
        dest = np.where(dest == mule, rng.choice(self.controllers, size=m), dest)
        fwd = np.bincount(inst, weights=x, minlength=m) * rng.uniform(0.85, 0.97, m) * self.unit[mule]
        parts = [self._part(src, mule[inst], x * self.unit[src], t_in, choice(rng, {"mobile": 5, "ach": 3, "wire": 2},
                                                                                   len(inst)), "mule"),
                 self._part(mule, dest, fwd, last + rng.uniform(1, 24, m) * HOUR * squeeze, "wire", "mule")]
        return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}

    def finish(self, out_dir: Path) -> None:
        """Write the accounts (``is_fraud`` for accounts in planted patterns) and the history of cases."""
        out = Path(out_dir)
        accounts = pd.DataFrame({
            "account_id": pd.array(decoded(self.ids), dtype="string"),
            "country": pd.array(self.country_names[self.country], dtype="string"),
            "opened_at": self.opened.astype("datetime64[ns]"),
            "init_balance": self.balance,
            "is_fraud": pd.array(self.flagged.astype(np.int8), dtype="Int8"),
        })
        write_parquet(accounts, out / "accounts.parquet")
        write_parquet(self.history, out / "cases.parquet")
