"""The MQTT contract as an AsyncAPI 3.0 document, generated from the code that speaks it.

Inbound payloads are described by the same pydantic models that decode them (``schemas.py``),
outbound payloads by the models the published bytes are dumped from (``daemon.documents``).
``daemon/asyncapi.json`` is this document for the default prefix, committed; a test
regenerates it and fails when it is stale. Regenerate with
``chargeflow asyncapi > daemon/asyncapi.json``.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from daemon.documents import BillingPayload, FinalizedPayload, RejectionPayload
from daemon.mqtt.schemas import QUANTITY_MAX, QUANTITY_PLACES, SEQ_MAX, Lifecycle, Telemetry
from daemon.mqtt.topics import OutboundKind, TopicKind
from domain.commands import BIKE_ID_RULE

__all__ = ["asyncapi_document"]


def _schema(adapter: TypeAdapter[Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema for AsyncAPI: shared definitions moved into components/schemas."""
    schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(_asyncapi_schema(schema.pop("$defs", {})))
    result: dict[str, Any] = _asyncapi_schema(schema)
    return result


def _asyncapi_schema(value: Any) -> Any:
    # AsyncAPI's schema object (JSON Schema draft 07) takes ``discriminator`` as a property
    # name, not OpenAPI's object; the union is told apart by its ``const`` events anyway.
    if isinstance(value, dict):
        return {
            k: _asyncapi_schema(v)
            for k, v in value.items()
            if not (k == "discriminator" and isinstance(v, dict))
        }
    if isinstance(value, list):
        return [_asyncapi_schema(v) for v in value]
    return value


_LAYOUT = [
    ("lifecycle", TopicKind.LIFECYCLE, "Lifecycle", "receive",
     "A ride or charging session starts or ends."),
    ("telemetry", TopicKind.TELEMETRY, "Telemetry", "receive",
     "A telemetry sample of an Active session."),
    ("sessionsFinalized", OutboundKind.FINALIZED, "SessionFinalized", "send",
     "A session is finalized with fixed totals."),
    ("billing", OutboundKind.BILLING, "Billing", "send",
     "The bill of a finalized session, by the pricing version it was finalized under."),
    ("rejections", OutboundKind.REJECTIONS, "Rejection", "send",
     "A message of this bike was rejected (and kept): the reason and what to fix."),
]  # fmt: skip

_DESCRIPTION = (
    "What bikes and chargers publish to ChargeFlow, and what it publishes back, "
    "QoS 1 throughout. ChargeFlow subscribes to the inbound channels (as "
    "`$share/{group}/...` when instances share the load) and receives them; it "
    "sends on the outbound ones. Inbound numbers are JSON numbers: energy_wh and "
    f"distance_m from 0 to {QUANTITY_MAX:,} and soc_pct from 0 to 100, each with at "
    f"most {QUANTITY_PLACES} decimal places; seq and last_seq up to {SEQ_MAX:,}; "
    "timestamps are RFC 3339 with an offset. Outbound instants are UTC with Z and "
    "quantities and money are decimal strings. Whatever is rejected is answered on "
    "the bike's rejections channel with one of the reason codes, and kept."
)


def asyncapi_document(prefix: str = "chargeflow/v1", version: str = "1") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every inbound and outbound channel, for a topic prefix."""
    schemas: dict[str, Any] = {}
    payloads = {
        "Lifecycle": _schema(TypeAdapter(Lifecycle), schemas),
        "Telemetry": _schema(TypeAdapter(Telemetry), schemas),
        "SessionFinalized": _schema(TypeAdapter(FinalizedPayload), schemas),
        "Billing": _schema(TypeAdapter(BillingPayload), schemas),
        "Rejection": _schema(TypeAdapter(RejectionPayload), schemas),
    }
    channels, operations = _channels_and_operations(prefix)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "ChargeFlow MQTT contract",
            "version": version,
            "description": _DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "localhost:1883",
                "protocol": "mqtt",
                "protocolVersion": "5",
                "description": "Any MQTT v5 broker (the repository ships a Mosquitto config)",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {
                name: {"name": name, "contentType": "application/json", "payload": payload}
                for name, payload in payloads.items()
            },
            "schemas": dict(sorted(schemas.items())),
        },
    }


def _channels_and_operations(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for name, suffix, message, action, summary in _LAYOUT:
        channels[name] = {
            "address": f"{prefix}/bikes/{{bike_id}}/{suffix}",
            "summary": summary,
            "parameters": {"bike_id": {"description": f"the bike, matching {BIKE_ID_RULE}"}},
            "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        }
        operations[f"{action}{name[0].upper()}{name[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{message}"}],
            "bindings": {"mqtt": {"qos": 1, "retain": False}},
        }
    return channels, operations
