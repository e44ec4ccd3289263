"""Prometheus metrics; built on a given CollectorRegistry so tests use a fresh one."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from domain.errors import Reason

__all__ = ["DropReason", "Metrics"]

REJECTION_REASONS = tuple(str(reason) for reason in Reason)


class DropReason(StrEnum):
    """Why the daemon gave up on a message: faults of ours alone, never a publisher's."""

    COMMIT_FAILED = "commit_failed"  # the database refused it even alone, as a rejection
    INTERNAL_ERROR = "internal_error"  # deciding it raised what no rule raises (a bug)


class Metrics:
    """Every figure the daemon exposes on /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._messages(self.registry)
        self._batches_and_sessions(self.registry)
        self._health(self.registry)
        self._bind_children()

    def _messages(self, r: CollectorRegistry) -> None:
        """What became of each inbound message."""
        self.received = Counter(
            "chargeflow_messages_received",
            "Inbound messages taken from the broker",
            ["topic_kind"],
            registry=r,
        )
        self.accepted = Counter(
            "chargeflow_messages_accepted",
            "Inbound messages that changed state",
            ["topic_kind"],
            registry=r,
        )
        self.duplicates = Counter(
            "chargeflow_messages_duplicate",
            "Redelivered messages settled as no-ops",
            ["topic_kind"],
            registry=r,
        )
        self.rejected = Counter(
            "chargeflow_messages_rejected",
            "Inbound messages rejected, by reason code",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "chargeflow_messages_dropped",
            "Messages the daemon gave up on, by reason",
            ["reason"],
            registry=r,
        )
        self.deferred = Counter(
            "chargeflow_messages_deferred",
            "Inbound messages that arrived before what they depend on and wait for it",
            ["topic_kind"],
            registry=r,
        )
        self.not_owned = Counter(
            "chargeflow_messages_not_owned",
            "Inbound messages of bikes another instance takes (CHARGEFLOW_PARTITION),"
            " acknowledged from the topic alone",
            ["topic_kind"],
            registry=r,
        )
        self.waiting_settled = Counter(
            "chargeflow_waiting_settled",
            "Waiting messages decided: applied, or rejected with the reason code",
            ["outcome"],
            registry=r,
        )

    def _batches_and_sessions(self, r: CollectorRegistry) -> None:
        """The waiting room, the intake, the batches, the sessions and the outbox."""
        self.waiting_messages = Gauge(
            "chargeflow_waiting_messages",
            "Messages waiting (durably) for their session's start or their bike's end",
            registry=r,
        )
        self.intake_paused = Gauge(
            "chargeflow_intake_paused",
            "1 while the daemon reads nothing from the broker: it holds enough to work on",
            registry=r,
        )
        self.batch_size = Histogram(
            "chargeflow_batch_size",
            "Inbound messages per committed batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "chargeflow_batch_commit_seconds",
            "Time to write and commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.finalized = Counter(
            "chargeflow_sessions_finalized",
            "Sessions finalized",
            ["kind", "end_reason"],
            registry=r,
        )
        self.active_sessions = Gauge(
            "chargeflow_active_sessions",
            "Active sessions this instance holds in memory",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "chargeflow_outbox_pending", "Outbound events not yet published", registry=r
        )
        self.outbox_published = Counter(
            "chargeflow_outbox_published", "Outbound events published", ["event"], registry=r
        )
        self.retention_removed = Counter(
            "chargeflow_retention_removed",
            "Rows removed (or payloads emptied) by retention: rejection_payloads, outbox,"
            " telemetry",
            ["data"],
            registry=r,
        )
        self.retention_runs = Counter(
            "chargeflow_retention_runs",
            "Retention runs by outcome: done, failed",
            ["outcome"],
            registry=r,
        )

    def _health(self, r: CollectorRegistry) -> None:
        """The connections, readiness, and refused HTTP requests."""
        self.mqtt_connected = Gauge(
            "chargeflow_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.mqtt_failovers = Counter(
            "chargeflow_mqtt_failovers",
            "Connections made to another broker of CHARGEFLOW_MQTT_URL than the one before",
            registry=r,
        )
        self.database_up = Gauge(
            "chargeflow_database_up", "1 while the last database call succeeded", registry=r
        )
        self.ready = Gauge("chargeflow_ready", "1 while /readyz answers 200", registry=r)
        self.http_auth_failures = Counter(
            "chargeflow_http_auth_failures",
            "HTTP requests refused for want of credentials: missing, invalid, not_configured",
            ["reason"],
            registry=r,
        )

    def _bind_children(self) -> None:
        """Every label value is exposed from the start (at 0), so that rates and alerts have
        a series before the first event."""
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for dropped in DropReason:
            self.dropped.labels(dropped)
        for data in ("rejection_payloads", "outbox", "telemetry"):
            self.retention_removed.labels(data)
        for outcome in ("done", "failed"):
            self.retention_runs.labels(outcome)
        for denied in ("missing", "invalid", "not_configured"):
            self.http_auth_failures.labels(denied)
        for outcome in ("applied", Reason.UNKNOWN_SESSION, Reason.ACTIVE_SESSION_EXISTS):
            self.waiting_settled.labels(outcome)
        for kind in ("lifecycle", "telemetry", "unknown"):
            for counter in (
                self.received,
                self.accepted,
                self.duplicates,
                self.deferred,
                self.not_owned,
            ):
                counter.labels(kind)
