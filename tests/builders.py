"""Builders for domain commands in tests: readable defaults, random ids per call."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from domain.commands import EndSession, RecordTelemetry, StartSession
from domain.session_values import SessionKind
from domain.telemetry import Distance, EmissionTime, EnergyDelta, StateOfCharge, TelemetrySample

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def bike_id() -> str:
    return f"bike-{uuid.uuid4().hex[:8]}"


def start(
    bike: str,
    kind: SessionKind = SessionKind.RIDE,
    at: datetime = T0,
    session_id: uuid.UUID | None = None,
    party: str = "rider-1",
) -> StartSession:
    return StartSession(bike, session_id or uuid.uuid4(), kind, party, at)


def end(
    begun: StartSession, last_seq: int, at: datetime | None = None, kind: SessionKind | None = None
) -> EndSession:
    return EndSession(
        begun.bike_id,
        begun.session_id,
        kind or begun.kind,
        at or begun.occurred_at + timedelta(minutes=30),
        last_seq,
    )


def sample(
    begun: StartSession,
    seq: int,
    wh: str | Decimal = "10",
    at: datetime | None = None,
    distance: str | None = None,
    soc: str | None = None,
    telemetry_id: uuid.UUID | None = None,
) -> RecordTelemetry:
    return RecordTelemetry(
        begun.bike_id,
        TelemetrySample(
            telemetry_id=telemetry_id or uuid.uuid4(),
            session_id=begun.session_id,
            seq=seq,
            emitted_at=EmissionTime(at or begun.occurred_at + timedelta(seconds=seq)),
            energy=EnergyDelta(Decimal(wh)),
            distance=Distance(Decimal(distance)) if distance is not None else None,
            soc=StateOfCharge(Decimal(soc)) if soc is not None else None,
        ),
    )
