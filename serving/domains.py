"""What the service needs to know about each domain: event table, id/time/label columns, case entities."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DomainInfo:
    """Serving facts of one domain (the feature logic itself lives in :mod:`features`)."""

    domain: str
    table: str  # contract table of its events (features.schemas.TABLES)
    id_col: str
    time_col: str
    label_col: str
    permission: str  # auth permission needed to score it
    route: str
    case_entities: tuple[tuple[str, str], ...]  # (entity_kind, event column) a reviewer outcome is about


DOMAINS: dict[str, DomainInfo] = {
    "customs": DomainInfo(
        "customs", "declarations", "declaration_id", "date", "fraud", "score:customs", "/score_shipments",
        (("importer", "importer_id"), ("declarant", "declarant_id"), ("seller", "seller_id")),
    ),
    "finance": DomainInfo(
        "finance", "transactions", "transaction_id", "timestamp", "is_laundering", "score:finance",
        "/score_transactions", (("account", "source_account"), ("account", "target_account")),
    ),
}


def domain_info(domain: str) -> DomainInfo:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}: use one of {', '.join(DOMAINS)}")
    return DOMAINS[domain]
