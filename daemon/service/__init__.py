"""The service layer: what the daemon does, over the domain and the adapters.

``pipeline`` ingests batches of MQTT deliveries (decide, commit, acknowledge in order);
``unit_of_work`` is one batch's transaction (lock and load the bikes, decide, write);
``outbox`` relays committed outbound messages to the broker; ``replay`` decides kept
rejections again. The adapters below (``daemon.db``: SQL and rows; ``daemon.mqtt``: topics,
payloads, the connection) never import each other (an import-linter contract, pyproject.toml).
"""
