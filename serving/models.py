"""Request and response models of the scoring API (pydantic v2), and field-level request parsing.

Inputs mirror the event contracts of :mod:`features.schemas` minus the label columns. Every problem
in a request becomes a :class:`RequestError` with a 4xx status and one entry per bad field, located
like ``items.3.amount``; nothing a client sends can produce a 500.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
)

from features.schemas import COUNTRY_PATTERN, HS6_PATTERN, TABLES
from serving.domains import domain_info

DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
MIN_YEAR, MAX_YEAR = 1990, 2100


def max_items() -> int:
    """Largest batch accepted: $RISKSCORE_MAX_ITEMS (default 1000)."""
    return int(os.environ.get("RISKSCORE_MAX_ITEMS", DEFAULT_MAX_ITEMS))


def max_body_bytes() -> int:
    """Largest request body accepted: $RISKSCORE_MAX_BODY_BYTES (default 2 MiB)."""
    return int(os.environ.get("RISKSCORE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))


class RequestError(Exception):
    """A client error: HTTP status, a short message and field-level details."""

    def __init__(self, status: int, error: str, detail: list[dict[str, str]] | None = None,
                 retry_after: int | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail or []
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.detail:
            out["detail"] = self.detail
        return out


def _matches(pattern: str, message: str):
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # tab and newlines allowed


def _no_control(pattern: re.Pattern) -> AfterValidator:
    def check(value: str) -> str:
        if pattern.search(value):
            raise ValueError("must not contain control characters")
        return value

    return AfterValidator(check)


_ISO_DAY = re.compile(r"\s*\d{4}-\d{2}-\d{2}([T ].*)?")


def _iso_text(what: str, example: str):
    """Text in ISO 8601 form (``YYYY-MM-DD...``): pydantic alone also reads digit strings as Unix times."""

    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not _ISO_DAY.fullmatch(value):
            raise ValueError(f"must be an ISO 8601 {what}, e.g. {example!r}")
        return value

    return BeforeValidator(check)


def _year_in_range(value: dt.date) -> dt.date:
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"year must be between {MIN_YEAR} and {MAX_YEAR}")
    return value


def _utc_naive(value: dt.datetime) -> dt.datetime:
    _year_in_range(value.date())  # the year as sent (converting an out-of-range one to UTC can overflow)
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
        _year_in_range(value)  # and the year stored: the audit store keeps UTC, validated again on replay
    return value


Code = Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
                 _no_control(_CONTROL)]
Country = Annotated[Code, _matches(COUNTRY_PATTERN, "must be a 2-letter upper-case ISO country code, e.g. 'CN'")]
HS6 = Annotated[Code, _matches(HS6_PATTERN, "must be a 6-digit HS code, e.g. '392690'")]
Currency = Annotated[Code, _matches(r"^[A-Z]{3}$", "must be a 3-letter upper-case ISO currency code, e.g. 'EUR'")]
MAX_QUANTITY = 1e15  # amounts, prices, masses: far above any real one, far below where sums overflow a float
NonNegative = Annotated[float, Strict(), Field(ge=0, le=MAX_QUANTITY, allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0, le=MAX_QUANTITY, allow_inf_nan=False)]
Day = Annotated[dt.date, _iso_text("date", "2023-06-25"), AfterValidator(_year_in_range)]
Instant = Annotated[dt.datetime, _iso_text("time", "2023-06-25T14:30:00Z"), AfterValidator(_utc_naive)]


class Declaration(BaseModel):
    """One import declaration line (the ``declarations`` contract without labels)."""

    model_config = ConfigDict(extra="forbid")

    declaration_id: Code
    date: Day
    office_id: Code
    process_type: Code
    import_type: Code
    import_use: Code
    payment_type: Code
    transport_mode: Code
    declarant_id: Code
    importer_id: Code
    seller_id: Code | None = None
    courier_id: Code | None = None
    hs6: HS6
    country_departure: Country
    country_origin: Country
    tax_rate: NonNegative
    tax_type: Code
    origin_indicator: Code
    net_mass: NonNegative
    item_price: NonNegative


class Transfer(BaseModel):
    """One money transfer (the ``transactions`` contract without labels)."""

    model_config = ConfigDict(extra="forbid")

    transaction_id: Code
    timestamp: Instant
    source_account: Code
    target_account: Code
    amount: Positive
    currency: Currency
    channel: Code
    source_country: Country
    target_country: Country


class ShipmentBatch(BaseModel):
    """``POST /score_shipments`` body."""

    model_config = ConfigDict(extra="forbid")
    items: list[Declaration] = Field(min_length=1)


class TransferBatch(BaseModel):
    """``POST /score_transactions`` body."""

    model_config = ConfigDict(extra="forbid")
    items: list[Transfer] = Field(min_length=1)


class OutcomeIn(BaseModel):
    """``POST /outcomes`` body: a reviewer's decision on a scored item."""

    model_config = ConfigDict(extra="forbid")

    score_id: Annotated[str, Strict(), StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
                        _no_control(_CONTROL)]
    outcome: Literal["confirmed", "cleared"]
    note: Annotated[str, Strict(), StringConstraints(max_length=2000), _no_control(_CONTROL_IN_TEXT)] | None = None


class ReasonOut(BaseModel):
    feature: str
    label: str
    value: float | str | None
    contribution: float
    direction: str


class ModelRef(BaseModel):
    name: str
    version: str


class ScoreOut(BaseModel):
    """One scored item: calibrated score, band, decision, top reasons and the SHAP decomposition."""

    score_id: str
    id: str
    score: float
    band: str
    flagged: bool
    threshold: float
    reasons: list[ReasonOut]
    other_contribution: float | None = Field(
        None, description="sum of the contributions of the features not in reasons: base_value + the reasons' "
                          "contributions + other_contribution = raw_margin")
    base_value: float
    raw_margin: float
    model: ModelRef


class ScoreResponse(BaseModel):
    request_id: str
    domain: str
    items: list[ScoreOut]


BATCHES: dict[str, type[BaseModel]] = {"customs": ShipmentBatch, "finance": TransferBatch}
ITEMS: dict[str, type[BaseModel]] = {"customs": Declaration, "finance": Transfer}


def item_columns(domain: str, items: list[BaseModel]) -> dict[str, np.ndarray]:
    """Validated items as contract columns (the ``features.schemas`` event table without labels) in plain
    arrays: strings as objects with None for missing, times as ``datetime64[ns]`` (naive UTC), numbers as
    float64. What the feature set's ``prepare_columns`` reads, without building a pandas frame per request."""
    info = domain_info(domain)
    out: dict[str, np.ndarray] = {}
    for col in TABLES[info.table]:
        if not col.required or col.name == info.label_col:
            continue
        values = [getattr(item, col.name) for item in items]
        if col.kind == "datetime":
            out[col.name] = np.array(values, dtype="datetime64[ns]")
        elif col.kind == "str":
            out[col.name] = np.array(values, dtype=object)
        else:
            out[col.name] = np.array(values, dtype=np.float64)
    return out


def stored_item_columns(domain: str, rows: list[dict]) -> dict[str, np.ndarray]:
    """:func:`item_columns` of stored items (``model_dump(mode="json")`` of validated items, as the audit store
    keeps them), validated again so they take exactly the values they had when scored."""
    model = ITEMS[domain]
    return item_columns(domain, [model.model_validate(row) for row in rows])


def location(loc: tuple[int | str, ...]) -> str:
    """``('items', 3, 'amount')`` -> ``'items.3.amount'`` (the body root is ``'body'``)."""
    return ".".join(str(p) for p in loc) or "body"


def field_errors(err: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as ``{"loc": "items.3.amount", "msg": ..., "type": ...}`` without echoing input."""
    out = []
    for e in err.errors(include_url=False, include_input=False, include_context=False):
        msg = str(e["msg"]).removeprefix("Value error, ")
        out.append({"loc": location(tuple(e["loc"])), "msg": msg, "type": str(e["type"])})
    return out


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; malformed JSON (or NaN/Infinity literals, or absurd nesting) -> 400."""
    if not body.strip():
        raise RequestError(400, "request body is empty; send a JSON object")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON: {err}") from None
    except RecursionError:  # e.g. 100k nested '[': the C decoder stops at the interpreter's recursion limit
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def parse_model(model: type[BaseModel], payload: Any) -> BaseModel:
    """Validate a decoded body against ``model``; problems -> 422 with field-level details."""
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        raise RequestError(422, "request failed validation", field_errors(err)) from None


def parse_batch(domain: str, payload: Any, limit: int | None = None) -> list[BaseModel]:
    """Validate a scoring batch: ``{"items": [...]}`` with 1..limit items and unique ids."""
    limit = max_items() if limit is None else limit
    if isinstance(payload, dict) and isinstance(payload.get("items"), list) and len(payload["items"]) > limit:
        raise RequestError(422, "request failed validation", [{
            "loc": "items", "msg": f"at most {limit} items per request (got {len(payload['items'])})",
            "type": "too_long"}])
    batch = parse_model(BATCHES[domain], payload)
    items = batch.items  # type: ignore[attr-defined]
    id_field = "declaration_id" if domain == "customs" else "transaction_id"
    seen: dict[str, int] = {}
    dupes = []
    for i, item in enumerate(items):
        key = getattr(item, id_field)
        if key in seen:
            dupes.append({"loc": f"items.{i}.{id_field}", "msg": f"duplicate of items.{seen[key]}",
                          "type": "duplicate"})
        seen.setdefault(key, i)
    if dupes:
        raise RequestError(422, "request failed validation", dupes)
    return items

