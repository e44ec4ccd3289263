"""The pricing file and the recorded price list as text: TOML read into the domain's
``PricingRules`` (every error says what to fix and where), and the canonical JSON the store
records. The formats live here; the rules they describe (and their invariants) in
``domain.billing``.
"""

from __future__ import annotations

import decimal
import json
import tomllib
from decimal import Decimal
from typing import Any

from daemon.documents import money_text
from domain.billing import MINOR_UNITS, PricingRule, PricingRules, Rounding, UnitPrice
from domain.errors import InvalidPricing
from domain.session_values import SessionKind

__all__ = ["canonical_pricing", "parse_pricing", "pricing_from_canonical"]


def canonical_pricing(pricing: PricingRules) -> str:
    """The price list as canonical JSON, decimals exactly as written (0.30 stays 0.30, as
    billing records print it); comments and layout of the file make no difference. The store
    records this text, and bills are derived from it wherever they are read."""
    return json.dumps(
        {
            "version": pricing.version,
            "currency": pricing.currency,
            "rounding": str(pricing.rounding),
            "minor_unit": pricing.minor_unit,
            **{
                str(r.kind): {
                    "unit_price": money_text(r.unit_price.per_kwh),
                    "session_fee": money_text(r.session_fee),
                }
                for r in sorted(pricing.rules, key=lambda r: r.kind)
            },
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def pricing_from_canonical(text: str) -> PricingRules:
    """The price list a ``canonical_pricing`` text records."""
    doc = json.loads(text)
    return PricingRules(
        doc["version"],
        doc["currency"],
        Rounding(doc["rounding"]),
        doc["minor_unit"],
        tuple(
            PricingRule(
                kind,
                UnitPrice(Decimal(doc[kind]["unit_price"])),
                Decimal(doc[kind]["session_fee"]),
            )
            for kind in SessionKind
        ),
    )


def _decimal(table: dict[str, Any], key: str, where: str, default: str | None = None) -> Decimal:
    raw = table.get(key, default)
    if raw is None:
        raise InvalidPricing(f"{where}: `{key}` is missing")
    if isinstance(raw, bool) or not isinstance(raw, str | int | Decimal):
        raise InvalidPricing(f"{where}: `{key}` must be a decimal like 0.30, got {raw!r}")
    try:
        value = Decimal(str(raw))
    except decimal.InvalidOperation:
        raise InvalidPricing(f"{where}: `{key}` is not a decimal: {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise InvalidPricing(f"{where}: `{key}` must be a non-negative decimal, got {raw!r}")
    return value


def parse_pricing(text: str, source: str = "pricing file") -> PricingRules:
    """Parse a pricing file (TOML) into PricingRules; errors say what to fix and where."""
    try:
        # parse_float=Decimal: prices are read exactly, never through a binary float.
        doc = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidPricing(f"{source} is not valid TOML: {exc}") from None
    known = {"version", "currency", "rounding", "minor_unit", *SessionKind}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidPricing(f"{source}: unknown keys {', '.join(unknown)}")
    version, currency = _version(doc, source), _currency(doc, source)
    minor_unit = _minor_unit(doc, currency, source)
    try:
        rounding = Rounding(doc.get("rounding", "half_even"))
    except ValueError:
        raise InvalidPricing(
            f"{source}: `rounding` must be one of {', '.join(Rounding)}, got {doc['rounding']!r}"
        ) from None
    rules = tuple(_rule(doc, kind, source) for kind in SessionKind)
    return PricingRules(version, currency, rounding, minor_unit, rules)


def _version(doc: dict[str, Any], source: str) -> str:
    version = doc.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool) or not str(version):
        raise InvalidPricing(f'{source}: `version` must be set, e.g. version = "2026-01"')
    return str(version)


def _currency(doc: dict[str, Any], source: str) -> str:
    currency = doc.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isupper():
        raise InvalidPricing(f'{source}: `currency` must be an ISO 4217 code, e.g. "EUR"')
    return currency


def _minor_unit(doc: dict[str, Any], currency: str, source: str) -> int:
    minor_unit = doc.get("minor_unit", MINOR_UNITS.get(currency))
    if not isinstance(minor_unit, int) or isinstance(minor_unit, bool) or not 0 <= minor_unit <= 4:
        raise InvalidPricing(
            f"{source}: the minor unit of {currency} is not known; set minor_unit = 0..4"
        )
    return minor_unit


def _rule(doc: dict[str, Any], kind: SessionKind, source: str) -> PricingRule:
    table = doc.get(str(kind))
    if not isinstance(table, dict):
        raise InvalidPricing(f"{source}: a [{kind}] table with `unit_price` is missing")
    extra = sorted(set(table) - {"unit_price", "session_fee"})
    if extra:
        raise InvalidPricing(f"{source}: [{kind}] has unknown keys {', '.join(extra)}")
    where = f"{source} [{kind}]"
    return PricingRule(
        kind,
        UnitPrice(_decimal(table, "unit_price", where)),
        _decimal(table, "session_fee", where, default="0"),
    )
