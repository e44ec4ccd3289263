"""Settings: built once from CHARGEFLOW_* variables (and a .env file), never leaking secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import DEFAULT_PRICING_FILE, ConfigError, Settings, load_settings, redact_url

PASSWORD = "s3cret-pw"


def settings_from(environ: dict[str, str], env_file: Path | None = None) -> Settings:
    return load_settings(environ, env_file=env_file)


# -- defaults and sources --------------------------------------------------------------


def test_defaults_match_the_spec_when_nothing_is_set():
    settings = settings_from({})

    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/chargeflow"
    assert settings.topic_prefix == "chargeflow/v1"
    assert settings.client_id == "chargeflow-daemon"
    assert settings.finalize_grace_s == 5
    assert settings.http_port == 9108
    assert settings.pricing_file == DEFAULT_PRICING_FILE


def test_the_default_broker_is_plain_mqtt_on_localhost_1883():
    broker = settings_from({}).broker

    assert (broker.host, broker.port, broker.tls) == ("127.0.0.1", 1883, False)
    assert broker.username is None
    assert broker.password is None


def test_a_dotenv_file_supplies_values(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CHARGEFLOW_CLIENT_ID=from-file\nCHARGEFLOW_HTTP_PORT=9200\n")

    settings = settings_from({}, env_file)

    assert settings.client_id == "from-file"
    assert settings.http_port == 9200


def test_the_environment_wins_over_the_dotenv_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CHARGEFLOW_CLIENT_ID=from-file\nCHARGEFLOW_HTTP_PORT=9200\n")

    settings = settings_from({"CHARGEFLOW_CLIENT_ID": "from-env"}, env_file)

    assert settings.client_id == "from-env"
    assert settings.http_port == 9200


def test_a_missing_dotenv_file_is_not_an_error(tmp_path):
    settings = settings_from({"CHARGEFLOW_CLIENT_ID": "only-env"}, tmp_path / "absent.env")

    assert settings.client_id == "only-env"


def test_an_empty_variable_counts_as_unset():
    assert settings_from({"CHARGEFLOW_HTTP_PORT": ""}).http_port == 9108


def test_variables_without_the_prefix_are_ignored():
    settings = settings_from({"MQTT_URL": "http://nope", "HTTP_PORT": "x"})

    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"


def test_a_trailing_slash_on_the_topic_prefix_is_dropped():
    assert settings_from({"CHARGEFLOW_TOPIC_PREFIX": "fleet/v2/"}).topic_prefix == "fleet/v2"


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "explanation"),
    [
        ("CHARGEFLOW_MQTT_URL", "http://127.0.0.1:1883", "mqtt:// or mqtts://"),
        ("CHARGEFLOW_MQTT_URL", "mqtt://127.0.0.1:port", "port"),
        ("CHARGEFLOW_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432", "names no database"),
        ("CHARGEFLOW_DATABASE_URL", "mysql://root@127.0.0.1/chargeflow", "postgresql://"),
        ("CHARGEFLOW_FINALIZE_GRACE_S", "-1", "greater than or equal to 0"),
        ("CHARGEFLOW_TOPIC_PREFIX", "chargeflow/#", "wildcards"),
        ("CHARGEFLOW_TOPIC_PREFIX", "chargeflow/+/v1", "wildcards"),
        ("CHARGEFLOW_HTTP_PORT", "http", "valid integer"),
        ("CHARGEFLOW_MQTT_PROTOCOL", "3", "'5' or '3.1.1'"),
        ("CHARGEFLOW_EVENT_LOOP", "trio", "'uvloop' or 'asyncio'"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(variable, value, explanation):
    with pytest.raises(ConfigError) as caught:
        settings_from({variable: value})

    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert explanation in message


def test_an_unknown_chargeflow_variable_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown setting CHARGEFLOW_MQTT_HOST"):
        settings_from({"CHARGEFLOW_MQTT_HOST": "broker.example"})


def test_an_unknown_variable_in_the_dotenv_file_is_refused_by_name(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CHARGEFLOW_FINALISE_GRACE_S=5\n")

    with pytest.raises(ConfigError, match="CHARGEFLOW_FINALISE_GRACE_S"):
        settings_from({}, env_file)


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(ConfigError) as caught:
        settings_from({"CHARGEFLOW_HTTP_PORT": "-1", "CHARGEFLOW_FINALIZE_GRACE_S": "-1"})

    assert "CHARGEFLOW_HTTP_PORT" in str(caught.value)
    assert "CHARGEFLOW_FINALIZE_GRACE_S" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHARGEFLOW_MQTT_URL", f"http://chargeflow-daemon:{PASSWORD}@127.0.0.1:1883"),
        ("CHARGEFLOW_MQTT_URL", f"mqtt://chargeflow-daemon:{PASSWORD}@127.0.0.1:port"),
        ("CHARGEFLOW_MQTT_URL", f"mqtt://chargeflow-daemon:{PASSWORD}@[::1"),
        ("CHARGEFLOW_MQTT_URL", f"mqtt://chargeflow-daemon:{PASSWORD}@"),
        ("CHARGEFLOW_DATABASE_URL", f"postgresql://app:{PASSWORD}@127.0.0.1:5432"),
        ("CHARGEFLOW_DATABASE_URL", f"mysql://app:{PASSWORD}@127.0.0.1/chargeflow"),
        ("CHARGEFLOW_MQTT_PASSWORD", PASSWORD),
    ],
)
def test_a_config_error_never_shows_the_password(variable, value):
    with pytest.raises(ConfigError) as caught:
        settings_from({variable: value})

    assert variable in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_an_mqtt_port_of_zero_is_refused():
    with pytest.raises(ConfigError, match="CHARGEFLOW_MQTT_URL"):
        settings_from({"CHARGEFLOW_MQTT_URL": "mqtt://127.0.0.1:0"})


# -- the broker address ----------------------------------------------------------------


def test_the_broker_address_carries_the_decoded_credentials():
    broker = Settings(mqtt_url="mqtt://fleet%2Fdaemon:pa%40ss@broker.example:1884").broker

    assert broker.host == "broker.example"
    assert broker.port == 1884
    assert broker.tls is False
    assert broker.username == "fleet/daemon"
    assert broker.password == "pa@ss"


def test_mqtts_means_tls_on_port_8883_by_default():
    broker = Settings(mqtt_url="mqtts://broker.example").broker

    assert broker.tls is True
    assert broker.port == 8883


def test_mqtts_keeps_an_explicit_port():
    assert Settings(mqtt_url="mqtts://broker.example:18883").broker.port == 18883


def test_the_broker_display_hides_the_password():
    broker = Settings(mqtt_url=f"mqtts://chargeflow-daemon:{PASSWORD}@broker.example").broker

    assert broker.display == "mqtts://chargeflow-daemon:***@broker.example:8883"


def test_the_broker_display_without_credentials_is_the_plain_address():
    assert Settings(mqtt_url="mqtt://10.0.0.5").broker.display == "mqtt://10.0.0.5:1883"


def test_the_repr_of_settings_and_broker_never_shows_the_password():
    settings = Settings(
        mqtt_url=f"mqtt://chargeflow-daemon:{PASSWORD}@127.0.0.1:1883",
        database_url=f"postgresql://app:{PASSWORD}@127.0.0.1:5432/chargeflow",
    )

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in repr(settings.broker)


# -- redaction -------------------------------------------------------------------------


def test_redact_url_hides_the_database_password():
    url = f"postgresql://app:{PASSWORD}@db.internal:5432/chargeflow"

    assert redact_url(url) == "postgresql://app:***@db.internal:5432/chargeflow"


def test_redact_url_leaves_a_url_without_password_unchanged():
    url = "postgresql://postgres@127.0.0.1:5432/chargeflow"

    assert redact_url(url) == url


def test_the_database_display_is_redacted():
    settings = Settings(database_url=f"postgresql://app:{PASSWORD}@db:5432/chargeflow")

    assert settings.database_display == "postgresql://app:***@db:5432/chargeflow"


def test_redact_url_hides_a_password_given_in_the_query():
    url = f"postgresql://app@db:5432/chargeflow?password={PASSWORD}"

    assert PASSWORD not in redact_url(url)


# -- pricing ---------------------------------------------------------------------------


def test_the_shipped_pricing_file_loads():
    pricing = settings_from({}).load_pricing()

    assert pricing.version == "2026-01"
    assert pricing.currency == "EUR"


def test_a_missing_pricing_file_is_a_config_error_naming_the_variable(tmp_path):
    missing = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        Settings(pricing_file=missing).load_pricing()

    assert str(caught.value).startswith("CHARGEFLOW_PRICING_FILE: ")
    assert str(missing) in str(caught.value)


def test_a_pricing_file_that_is_not_toml_is_a_config_error_naming_the_variable(tmp_path):
    broken = tmp_path / "pricing.toml"
    broken.write_text('version = "2026-01"\ncurrency = EUR\n')

    with pytest.raises(ConfigError) as caught:
        Settings(pricing_file=broken).load_pricing()

    assert str(caught.value).startswith("CHARGEFLOW_PRICING_FILE: ")
    assert "not valid TOML" in str(caught.value)


def test_the_pricing_file_is_read_from_the_variable(tmp_path):
    custom = tmp_path / "pricing.toml"
    custom.write_text(
        'version = "test-1"\ncurrency = "EUR"\n'
        "[ride]\nunit_price = 0.40\n[charging]\nunit_price = 0.20\n"
    )

    pricing = settings_from({"CHARGEFLOW_PRICING_FILE": str(custom)}).load_pricing()

    assert pricing.version == "test-1"


def test_a_share_group_turns_the_subscriptions_into_shared_ones():
    from daemon.mqtt.topics import Topics

    settings = load_settings({"CHARGEFLOW_SHARE_GROUP": "fleet-a"}, env_file=None)
    assert Topics(settings.topic_prefix).filters(settings.share_group) == [
        "$share/fleet-a/chargeflow/v1/bikes/+/lifecycle",
        "$share/fleet-a/chargeflow/v1/bikes/+/telemetry",
    ]


def test_a_share_group_with_a_wildcard_is_refused():
    with pytest.raises(ConfigError, match="CHARGEFLOW_SHARE_GROUP"):
        load_settings({"CHARGEFLOW_SHARE_GROUP": "a/+"}, env_file=None)


def test_a_partition_is_read_as_i_of_n():
    settings = load_settings({"CHARGEFLOW_PARTITION": "1/3"}, env_file=None)
    assert (settings.partition_of.index, settings.partition_of.count) == (1, 3)


def test_a_partition_outside_its_count_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match=r"CHARGEFLOW_PARTITION: partition 3/3 must be i/N"):
        load_settings({"CHARGEFLOW_PARTITION": "3/3"}, env_file=None)


def test_a_partition_and_a_share_group_together_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="choose one way to share the bikes") as caught:
        load_settings(
            {"CHARGEFLOW_PARTITION": "0/2", "CHARGEFLOW_SHARE_GROUP": "fleet"}, env_file=None
        )
    assert str(caught.value).startswith("CHARGEFLOW_PARTITION and CHARGEFLOW_SHARE_GROUP")
