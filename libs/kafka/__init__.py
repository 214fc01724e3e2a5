"""Kafka behind a small interface: produce, consume with ack/nack, safe offset commits."""
