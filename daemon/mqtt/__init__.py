"""The MQTT edge: the broker connection at either protocol level (connection, packets),
topics, payload schemas, the published documents' topics, the AsyncAPI contract, publishing."""
