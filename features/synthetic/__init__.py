"""Synthetic data in the project format with planted, labelled typologies.

:func:`generate` writes ``declarations/`` (customs) or ``transactions/`` + ``accounts.parquet``
(finance) as chunked parquet part files, plus ``cases.parquet`` of historical (pre-window) cases.
Entity tables are built once; events are generated chunk by chunk (each chunk covers its own slice
of time, so chunks are time ordered) from ``np.random.default_rng([seed, 1, chunk_index])``: the
same seed gives the same data. Labels: ``fraud`` / ``is_laundering`` and a ground-truth
``typology`` column (missing for negatives; never a feature).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

START = pd.Timestamp("2022-01-01")
SPAN_DAYS = 540  # about 18 months of events
ALNUM = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = b"0123456789"


class ChunkGenerator(Protocol):
    """What a domain generator provides to :func:`generate`."""

    table: str

    def chunk(self, index: int, n_chunks: int, n: int, offset: int) -> pa.Table: ...

    def finish(self, out_dir: Path) -> None: ...


def entity_rng(seed: int) -> np.random.Generator:
    """Generator for the entity tables (independent of the chunk streams)."""
    return np.random.default_rng([seed % 2**63, 0])


def chunk_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for events of chunk ``index``."""
    return np.random.default_rng([seed % 2**63, 1, index])


def scrambled_ids(idx: np.ndarray, salt: int, width: int = 7, alphabet: bytes = ALNUM) -> np.ndarray:
    """Distinct random-looking ids (bytes) for distinct integers: affine bijection mod ``len(alphabet)**width``."""
    base = len(alphabet)
    space = base**width
    mult = 7_919_003 if base == 36 else 982_451_653  # coprime with 36 and with 10
    x = (np.asarray(idx, dtype=np.uint64) * np.uint64(mult) + np.uint64(salt % space)) % np.uint64(space)
    chars = np.empty((len(x), width), dtype=np.uint8)
    table = np.frombuffer(alphabet, dtype=np.uint8)
    for pos in range(width - 1, -1, -1):
        chars[:, pos] = table[(x % np.uint64(base)).astype(np.int64)]
        x //= np.uint64(base)
    return chars.view(f"S{width}").ravel()


def sequential_ids(offset: int, n: int, width: int) -> np.ndarray:
    """Zero-padded sequential ids ``offset .. offset+n-1`` as bytes (sortable as text)."""
    return np.char.zfill(np.arange(offset, offset + n).astype(f"S{width}"), width)


def text(values: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    """An arrow string column from bytes / str / object values (``missing`` marks nulls)."""
    values = np.asarray(values)
    arr = pa.array(values, type=pa.string() if values.dtype == object else None, mask=missing)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def decoded(values: np.ndarray) -> np.ndarray:
    """Bytes ids as Python strings (for small tables)."""
    return np.char.decode(np.asarray(values), "ascii").astype(object)


def zipf_weights(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """Zipf-like popularity ``1/rank**a`` with ranks randomly assigned to the ``n`` entities."""
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** a
    return rng.permutation(w)


def sample_weighted(rng: np.random.Generator, weights_cumsum: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices drawn with probabilities proportional to the weights behind ``weights_cumsum``."""
    u = rng.random(n) * weights_cumsum[-1]
    return np.minimum(np.searchsorted(weights_cumsum, u, side="right"), len(weights_cumsum) - 1)


def choice(rng: np.random.Generator, options: dict[str, float], n: int) -> np.ndarray:
    """``n`` draws from ``{value: weight}``."""
    keys = np.array(list(options), dtype=object)
    p = np.array(list(options.values()), dtype=float)
    return keys[rng.choice(len(keys), size=n, p=p / p.sum())]


def stochastic_round(rng: np.random.Generator, x: float) -> int:
    """``floor(x)`` or ``ceil(x)`` with the probabilities that keep the expectation ``x``."""
    base = math.floor(x)
    return int(base + (rng.random() < x - base))


def chunk_sizes(rows: int, chunk_rows: int) -> list[int]:
    """Even split of ``rows`` into ``ceil(rows / chunk_rows)`` chunks."""
    n_chunks = max(1, math.ceil(rows / chunk_rows))
    return [rows // n_chunks + (i < rows % n_chunks) for i in range(n_chunks)]


def write_parquet(table: pa.Table | pd.DataFrame, path: Path) -> None:
    """Write a table as parquet (deterministic content for equal tables)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(table, path, compression="snappy")


def cases_frame(case_ids, kinds, entity_ids, opened, closed, outcomes) -> pd.DataFrame:
    """A ``cases`` contract frame of historical cases (source "history")."""
    return pd.DataFrame({
        "case_id": pd.array(case_ids, dtype="string"),
        "entity_kind": pd.array(kinds, dtype="string"),
        "entity_id": pd.array(entity_ids, dtype="string"),
        "opened_at": pd.to_datetime(opened).astype("datetime64[ns]"),
        "closed_at": pd.to_datetime(closed).astype("datetime64[ns]"),
        "outcome": pd.array(outcomes, dtype="string"),
        "source": pd.array(["history"] * len(case_ids), dtype="string"),
    })


def generate(domain: str, rows: int, seed: int, out_dir: str | Path, positive_rate: float = 0.03,
             chunk_rows: int = 500_000, progress: bool = True) -> Path:
    """Write ``rows`` synthetic events of ``domain`` ("customs" or "finance") to ``out_dir``; return it.

    About ``positive_rate`` of the events belong to planted typologies (labelled, with ``typology``).
    Memory is bounded by ``chunk_rows`` plus the (small) entity tables.
    """
    if domain == "customs":
        from features.synthetic.customs import CustomsGenerator as Gen
    elif domain == "finance":
        from features.synthetic.finance import FinanceGenerator as Gen
    else:
        raise ValueError(f"unknown domain {domain!r}: use customs or finance")
    if rows < 1 or chunk_rows < 1:
        raise ValueError("rows and chunk_rows must be positive")
    if not 0.0 <= positive_rate <= 0.5:
        raise ValueError("positive_rate must be between 0 and 0.5")
    out = Path(out_dir)
    gen: ChunkGenerator = Gen(rows, seed, positive_rate)
    part_dir = out / gen.table
    part_dir.mkdir(parents=True, exist_ok=True)
    for stale in part_dir.glob("part-*.parquet"):  # a previous run into the same directory
        stale.unlink()
    sizes = chunk_sizes(rows, chunk_rows)
    offset = 0
    for index, n in enumerate(tqdm(sizes, desc=f"generate {domain}", unit="chunk", disable=not progress)):
        frame = gen.chunk(index, len(sizes), n, offset)
        write_parquet(frame, part_dir / f"part-{index:05d}.parquet")
        offset += n
    gen.finish(out)
    return out


__all__ = ["generate"]
