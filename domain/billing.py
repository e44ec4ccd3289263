"""Billing context: pricing rules and the pure, repeatable billing of Finalized sessions.

amount = billable_energy_wh / 1000 * unit_price + session_fee, in exact decimals, rounded once at
the end to the currency's minor unit with the pricing file's rounding mode.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from uuid import UUID

from domain.errors import InvalidPricing, InvalidValue
from domain.session_values import FinalizedSession, SessionKind

__all__ = [
    "BillableEnergy",
    "BillingRecord",
    "Money",
    "PricingHistory",
    "PricingRule",
    "PricingRules",
    "Rounding",
    "UnitPrice",
    "bill",
]

# ISO 4217 minor units of the currencies a fleet is likely to bill in; others need `minor_unit`.
MINOR_UNITS = {
    "EUR": 2,
    "USD": 2,
    "GBP": 2,
    "CHF": 2,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "CZK": 2,
    "HUF": 2,
    "RON": 2,
    "CAD": 2,
    "AUD": 2,
    "NZD": 2,
    "SGD": 2,
    "HKD": 2,
    "CNY": 2,
    "INR": 2,
    "BRL": 2,
    "MXN": 2,
    "ZAR": 2,
    "TRY": 2,
    "ILS": 2,
    "AED": 2,
    "JPY": 0,
    "KRW": 0,
    "ISK": 0,
    "CLP": 0,
    "VND": 0,
    "BHD": 3,
    "KWD": 3,
    "OMR": 3,
    "JOD": 3,
    "TND": 3,
}
_PER_KWH = Decimal(1000)


class Rounding(StrEnum):
    """Rounding modes a pricing file may name; half-even (banker's) is the default."""

    HALF_EVEN = "half_even"
    HALF_UP = "half_up"
    HALF_DOWN = "half_down"
    UP = "up"
    DOWN = "down"
    CEILING = "ceiling"
    FLOOR = "floor"

    @property
    def decimal_mode(self) -> str:
        return {
            Rounding.HALF_EVEN: decimal.ROUND_HALF_EVEN,
            Rounding.HALF_UP: decimal.ROUND_HALF_UP,
            Rounding.HALF_DOWN: decimal.ROUND_HALF_DOWN,
            Rounding.UP: decimal.ROUND_UP,
            Rounding.DOWN: decimal.ROUND_DOWN,
            Rounding.CEILING: decimal.ROUND_CEILING,
            Rounding.FLOOR: decimal.ROUND_FLOOR,
        }[self]


def _non_negative(value: Decimal, what: str) -> None:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise InvalidValue(f"{what} must be a non-negative finite decimal, got {value!r}")


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """Price per kWh in the pricing file's currency."""

    per_kwh: Decimal

    def __post_init__(self) -> None:
        _non_negative(self.per_kwh, "unit_price")


@dataclass(frozen=True, slots=True)
class Money:
    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal) or not self.amount.is_finite():
            raise InvalidValue(f"amount must be a finite decimal, got {self.amount!r}")
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise InvalidValue(f"currency must be an ISO 4217 code like EUR, got {self.currency!r}")


@dataclass(frozen=True, slots=True)
class BillableEnergy:
    """The energy a session is billed for: its fixed total, in watt-hours."""

    wh: Decimal

    def __post_init__(self) -> None:
        _non_negative(self.wh, "billable_energy_wh")

    @classmethod
    def of(cls, session: FinalizedSession) -> BillableEnergy:
        return cls(session.energy_wh)


@dataclass(frozen=True, slots=True)
class PricingRule:
    """What one kind of session costs: a unit price per kWh plus a fixed fee per session."""

    kind: SessionKind
    unit_price: UnitPrice
    session_fee: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        _non_negative(self.session_fee, "session_fee")


@dataclass(frozen=True, slots=True)
class PricingRules:
    """A versioned price list, fixed at start-up: one rule per session kind."""

    version: str
    currency: str
    rounding: Rounding
    minor_unit: int
    rules: tuple[PricingRule, ...]

    def __post_init__(self) -> None:
        if not self.version:
            raise InvalidPricing("version must be a non-empty string")
        kinds = [rule.kind for rule in self.rules]
        if sorted(kinds) != sorted(SessionKind):
            raise InvalidPricing(
                "exactly one rule per session kind is needed (ride and charging), got "
                f"{', '.join(kinds) or 'none'}"
            )

    def rule_for(self, kind: SessionKind) -> PricingRule:
        return next(rule for rule in self.rules if rule.kind is kind)


@dataclass(frozen=True, slots=True)
class PricingHistory:
    """Every price list ever used, by version: a finalized session is billed by its own."""

    versions: tuple[PricingRules, ...]

    def __post_init__(self) -> None:
        names = [p.version for p in self.versions]
        if len(set(names)) != len(names):
            raise InvalidPricing(f"a pricing version is recorded twice: {names}")

    def rules(self, version: str) -> PricingRules:
        for pricing in self.versions:
            if pricing.version == version:
                return pricing
        raise LookupError(f"pricing version {version!r} is not recorded")

    def bill(self, session: FinalizedSession) -> BillingRecord:
        """The bill of a session, by the pricing version it was finalized under."""
        if session.pricing_version is None:
            raise LookupError(f"session {session.session_id} names no pricing version")
        return bill(session, self.rules(session.pricing_version))


@dataclass(frozen=True, slots=True)
class BillingRecord:
    """A Finalized session's bill; derived, never stored as primary state."""

    session_id: UUID
    bike_id: str
    kind: SessionKind
    billable_energy: BillableEnergy
    unit_price: UnitPrice
    amount: Money
    pricing_version: str


def bill(session: FinalizedSession, pricing: PricingRules) -> BillingRecord:
    """Bill a Finalized session with a price list; pure and repeatable.

    A session that names the pricing version it was finalized under is billed by that version
    only: billing it by another price list is a mistake, not a bill.
    """
    if session.pricing_version is not None and session.pricing_version != pricing.version:
        raise InvalidPricing(
            f"session {session.session_id} was finalized under pricing version "
            f"{session.pricing_version}, not {pricing.version}"
        )
    rule = pricing.rule_for(session.kind)
    energy = BillableEnergy.of(session)
    # Exact arithmetic: a local context with enough precision that nothing rounds before the end.
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        ctx.traps[decimal.Inexact] = False
        raw = energy.wh / _PER_KWH * rule.unit_price.per_kwh + rule.session_fee
        quantum = Decimal(1).scaleb(-pricing.minor_unit)
        amount = raw.quantize(quantum, rounding=pricing.rounding.decimal_mode)
    return BillingRecord(
        session_id=session.session_id,
        bike_id=session.bike_id,
        kind=session.kind,
        billable_energy=energy,
        unit_price=rule.unit_price,
        amount=Money(amount, pricing.currency),
        pricing_version=pricing.version,
    )
