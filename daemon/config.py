"""One Settings object, built once at start-up from CHARGEFLOW_* variables (and a .env file)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from daemon.http_auth import Tokens, load_tokens
from daemon.partition import Partition
from daemon.pricing_text import parse_pricing
from daemon.topic_names import check_prefix
from domain.billing import PricingRules
from domain.errors import InvalidPricing
from domain.session_values import SessionPolicy

__all__ = [
    "READ_SETTINGS",
    "BrokerAddress",
    "ConfigError",
    "Settings",
    "load_settings",
    "parse_brokers",
]

DEFAULT_PRICING_FILE = Path(__file__).with_name("pricing.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the variable and what to fix."""


class DatabaseUnavailable(ConfigError):
    """The database cannot be reached (yet): the daemon waits for it, the CLI says so."""


class BrokerAddress(BaseModel):
    """Where the MQTT broker is, parsed from CHARGEFLOW_MQTT_URL."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    tls: bool
    username: str | None = Field(default=None, repr=False)
    password: str | None = Field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The address as a URL, credentials included: for a child process's environment,
        never for a log (``display`` is that)."""
        scheme = "mqtts" if self.tls else "mqtt"
        login = ""
        if self.username is not None:
            login = quote(self.username, safe="")
            if self.password is not None:
                login += ":" + quote(self.password, safe="")
            login += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{scheme}://{login}{host}:{self.port}"

    @property
    def display(self) -> str:
        """The address without credentials, for logs and error messages."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def redact_url(url: str) -> str:
    """A URL with its password replaced (in the user part or the query), safe to log."""
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if parts.query:
        query = [
            (key, "***" if key.lower() in {"password", "sslpassword"} else value)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


class Settings(BaseModel):
    """Everything the daemon is told from outside; nothing else reads the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mqtt_url: str = Field(default="mqtt://127.0.0.1:1883", repr=False)
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/chargeflow", repr=False)
    http_port: int = Field(default=9108, ge=0, le=65535)
    http_host: str = "0.0.0.0"  # noqa: S104 - a daemon in a container serves its metrics port
    topic_prefix: str = "chargeflow/v1"
    client_id: str = Field(default="chargeflow-daemon", min_length=1, max_length=128)
    pricing_file: Path = DEFAULT_PRICING_FILE
    finalize_grace_s: float = Field(default=5.0, ge=0)
    abandon_after_s: float = Field(default=86_400.0, gt=0)
    clock_skew_s: float = Field(default=300.0, ge=0)
    max_batch: int = Field(default=1000, ge=1, le=65_535)
    receive_maximum: int = Field(default=1000, ge=1, le=65_535)
    # The protocol level of the daemon's connection: "5" (MQTT v5) or "3.1.1", for brokers
    # that speak nothing newer (NATS, RabbitMQ 3); one connection code, README "MQTT protocol
    # level".
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    # `chargeflow run`'s event loop: uvloop (libuv; about a tenth less CPU per message, README
    # "Measured") or the standard library's, for a platform uvloop does not build on.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # A batch written and committed while the next is decided (README, "Measured").
    pipelined_commits: bool = True
    max_payload_bytes: int = Field(default=16_384, ge=256)
    session_expiry_s: int = Field(default=7 * 86_400, ge=0)
    redelivery_window_days: int = Field(default=7, ge=1)
    # Retention (README "Personal data"): telemetry samples of finalized sessions (TimescaleDB's
    # policy, or the daemon's job on a plain table), rejected payloads (the row is kept),
    # published outbox rows; run every retention_interval_s in batches of retention_batch.
    telemetry_retention_days: int = Field(default=400, ge=1)
    rejection_payload_retention_days: int = Field(default=30, ge=1)
    outbox_retention_days: int = Field(default=7, ge=1)
    retention_interval_s: float = Field(default=3600.0, gt=0)
    retention_batch: int = Field(default=1000, ge=1, le=100_000)
    # auto: a hypertable when the extension can be loaded, plain tables otherwise; on: refuse
    # to start without it; off: never touch it.
    timescaledb: Literal["auto", "on", "off"] = "auto"
    mqtt_ca_file: Path | None = None
    # Mutual TLS: the daemon's client certificate (PEM, chain allowed) and its private key.
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    # HTTP credentials (daemon/http_auth.py): bearer tokens for every data endpoint; /metrics
    # open (as most Prometheus set-ups scrape) or behind the same tokens.
    http_tokens_file: Path | None = None
    metrics_auth: Literal["open", "token"] = "open"
    simulator_mqtt_url: str | None = Field(default=None, repr=False)
    share_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # per_kind: one filter per inbound kind (lifecycle, telemetry); one: a single filter for a
    # bike's topics, for brokers that keep a queue per subscription (NATS), so that a backlog
    # comes in the order it was published (README, "Scaling out").
    subscription: Literal["per_kind", "one"] = "per_kind"
    # Bike-affine instances: "i/N" takes the bikes of slot i of N (README, "Scaling out").
    partition: str | None = None
    partition_lease_s: float = Field(default=60.0, gt=0)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("mqtt_url", "simulator_mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = cls._mqtt_url_problem(value)
        if problem:
            raise ValueError(problem)
        return ",".join(u.strip() for u in value.split(","))

    @staticmethod
    def _mqtt_url_problem(value: str) -> str | None:
        """What is wrong with a broker list (one URL or several, comma-separated), or None."""
        urls = [u.strip() for u in value.split(",")]
        for n, url in enumerate(urls, start=1):
            where = f"broker {n} of {len(urls)} ({redact_url(url)!r}) " if len(urls) > 1 else ""
            problem = _broker_url_problem(url)
            if problem:
                return where + problem
        if len({urlsplit(u).scheme for u in urls}) > 1:
            return "mixes mqtt:// and mqtts://: the nodes of one cluster are reached the same way"
        return None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"postgresql", "postgres"}:
            raise ValueError(
                f"must start with postgresql://, got scheme {parts.scheme!r} "
                "(example: postgresql://postgres@127.0.0.1:5432/chargeflow)"
            )
        if not parts.path.strip("/"):
            raise ValueError("names no database (example: .../chargeflow)")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        value = value.strip("/")
        check_prefix(value)  # raises ValueError naming what is wrong
        return value

    @field_validator("partition")
    @classmethod
    def _partition(cls, value: str | None) -> str | None:
        return None if value is None else str(Partition.parse(value))

    @model_validator(mode="after")
    def _one_way_to_share(self) -> Settings:
        if self.share_group and self.partition and Partition.parse(self.partition).count > 1:
            raise ValueError(
                "CHARGEFLOW_PARTITION and CHARGEFLOW_SHARE_GROUP: choose one way to share the "
                "bikes; in a share group each message reaches one instance, so a partition "
                "would acknowledge (and lose) the messages of bikes it does not take"
            )
        return self

    @model_validator(mode="after")
    def _certificate_and_key(self) -> Settings:
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError(
                "CHARGEFLOW_MQTT_CERT_FILE and CHARGEFLOW_MQTT_KEY_FILE go together: set both "
                "(the client certificate and its private key) or neither"
            )
        if self.mqtt_cert_file is not None and not self.mqtt_url.startswith("mqtts://"):
            raise ValueError(
                "CHARGEFLOW_MQTT_CERT_FILE needs TLS: CHARGEFLOW_MQTT_URL must start with mqtts://"
            )
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings of the daemon's MQTT connections (None for plain mqtt://): the
        broker verified against CHARGEFLOW_MQTT_CA_FILE or the system CAs, and with a client
        certificate, mutual TLS. A file that cannot be used is a ConfigError naming it."""
        if not self.broker.tls:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.mqtt_ca_file) if self.mqtt_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"CHARGEFLOW_MQTT_CA_FILE: cannot use {self.mqtt_ca_file}: {_why(exc)}"
            ) from None
        if self.mqtt_cert_file is not None and self.mqtt_key_file is not None:
            try:
                context.load_cert_chain(self.mqtt_cert_file, self.mqtt_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"CHARGEFLOW_MQTT_CERT_FILE/CHARGEFLOW_MQTT_KEY_FILE: cannot use "
                    f"{self.mqtt_cert_file} with {self.mqtt_key_file}: {_why(exc)}"
                ) from None
        return context

    @property
    def partition_of(self) -> Partition | None:
        """This instance's share of the fleet, or None when it takes every bike."""
        return None if self.partition is None else Partition.parse(self.partition)

    @property
    def brokers(self) -> tuple[BrokerAddress, ...]:
        """The brokers of CHARGEFLOW_MQTT_URL (the nodes of a cluster), in the order given."""
        return parse_brokers(self.mqtt_url)

    @property
    def broker(self) -> BrokerAddress:
        """The first broker of the list (the one the daemon tries first)."""
        return self.brokers[0]

    @property
    def database_display(self) -> str:
        return redact_url(self.database_url)

    @property
    def policy(self) -> SessionPolicy:
        return SessionPolicy(
            finalize_grace=timedelta(seconds=self.finalize_grace_s),
            abandon_after=timedelta(seconds=self.abandon_after_s),
            clock_skew=timedelta(seconds=self.clock_skew_s),
        )

    def load_tokens(self) -> Tokens:
        """The HTTP tokens, read once; errors name the file and the line, never a token."""
        if self.http_tokens_file is None:
            return Tokens()
        try:
            return load_tokens(self.http_tokens_file)
        except OSError as exc:
            raise ConfigError(
                f"CHARGEFLOW_HTTP_TOKENS_FILE: cannot read {self.http_tokens_file}: {exc.strerror}"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"CHARGEFLOW_HTTP_TOKENS_FILE: {self.http_tokens_file} {exc}"
            ) from None

    def load_pricing(self) -> PricingRules:
        """Read and check the pricing file; errors name the file and what to fix."""
        try:
            text = self.pricing_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"CHARGEFLOW_PRICING_FILE: cannot read {self.pricing_file}: {exc.strerror}"
            ) from None
        try:
            return parse_pricing(text, str(self.pricing_file))
        except InvalidPricing as exc:
            raise ConfigError(f"CHARGEFLOW_PRICING_FILE: {exc}") from None


def _broker_url_problem(url: str) -> str | None:
    """What is wrong with one broker's URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"}:
        return (
            f"must start with mqtt:// or mqtts://, got scheme {parts.scheme!r} "
            "(example: mqtt://user:password@127.0.0.1:1883, or several separated by commas)"
        )
    if not parts.hostname:
        return "names no host (example: mqtt://127.0.0.1:1883)"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    return None


def parse_brokers(value: str) -> tuple[BrokerAddress, ...]:
    """The brokers of a comma-separated list of mqtt:// or mqtts:// URLs (checked by Settings).

    Credentials given with the first broker stand for the others unless they name their own:
    the nodes of a cluster share their users, and a password written once is written once."""
    brokers: list[BrokerAddress] = []
    for url in value.split(","):
        parts = urlsplit(url.strip())
        tls = parts.scheme == "mqtts"
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if brokers and username is None:
            username, password = brokers[0].username, brokers[0].password
        brokers.append(
            BrokerAddress(
                host=parts.hostname or "",
                port=parts.port or (8883 if tls else 1883),
                tls=tls,
                username=username,
                password=password,
            )
        )
    return tuple(brokers)


def _why(exc: OSError | ssl.SSLError) -> str:
    """What is wrong with a TLS file, in words: not found, not PEM, key of another cert."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            return "the private key does not belong to the certificate"
        return f"not a usable PEM file ({reason})"
    return exc.strerror or str(exc)


# What the read commands (analytics, session, pricing, rejections list) use: a bad value of
# anything else (CHARGEFLOW_HTTP_PORT=abc) is not theirs to refuse.
READ_SETTINGS = frozenset({"database_url", "log_format", "log_level"})


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = Path(".env"),
    only: frozenset[str] | None = None,
) -> Settings:
    """Build Settings from CHARGEFLOW_* variables; a .env file fills what the environment lacks.

    With ``only``, the other settings keep their defaults whatever they are set to (an unknown
    name is still refused: it is a typo whoever reads it)."""
    values = _chargeflow_values(os.environ if environ is None else environ, env_file)
    known = set(Settings.model_fields)
    unknown = sorted(f"CHARGEFLOW_{key.upper()}" for key in values if key not in known)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(unknown)}; see README for the list")
    if only is not None:
        values = {key: value for key, value in values.items() if key in only}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError("; ".join(map(_problem, exc.errors()))) from None


def _chargeflow_values(environ: Mapping[str, str], env_file: Path | None) -> dict[str, str]:
    """The CHARGEFLOW_* variables set (not empty), as setting names; the environment wins
    over the .env file."""
    source: dict[str, str | None] = {}
    if env_file is not None and env_file.is_file():
        source.update(dotenv_values(env_file))
    source.update(environ)
    prefix = "CHARGEFLOW_"
    return {
        key[len(prefix) :].lower(): value
        for key, value in source.items()
        if key.startswith(prefix) and value
    }


def _problem(error: ErrorDetails) -> str:
    """One setting's problem, named as the operator sets it (a rule across settings names
    them itself)."""
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        message = f"CHARGEFLOW_{str(error['loc'][0]).upper()}: {message}"
    return message
