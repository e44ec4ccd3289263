"""The topic layout of SPEC §2 and its reason codes: each defined once, here is what they say."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.metrics import Metrics
from daemon.mqtt.topics import OutboundKind, TopicKind, Topics
from domain import errors
from domain.errors import DomainError, Reason

PREFIX = "chargeflow/v1"
bike_ids = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=64)


@given(bike_ids, st.sampled_from([TopicKind.LIFECYCLE, TopicKind.TELEMETRY]))
def test_every_inbound_topic_the_layout_builds_reads_back_as_its_bike_and_kind(bike, kind):
    topics = Topics(PREFIX)

    parsed = topics.parse(topics.bike(bike, kind))

    assert (parsed.kind, parsed.bike_id, parsed.problem) == (kind, bike, None)


@given(
    st.sampled_from([PREFIX, "chargeflow/v2", "chargeflow", ""]),
    st.sampled_from(["bikes", "bike", ""]),
    st.one_of(bike_ids, st.sampled_from(["", "b.1", "b\n", "\u00e9", "b" * 65, "+", "a/b"])),
    st.sampled_from(["telemetry", "lifecycle", "billing", "rejections", "gps", "telemetry/x",
                     "telemetry\n", ""]),
)  # fmt: skip
def test_the_one_match_for_usual_topics_reads_every_topic_as_the_step_by_step_reading(
    prefix, bikes, bike, last
):
    """``Topics.parse`` reads a well-formed topic in one regular expression and anything else
    step by step (to name the problem): both readings agree on every topic."""
    from daemon.mqtt.topics import _parse

    topic = f"{prefix}/{bikes}/{bike}/{last}"
    assert Topics(PREFIX).parse(topic) == _parse(f"{PREFIX}/bikes/", topic)


def test_outbound_topics_are_under_the_bike():
    topics = Topics("fleet/eu")

    assert [topics.bike("b-1", k) for k in OutboundKind] == [
        "fleet/eu/bikes/b-1/sessions/finalized",
        "fleet/eu/bikes/b-1/billing",
        "fleet/eu/bikes/b-1/rejections",
    ]


def test_the_daemon_subscribes_to_both_inbound_kinds_alone_or_in_a_share_group():
    topics = Topics(PREFIX)

    assert topics.filters() == [f"{PREFIX}/bikes/+/lifecycle", f"{PREFIX}/bikes/+/telemetry"]
    assert topics.filters("cf") == [
        f"$share/cf/{PREFIX}/bikes/+/lifecycle",
        f"$share/cf/{PREFIX}/bikes/+/telemetry",
    ]


def test_one_filter_takes_both_inbound_kinds_and_says_which_outbound_ones_it_hears():
    """CHARGEFLOW_SUBSCRIPTION=one, for a broker with a queue per subscription (NATS)."""
    topics = Topics(PREFIX)

    assert topics.filters(one=True) == [f"{PREFIX}/bikes/+/+"]
    assert topics.filters("cf", one=True) == [f"$share/cf/{PREFIX}/bikes/+/+"]
    heard = [topics.parse(topics.bike("b1", k)) for k in OutboundKind]
    # sessions/finalized is two levels: the filter does not match it.
    assert [p.outbound for p in heard] == [False, True, True]
    assert not topics.parse(f"{PREFIX}/bikes/b1/telemetry").outbound
    assert not topics.parse(f"{PREFIX}/bikes/b1/gps").outbound  # still unknown_topic


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#", "a//b", "a/\x00"], ids=repr)
def test_a_prefix_that_is_not_plain_topic_levels_is_refused_with_what_to_fix(prefix):
    with pytest.raises(ValueError, match="without wildcards"):
        Topics(prefix)


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("other/v1/bikes/b1/telemetry", "not under chargeflow/v1/bikes/"),
        (f"{PREFIX}/bikes/b1/gps", "/lifecycle or"),
        (f"{PREFIX}/bikes/b1/telemetry/extra", "/lifecycle or"),
        (f"{PREFIX}/bikes//telemetry", "must match"),
        (f"{PREFIX}/bikes/b.1/telemetry", "must match [A-Za-z0-9_-]{1,64}"),
        (f"{PREFIX}/bikes/{'b' * 65}/telemetry", "must match"),
        (f"{PREFIX}/bikes/{'b' * 70_000}/telemetry", "longer than MQTT allows"),
    ],
)
def test_a_topic_outside_the_layout_is_unknown_and_says_why(topic, says):
    parsed = Topics(PREFIX).parse(topic)

    assert parsed.kind is TopicKind.UNKNOWN
    assert parsed.problem is not None and says in parsed.problem


def test_the_reason_codes_are_exactly_those_of_the_contract():
    assert {str(r) for r in Reason} == {
        "malformed_json", "schema_violation", "payload_too_large", "unknown_topic",
        "active_session_exists", "unknown_session", "session_finalized",
        "session_kind_mismatch", "session_id_conflict", "timestamp_out_of_range",
        "seq_beyond_end",
    }  # fmt: skip


def test_every_domain_error_carries_a_reason_code_and_every_code_has_a_metric_series():
    domain_errors = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, DomainError) and cls is not DomainError
    ]
    assert domain_errors
    assert all(isinstance(cls.reason, Reason) for cls in domain_errors)
    exported = Metrics().registry.get_sample_value
    for reason in Reason:
        assert exported("chargeflow_messages_rejected_total", {"reason": str(reason)}) == 0
