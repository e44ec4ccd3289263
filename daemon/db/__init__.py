"""PostgreSQL: migrations, the store behind the fleet, and the outbox."""
