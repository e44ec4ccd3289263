"""Billing: the rule of SPEC §2, its golden examples and the pricing file."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from importlib import resources

import pytest

from daemon.documents import money_text
from daemon.pricing_text import canonical_pricing, parse_pricing
from domain.billing import Rounding, bill
from domain.errors import InvalidPricing
from domain.session_values import EndReason, FinalizedSession, SessionKind
from tests.builders import T0


def shipped_pricing():
    text = resources.files("daemon").joinpath("pricing.toml").read_text()
    return parse_pricing(text, "daemon/pricing.toml")


def finalized(kind: SessionKind, energy_wh: str) -> FinalizedSession:
    return FinalizedSession(
        session_id=uuid.uuid4(),
        bike_id="bike-1",
        kind=kind,
        party_id="p",
        started_at=T0,
        ended_at=T0 + timedelta(minutes=10),
        energy_wh=Decimal(energy_wh),
        distance_m=Decimal(0),
        telemetry_count=1,
        missing_samples=0,
        end_reason=EndReason.ENDED,
        finalized_at=T0 + timedelta(minutes=11),
    )


@pytest.mark.parametrize(
    ("kind", "energy_wh", "amount"),
    [
        (SessionKind.RIDE, "1234.5", "0.37"),
        (SessionKind.CHARGING, "500", "0.12"),
        (SessionKind.CHARGING, "1500", "0.38"),
        (SessionKind.RIDE, "0", "0.00"),
    ],
)
def test_golden_examples_of_the_shipped_pricing_file(kind, energy_wh, amount):
    record = bill(finalized(kind, energy_wh), shipped_pricing())
    assert str(record.amount.amount) == amount
    assert record.amount.currency == "EUR"


def test_a_bill_keeps_the_price_and_the_amount_with_their_scale():
    record = bill(finalized(SessionKind.RIDE, "1234.5"), shipped_pricing())
    assert money_text(record.unit_price.per_kwh) == "0.30"
    assert money_text(record.amount.amount) == "0.37"
    assert record.billable_energy.wh == Decimal("1234.5")


def test_the_session_fee_is_added_before_the_single_rounding():
    pricing = parse_pricing(
        'version="v2"\ncurrency="EUR"\nrounding="half_up"\n'
        '[ride]\nunit_price="0.30"\nsession_fee="0.005"\n[charging]\nunit_price=0.25\n'
    )
    # 1000 Wh * 0.30 + 0.005 = 0.305 -> half_up 0.31 (rounding first would give 0.30 + 0.01)
    assert bill(finalized(SessionKind.RIDE, "1000"), pricing).amount.amount == Decimal("0.31")


def test_the_rounding_mode_is_the_pricing_files():
    text = 'version="1"\ncurrency="EUR"\nrounding="{}"\n[ride]\nunit_price=1\n[charging]\nunit_price=0.25\n'
    charging = finalized(SessionKind.CHARGING, "500")  # 0.125
    assert bill(charging, parse_pricing(text.format("half_up"))).amount.amount == Decimal("0.13")
    assert bill(charging, parse_pricing(text.format("down"))).amount.amount == Decimal("0.12")


def test_a_zero_decimal_currency_rounds_to_whole_units():
    pricing = parse_pricing(
        'version="1"\ncurrency="JPY"\n[ride]\nunit_price=45\n[charging]\nunit_price=40\n'
    )
    assert bill(finalized(SessionKind.RIDE, "1500"), pricing).amount.amount == Decimal(68)
    assert pricing.rounding is Rounding.HALF_EVEN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version=", "not valid TOML"),
        ('currency="EUR"\n[ride]\nunit_price=1\n[charging]\nunit_price=1', "`version` must be set"),
        (
            'version="1"\ncurrency="euro"\n[ride]\nunit_price=1\n[charging]\nunit_price=1',
            "ISO 4217",
        ),
        (
            'version="1"\ncurrency="XTS"\n[ride]\nunit_price=1\n[charging]\nunit_price=1',
            "minor_unit",
        ),
        ('version="1"\ncurrency="EUR"\n[ride]\nunit_price=1', "[charging] table"),
        (
            'version="1"\ncurrency="EUR"\n[ride]\nunit_price=-1\n[charging]\nunit_price=1',
            "non-negative",
        ),
        (
            'version="1"\ncurrency="EUR"\n[ride]\nunit_price="abc"\n[charging]\nunit_price=1',
            "not a decimal",
        ),
        (
            'version="1"\ncurrency="EUR"\n[ride]\nprice=1\n[charging]\nunit_price=1',
            "unknown keys price",
        ),
        (
            'version="1"\ncurrency="EUR"\nrounding="bankers"\n[ride]\nunit_price=1\n[charging]\nunit_price=1',
            "rounding",
        ),
        (
            'version="1"\ncurrency="EUR"\ntax=1\n[ride]\nunit_price=1\n[charging]\nunit_price=1',
            "unknown keys tax",
        ),
    ],
)
def test_a_bad_pricing_file_says_what_to_fix_and_in_which_file(text, message):
    with pytest.raises(InvalidPricing) as err:
        parse_pricing(text, "pricing.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("pricing.toml")


def test_toml_floats_are_read_exactly():
    pricing = parse_pricing(
        'version="1"\ncurrency="EUR"\n[ride]\nunit_price=0.1\n[charging]\nunit_price=0.3\n'
    )
    assert pricing.rule_for(SessionKind.RIDE).unit_price.per_kwh == Decimal("0.1")


def test_the_recorded_price_list_is_this_exact_text_however_the_file_is_written():
    canonical = (
        '{"charging":{"session_fee":"0","unit_price":"0.25"},"currency":"EUR","minor_unit":2,'
        '"ride":{"session_fee":"0","unit_price":"0.30"},"rounding":"half_even","version":"2026-01"}'
    )
    assert canonical_pricing(shipped_pricing()) == canonical
    rewritten = parse_pricing(
        '# the same prices, written otherwise\nrounding = "half_even"\nversion = "2026-01"\n'
        'currency = "EUR"\n[charging]\nunit_price = "0.25"\nsession_fee = 0\n'
        "[ride]\nunit_price = 0.30\n",
        "rewritten.toml",
    )
    assert canonical_pricing(rewritten) == canonical


def test_the_pricing_files_minor_unit_decides_the_rounding_place():
    text = 'version="1"\ncurrency="EUR"\nminor_unit={}\n[ride]\nunit_price="0.30"\n[charging]\nunit_price=0.25\n'
    ride = finalized(SessionKind.RIDE, "1234.5")  # 0.37035
    assert str(bill(ride, parse_pricing(text.format(3))).amount.amount) == "0.370"
    assert str(bill(ride, parse_pricing(text.format(0))).amount.amount) == "0"
    assert parse_pricing(text.format(3)).minor_unit == 3


@pytest.mark.parametrize("currency", ["eur", "EURO", "EU", "E1R"])
def test_money_is_in_an_iso_4217_code(currency):
    from domain.billing import Money
    from domain.errors import InvalidValue

    with pytest.raises(InvalidValue, match="ISO 4217"):
        Money(Decimal(1), currency)


@pytest.mark.parametrize("currency", ['"EURO"', '"eur"', '"EU"'])
def test_a_pricing_file_in_no_iso_4217_currency_is_refused(currency):
    text = f'version="1"\ncurrency={currency}\n[ride]\nunit_price=1\n[charging]\nunit_price=1\n'
    with pytest.raises(InvalidPricing, match="ISO 4217"):
        parse_pricing(text)


@pytest.mark.parametrize("price", ["Infinity", "NaN", "-0.01"])
def test_a_unit_price_is_a_finite_non_negative_decimal(price):
    from domain.billing import UnitPrice
    from domain.errors import InvalidValue

    with pytest.raises(InvalidValue, match="non-negative finite decimal"):
        UnitPrice(Decimal(price))
