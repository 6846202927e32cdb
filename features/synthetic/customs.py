"""Synthetic customs declarations with planted fraud typologies.

Entities (importers, declarants, sellers, HS6 unit-price norms, known offenders and their history of
cases) are built once; declarations are generated chunk by chunk. A planted fraud only changes what
a real fraud would change (price, route, volume, who trades with whom); normal traffic also has
cheap shipments, transshipment via hubs, new importers and trade with flagged sellers.

Revenue (duty recoverable) = rate due % × true value − declared rate % × declared value, i.e.
tax_rate % × the under-declared amount, plus the preference wrongly claimed for origin misdeclaration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from features.synthetic import (
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

TYPOLOGY_WEIGHTS = {
    "undervaluation": 0.28, "origin_misdeclaration": 0.16, "new_importer_volume": 0.14,
    "repeat_offender": 0.14, "risky_hs_chapter": 0.14, "linked_entity": 0.14,
}
COUNTRIES = {
    "CN": 38, "US": 9, "JP": 9, "DE": 5, "VN": 5, "KR": 3, "IT": 3, "FR": 2, "TH": 2, "TW": 2, "IN": 2,
    "ID": 1.5, "MY": 1.5, "GB": 1.5, "NL": 1, "ES": 1, "AU": 1, "CA": 1, "CH": 1, "HK": 1, "PH": 1,
    "SG": 0.8, "BE": 0.8, "TR": 0.8, "BD": 0.8, "MX": 0.5, "BR": 0.5, "PL": 0.5, "PK": 0.5, "KH": 0.5,
    "RU": 0.5, "CL": 0.5, "NZ": 0.5, "SE": 0.5, "AT": 0.5, "DK": 0.4, "IE": 0.4, "AE": 0.3, "LK": 0.3,
    "MM": 0.3, "ZA": 0.3, "PE": 0.2, "NO": 0.2, "FI": 0.2, "CZ": 0.2, "HU": 0.2, "PT": 0.2, "IL": 0.2,
}
HUBS = {"HK": 30, "SG": 20, "NL": 12, "AE": 10, "BE": 8, "MY": 6, "DE": 5, "US": 5, "JP": 4}
FTA = {"CN": "FCN1", "US": "FUS1", "IN": "FIN1", "AU": "FAU1", "CA": "FCA1", "CL": "FCL1", "TR": "FTR1",
       "GB": "FGB1", "NZ": "FNZ1", "PE": "FPE1"}
FTA.update({c: "FEU1" for c in ("DE", "IT", "FR", "NL", "ES", "BE", "PL", "AT", "SE", "DK", "IE", "FI", "CZ",
                                "HU", "PT")})
FTA.update({c: "FAS1" for c in ("VN", "TH", "MY", "ID", "PH", "SG", "KH", "MM")})
COVER_ORIGINS = {"VN": 30, "MY": 20, "TH": 15, "ID": 12, "KH": 10, "IN": 8, "PH": 5}
FRAUD_HUBS = {"HK": 35, "SG": 25, "MY": 15, "AE": 10, "TW": 15}
EVASION_CHAPTERS = ("72", "73", "76", "85", "94", "40", "61", "62", "64")
RISKY_CANDIDATES = ("33", "42", "61", "62", "64", "71", "95", "24", "91", "22")
COMMON_CHAPTERS = ("39", "84", "85", "61", "62", "63", "73", "94", "95", "33", "90", "87", "40", "03", "08", "07",
                   "42", "64", "71", "72", "76", "96", "48", "44", "69", "70", "82", "83", "21", "19")
OFFICES = {str(o): w for o, w in zip(
    (40, 20, 30, 16, 13, 10, 33, 39, 11, 12, 14, 15, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31, 32,
     34, 35, 36, 37, 38, 41, 42, 43, 44, 45, 46, 47, 48, 49), 1.0 / np.arange(1, 41) ** 1.3, strict=True)}
PROCESS = {"B": 0.9995, "D": 0.0004, "A": 0.0001}
IMPORT_TYPE = {"11": 86, "87": 4, "94": 3.3, "15": 1.7, "89": 1.4, "29": 0.7, "88": 0.4, "83": 0.3, "21": 0.2}
IMPORT_USE = {"21": 91, "11": 4.6, "26": 2.1, "23": 0.7, "28": 0.5, "13": 0.2, "12": 0.2, "15": 0.15}
PAYMENT = {"11": 67, "43": 18.5, "18": 6.7, "14": 6, "0": 0.6, "13": 0.5, "21": 0.15, "33": 0.05}
TRANSPORT = {"10": 60, "40": 37, "50": 1.6, "30": 0.4, "90": 0.2, "20": 0.05}
INDICATOR = {"E": 28, "G": 23, "Y": 22, "B": 15, "S": 12}
BASE_RATES = {0.0: 20, 3.0: 6, 5.0: 6, 6.5: 10, 8.0: 30, 10.0: 6, 13.0: 10, 20.0: 5, 27.0: 4, 30.0: 3}
N_HS = 1500
BURST_SPACE = 1_000_000  # importer index range reserved per chunk for brand-new importers
SALT_IMPORTER, SALT_DECLARANT, SALT_SELLER, SALT_COURIER = 11, 2_027, 31_337, 99_991


def _country_table() -> tuple[np.ndarray, dict[str, int]]:
    names = sorted(set(COUNTRIES) | set(HUBS) | set(COVER_ORIGINS) | set(FRAUD_HUBS))
    return np.array(names, dtype=object), {c: i for i, c in enumerate(names)}


class CustomsGenerator:
    """Declarations generator: entity tables at construction, events per chunk."""

    table = "declarations"

    def __init__(self, rows: int, seed: int, positive_rate: float):
        self.seed, self.p = seed, positive_rate
        rng = entity_rng(seed)
        self.country_names, self.country_index = _country_table()
        self._countries(rng)
        self._hs_table(rng)
        self._entities(rng, rows)
        self._offenders(rng, rows)

    # ------------------------------------------------------------------------------------ entities

    def _countries(self, rng: np.random.Generator) -> None:
        ci = self.country_index
        self.origin_cw = np.zeros(len(self.country_names))
        for c, w in COUNTRIES.items():
            self.origin_cw[ci[c]] = w
        self.origin_cw = np.cumsum(self.origin_cw)
        self.fta = np.array([FTA.get(c, "") for c in self.country_names], dtype=object)
        self.hubs = np.array([ci[c] for c in HUBS])
        self.hub_p = np.array(list(HUBS.values()), float) / sum(HUBS.values())
        self.cover = np.array([ci[c] for c in COVER_ORIGINS])
        self.cover_p = np.array(list(COVER_ORIGINS.values()), float) / sum(COVER_ORIGINS.values())
        self.fraud_hubs = np.array([ci[c] for c in FRAUD_HUBS])
        self.fraud_hub_p = np.array(list(FRAUD_HUBS.values()), float) / sum(FRAUD_HUBS.values())

    def _hs_table(self, rng: np.random.Generator) -> None:
        chapters = np.array([f"{c:02d}" for c in range(1, 98) if c != 77], dtype=object)
        cw = rng.lognormal(0.0, 1.0, len(chapters)) * np.where(np.isin(chapters, COMMON_CHAPTERS), 8.0, 1.0)
        ch = chapters[rng.choice(len(chapters), size=4 * N_HS, p=cw / cw.sum())]
        codes = ch + np.char.zfill(rng.integers(100, 10_000, 4 * N_HS).astype(str), 4).astype(object)
        codes = pd.unique(codes)[:N_HS]
        self.hs_codes = np.asarray(codes, dtype=object)
        self.hs_chapter = np.array([c[:2] for c in self.hs_codes], dtype=object)
        ch_base = dict(zip(chapters, rng.normal(np.log(80.0), 1.2, len(chapters)), strict=True))
        self.hs_mu = np.array([ch_base[c] for c in self.hs_chapter]) + rng.normal(0.0, 0.8, N_HS)
        self.hs_sigma = rng.uniform(0.3, 0.6, N_HS)
        rates = np.array(list(BASE_RATES))
        self.hs_rate = rates[rng.choice(len(rates), size=N_HS, p=np.array(list(BASE_RATES.values())) / 100)]
        self.hs_cw = np.cumsum(zipf_weights(rng, N_HS, 0.9))
        present = [c for c in RISKY_CANDIDATES if (self.hs_chapter == c).sum() >= 5]
        risky = rng.choice(present, size=min(3, len(present)), replace=False)
        self.risky_chapters = tuple(sorted(str(c) for c in risky))
        self.risky_hs = np.flatnonzero(np.isin(self.hs_chapter, self.risky_chapters))
        self.evasion_hs = np.flatnonzero(np.isin(self.hs_chapter, EVASION_CHAPTERS) & (self.hs_rate >= 5))
        if not len(self.evasion_hs):
            self.evasion_hs = np.flatnonzero(self.hs_rate >= 5)

    def _entities(self, rng: np.random.Generator, rows: int) -> None:
        n_imp = self.n_imp = int(np.clip(rows // 6, 300, 3_000_000))
        self.n_dec = n_dec = int(np.clip(n_imp // 10, 40, 60_000))
        self.n_sel = n_sel = int(np.clip(n_imp * 4 // 5, 200, 2_500_000))
        self.n_cou = 80
        existing = rng.random(n_imp) < 0.7
        self.imp_entry = np.sort(np.where(existing, -1, rng.integers(0, SPAN_DAYS, n_imp)))
        self.imp_entry[0] = -1  # someone is always there on day one
        self.imp_cw = np.cumsum(zipf_weights(rng, n_imp, 0.5))
        self.dec_cw = np.cumsum(zipf_weights(rng, n_dec, 0.9))
        self.sel_cw = np.cumsum(zipf_weights(rng, n_sel, 0.6))
        self.cou_cw = np.cumsum(zipf_weights(rng, self.n_cou, 1.2))
        self.office_cw = np.cumsum(list(OFFICES.values()))
        self.imp_dec = sample_weighted(rng, self.dec_cw, n_imp)
        self.imp_sel = sample_weighted(rng, self.sel_cw, 3 * n_imp).reshape(n_imp, 3)
        self.imp_hs = sample_weighted(rng, self.hs_cw, 4 * n_imp).reshape(n_imp, 4)
        self.imp_origin = sample_weighted(rng, self.origin_cw, n_imp)
        self.imp_offset = rng.normal(0.0, 0.2, n_imp)
        self.imp_mass_mu = rng.normal(4.2, 1.3, n_imp)
        self.imp_courier = np.where(rng.random(n_imp) < 0.15, 0.9, 0.03)
        self.imp_noseller = np.where(rng.random(n_imp) < 0.1, 0.8, 0.03)

    def _offenders(self, rng: np.random.Generator, rows: int) -> None:
        """Known offenders (confirmed cases before the window), reformed ones, linked importers, history."""
        expected = rows * self.p * TYPOLOGY_WEIGHTS["repeat_offender"]
        n_off = int(np.clip(round(expected / 4), 3, self.n_imp // 20))
        pool = rng.permutation(np.flatnonzero(self.imp_entry < 0))
        self.active = pool[:n_off]
        reformed = pool[n_off:2 * n_off]
        known = np.concatenate([self.active, reformed])
        n_link = int(np.clip(2 * n_off, 3, self.n_imp // 10))
        self.linked = pool[2 * n_off:2 * n_off + n_link]
        link_to = known[rng.integers(0, len(known), n_link)]
        self.imp_sel[self.linked, 0] = self.imp_sel[link_to, 0]
        same_dec = rng.random(n_link) < 0.4
        self.imp_dec[self.linked[same_dec]] = self.imp_dec[link_to[same_dec]]
        self.imp_noseller[self.linked] = 0.03
        self.imp_noseller[known] = 0.03
        self.history = self._history_cases(rng, known)

    def _history_cases(self, rng: np.random.Generator, known: np.ndarray) -> pd.DataFrame:
        per = 1 + rng.poisson(0.7, len(known))
        conf = np.repeat(known, per)
        clear = rng.choice(np.flatnonzero(self.imp_entry < 0), size=3 * len(conf))
        imps = np.concatenate([conf, clear])
        outcome = np.array(["confirmed"] * len(conf) + ["cleared"] * len(clear), dtype=object)
        opened = rng.uniform(-365, -45, len(imps))
        closed = opened + rng.uniform(5, 40, len(imps))
        kinds, ids, op, cl, out = [], [], [], [], []
        for kind, ent, mask in (
            ("importer", decoded(scrambled_ids(imps, SALT_IMPORTER)), np.ones(len(imps), bool)),
            ("declarant", decoded(scrambled_ids(self.imp_dec[imps], SALT_DECLARANT)), rng.random(len(imps)) < 0.6),
            ("seller", decoded(scrambled_ids(self.imp_sel[imps, 0], SALT_SELLER)), rng.random(len(imps)) < 0.7),
        ):
            kinds += [kind] * int(mask.sum())
            ids.append(ent[mask])
            op.append(opened[mask])
            cl.append(closed[mask])
            out.append(outcome[mask])
        op_days, cl_days = np.concatenate(op), np.concatenate(cl)
        order = np.argsort(op_days, kind="stable")
        return cases_frame(
            [f"H{i:08d}" for i in range(len(order))], np.array(kinds, dtype=object)[order],
            np.concatenate(ids)[order], START + pd.to_timedelta(op_days[order].round(), unit="D"),
            START + pd.to_timedelta(cl_days[order].round(), unit="D"), np.concatenate(out)[order],
        )

    # ------------------------------------------------------------------------------------ events

    def _importers(self, rng: np.random.Generator, day: np.ndarray) -> np.ndarray:
        """Importers active on ``day`` (entered before), drawn by popularity."""
        k = np.searchsorted(self.imp_entry, day, side="right")
        u = rng.random(len(day)) * self.imp_cw[k - 1]
        return np.minimum(np.searchsorted(self.imp_cw, u, side="right"), k - 1)

    def _structure(self, rng: np.random.Generator, day: np.ndarray) -> dict[str, np.ndarray]:
        n = len(day)
        imp = self._importers(rng, day)
        dec = np.where(rng.random(n) < 0.85, self.imp_dec[imp], sample_weighted(rng, self.dec_cw, n))
        slot = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
        sel = np.where(rng.random(n) < 0.9, self.imp_sel[imp, slot], sample_weighted(rng, self.sel_cw, n))
        sel = np.where(rng.random(n) < self.imp_noseller[imp], -1, sel)
        courier = np.where(rng.random(n) < self.imp_courier[imp], sample_weighted(rng, self.cou_cw, n), -1)
        hs = np.where(rng.random(n) < 0.8, self.imp_hs[imp, rng.integers(0, 4, n)], sample_weighted(rng, self.hs_cw, n))
        origin = np.where(rng.random(n) < 0.7, self.imp_origin[imp], sample_weighted(rng, self.origin_cw, n))
        departure = origin.copy()
        via = rng.random(n) < 0.08  # legitimate transshipment through hubs
        departure[via] = rng.choice(self.hubs, size=int(via.sum()), p=self.hub_p)
        cover = rng.random(n) < 0.01  # legitimate goods from the same countries via the same hubs
        origin[cover] = rng.choice(self.cover, size=int(cover.sum()), p=self.cover_p)
        departure[cover] = rng.choice(self.fraud_hubs, size=int(cover.sum()), p=self.fraud_hub_p)
        return {
            "day": day, "imp": imp, "dec": dec, "sel": sel, "courier": courier, "hs": hs, "origin": origin,
            "departure": departure, "offset": self.imp_offset[imp], "mass_mu": self.imp_mass_mu[imp],
            "ratio": np.ones(n), "typology": np.full(n, "", dtype=object), "claim": np.zeros(n, bool),
        }

    def chunk(self, index: int, n_chunks: int, n: int, offset: int) -> pa.Table:
        """Declarations of chunk ``index`` (its slice of time), planted frauds included."""
        rng = chunk_rng(self.seed, index)
        d0, d1 = SPAN_DAYS * index / n_chunks, SPAN_DAYS * (index + 1) / n_chunks
        day = np.sort(np.floor(rng.uniform(d0, d1, n))).astype(np.int64)
        day = np.minimum(day, SPAN_DAYS - 1)
        s = self._structure(rng, day)
        free = np.ones(n, bool)
        counts = {t: stochastic_round(rng, n * self.p * w) for t, w in TYPOLOGY_WEIGHTS.items()}
        self._plant_bursts(rng, s, free, counts["new_importer_volume"], index, d0, d1)
        self._plant_rows(rng, s, free, counts)
        noise = free & (rng.random(n) < 0.015)  # discounts, samples, related-party prices: cheap but legal
        s["ratio"][noise] = rng.uniform(0.15, 0.5, int(noise.sum()))
        return self._assemble(rng, s, offset)

    def _pick(self, rng: np.random.Generator, free: np.ndarray, k: int, cand: np.ndarray | None = None) -> np.ndarray:
        pool = np.flatnonzero(free if cand is None else free & cand)
        rows = rng.choice(pool, size=min(k, len(pool)), replace=False) if k > 0 else pool[:0]
        free[rows] = False
        return rows

    def _plant_bursts(self, rng, s, free, k_rows, index, d0, d1) -> None:
        """New importers shipping abnormal volumes within weeks of their first declaration (and legit look-alikes)."""
        n_burst = stochastic_round(rng, k_rows / 12.0)
        for b in range(2 * n_burst):
            fraud = b < n_burst
            t0 = rng.uniform(d0, d1)
            a, z = np.searchsorted(s["day"], [t0, t0 + 21], side="left")
            window = a + np.flatnonzero(free[a:z])
            rows = rng.choice(window, size=min(int(rng.integers(6, 19)), len(window)), replace=False)
            free[rows] = False
            if not len(rows):
                continue
            new_imp = self.n_imp + index * BURST_SPACE + b
            s["imp"][rows] = new_imp
            s["dec"][rows] = sample_weighted(rng, self.dec_cw, 1)[0]
            s["sel"][rows] = sample_weighted(rng, self.sel_cw, 2)[rng.integers(0, 2, len(rows))]
            s["hs"][rows] = sample_weighted(rng, self.hs_cw, 2)[rng.integers(0, 2, len(rows))]
            s["origin"][rows] = s["departure"][rows] = sample_weighted(rng, self.origin_cw, 1)[0]
            s["courier"][rows] = -1
            s["offset"][rows] = 0.0
            s["mass_mu"][rows] = rng.normal(4.2, 0.8) + (np.log(rng.uniform(5, 25)) if fraud else
                                                        np.log(rng.uniform(1.5, 5)))
            if fraud:
                s["ratio"][rows] = rng.uniform(0.4, 0.85, len(rows))
                s["typology"][rows] = "new_importer_volume"

    def _plant_rows(self, rng, s, free, counts) -> None:
        tax = self.hs_rate[s["hs"]] > 0
        rows = self._pick(rng, free, counts["undervaluation"], tax)
        s["ratio"][rows] = rng.uniform(0.1, 0.4, len(rows))
        s["typology"][rows] = "undervaluation"

        rows = self._pick(rng, free, counts["origin_misdeclaration"])
        s["hs"][rows] = rng.choice(self.evasion_hs, size=len(rows))
        s["origin"][rows] = rng.choice(self.cover, size=len(rows), p=self.cover_p)
        dep = rng.choice(self.fraud_hubs, size=len(rows), p=self.fraud_hub_p)
        s["departure"][rows] = np.where(dep == s["origin"][rows], self.country_index["HK"], dep)
        s["claim"][rows] = True
        s["ratio"][rows] = rng.uniform(0.6, 0.95, len(rows))
        s["typology"][rows] = "origin_misdeclaration"

        rows = self._pick(rng, free, counts["repeat_offender"])
        off = self.active[rng.integers(0, len(self.active), len(rows))]
        self._as_importer(rng, s, rows, off, seller_slot0=0.7)
        s["ratio"][rows] = rng.uniform(0.3, 0.85, len(rows))
        s["typology"][rows] = "repeat_offender"

        k = counts["risky_hs_chapter"]
        rows = self._pick(rng, free, k, np.isin(s["hs"], self.risky_hs))
        extra = self._pick(rng, free, k - len(rows))
        s["hs"][extra] = rng.choice(self.risky_hs, size=len(extra))
        rows = np.concatenate([rows, extra])
        s["ratio"][rows] = rng.uniform(0.45, 0.9, len(rows))
        s["typology"][rows] = "risky_hs_chapter"

        rows = self._pick(rng, free, counts["linked_entity"])
        link = self.linked[rng.integers(0, len(self.linked), len(rows))]
        self._as_importer(rng, s, rows, link, seller_slot0=0.9)
        s["ratio"][rows] = rng.uniform(0.3, 0.85, len(rows))
        s["typology"][rows] = "linked_entity"

    def _as_importer(self, rng, s, rows, imp, seller_slot0: float) -> None:
        """Rewrite ``rows`` as declarations of importers ``imp`` (their declarant, seller, goods)."""
        n = len(rows)
        s["imp"][rows] = imp
        s["dec"][rows] = np.where(rng.random(n) < 0.85, self.imp_dec[imp], s["dec"][rows])
        slot = np.where(rng.random(n) < seller_slot0, 0, rng.integers(1, 3, n))
        s["sel"][rows] = self.imp_sel[imp, slot]
        s["hs"][rows] = self.imp_hs[imp, rng.integers(0, 4, n)]
        s["offset"][rows] = self.imp_offset[imp]
        s["mass_mu"][rows] = self.imp_mass_mu[imp]

    def _assemble(self, rng: np.random.Generator, s: dict[str, np.ndarray], offset: int) -> pa.Table:
        n = len(s["day"])
        hs, origin = s["hs"], s["origin"]
        base = self.hs_rate[hs]
        fta = self.fta[origin]
        use_fta = ((fta != "") & (rng.random(n) < 0.55)) | s["claim"]
        general = rng.random(n) < 0.6
        tax_type = np.where(use_fta, fta, np.where(general, "A", "C"))
        rate = np.where(use_fta, np.round(base * rng.choice([0.0, 0.0, 0.5], size=n), 1),
                        np.where(general, base, np.round(base * 0.8, 1)))
        rate = np.where(s["claim"], 0.0, rate)
        mass = np.maximum(np.round(np.exp(rng.normal(s["mass_mu"], 1.3)), 1), 0.1)
        unit = np.exp(self.hs_mu[hs] + s["offset"] + rng.normal(0.0, self.hs_sigma[hs]))
        true_value = unit * mass
        price = np.round(true_value * s["ratio"], 1)
        fraud = s["typology"] != ""
        due = np.where(s["claim"], base, rate)
        revenue = np.where(fraud, np.maximum(due / 100 * true_value - rate / 100 * price, 0.0), 0.0).round(1)
        critical = np.where(fraud, np.where((s["ratio"] < 0.2) | (rng.random(n) < 0.05), 2, 1), 0)
        courier, sel = s["courier"], s["sel"]
        mode = np.where(courier >= 0, "40", choice(rng, TRANSPORT, n))
        office_keys = np.array(list(OFFICES), dtype=object)
        date = (START.to_datetime64().astype("datetime64[D]") + s["day"]).astype("datetime64[ns]")
        return pa.table({
            "declaration_id": text(sequential_ids(offset, n, 10)),
            "date": pa.array(date),
            "office_id": text(office_keys[sample_weighted(rng, self.office_cw, n)]),
            "process_type": text(choice(rng, PROCESS, n)),
            "import_type": text(choice(rng, IMPORT_TYPE, n)),
            "import_use": text(choice(rng, IMPORT_USE, n)),
            "payment_type": text(choice(rng, PAYMENT, n)),
            "transport_mode": text(mode.astype(object)),
            "declarant_id": text(scrambled_ids(s["dec"], SALT_DECLARANT)),
            "importer_id": text(scrambled_ids(s["imp"], SALT_IMPORTER)),
            "seller_id": text(scrambled_ids(np.maximum(sel, 0), SALT_SELLER), missing=sel < 0),
            "courier_id": text(scrambled_ids(np.maximum(courier, 0), SALT_COURIER, width=6), missing=courier < 0),
            "hs6": text(self.hs_codes[hs]),
            "country_departure": text(self.country_names[s["departure"]]),
            "country_origin": text(self.country_names[origin]),
            "tax_rate": pa.array(rate.astype("float64")),
            "tax_type": text(tax_type.astype(object)),
            "origin_indicator": text(choice(rng, INDICATOR, n)),
            "net_mass": pa.array(mass),
            "item_price": pa.array(price),
            "fraud": pa.array(fraud.astype(np.int8)),
            "critical_fraud": pa.array(critical.astype(np.int8)),
            "revenue": pa.array(revenue),
            "typology": text(s["typology"], missing=~fraud),
        })

    def finish(self, out_dir: Path) -> None:
        """Write the history of cases (closed before the first declaration)."""
        write_parquet(self.history, Path(out_dir) / "cases.parquet")
