"""ChargeFlow daemon: the adapters (MQTT, PostgreSQL, HTTP) and the composition root."""

from importlib.metadata import PackageNotFoundError, version

# The most kept rejections one page holds: HTTP, the CLI and the read model take it from here.
MAX_PAGE = 1000


def installed_version() -> str:
    """The installed chargeflow version (what `--version` and the OpenAPI document say)."""
    try:
        return version("chargeflow")
    except PackageNotFoundError:
        return "0+unknown"
