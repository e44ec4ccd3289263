"""The MQTT edge: payload schemas, manual acknowledgements, the consumer and the publisher."""
