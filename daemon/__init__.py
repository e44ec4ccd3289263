"""ChargeFlow daemon: the adapters (MQTT, PostgreSQL, HTTP) and the composition root."""
