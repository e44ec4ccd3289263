"""ChargeFlow's pure domain: sessions, telemetry, billing and analytics; standard library only."""
