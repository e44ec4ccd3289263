"""Telemetry Sample values validate themselves on construction."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from domain.errors import InvalidValue, TimestampOutOfRange
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge, TelemetrySample
from tests.builders import T0


@pytest.mark.parametrize("wh", ["-0.001", "NaN", "Infinity"])
def test_energy_delta_refuses_negative_or_non_finite_values(wh):
    with pytest.raises(InvalidValue, match="energy_wh"):
        EnergyDelta(Decimal(wh))


def test_energy_delta_of_zero_is_allowed():
    assert EnergyDelta(Decimal(0)).wh == 0


def test_distance_refuses_negative_metres():
    with pytest.raises(InvalidValue, match="distance_m"):
        Distance(Decimal("-1"))


@pytest.mark.parametrize("pct", ["-0.1", "100.01"])
def test_state_of_charge_lies_between_0_and_100(pct):
    with pytest.raises(InvalidValue, match="soc_pct"):
        StateOfCharge(Decimal(pct))


@pytest.mark.parametrize("pct", ["0", "100", "55.5"])
def test_state_of_charge_bounds_are_inclusive(pct):
    assert StateOfCharge(Decimal(pct)).pct == Decimal(pct)


def test_emission_time_refuses_a_naive_timestamp():
    with pytest.raises(InvalidValue, match="UTC offset"):
        EmissionTime(datetime(2026, 1, 1, 12, 0))


def test_emission_time_may_equal_the_session_bounds():
    EmissionTime(T0).check_within(T0, T0, T0, timedelta(0))


def test_emission_time_beyond_now_plus_skew_is_out_of_range():
    with pytest.raises(TimestampOutOfRange, match="clock skew 30 s"):
        EmissionTime(T0 + timedelta(seconds=31)).check_within(T0, None, T0, timedelta(seconds=30))


@pytest.mark.parametrize("seq", [0, -1, True])
def test_a_sample_seq_counts_from_one(seq):
    with pytest.raises(InvalidValue, match="seq"):
        TelemetrySample(uuid.uuid4(), uuid.uuid4(), seq, EmissionTime(T0), EnergyDelta(Decimal(1)))
