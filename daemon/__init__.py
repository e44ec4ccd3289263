"""ChargeFlow daemon: the adapters (MQTT, PostgreSQL, HTTP) and the composition root."""

from importlib.metadata import PackageNotFoundError, version


def installed_version() -> str:
    """The installed chargeflow version (what `--version` and the OpenAPI document say)."""
    try:
        return version("chargeflow")
    except PackageNotFoundError:
        return "0+unknown"
