import pytest

from libs import config


def test_defaults_need_no_environment():
    loaded = config.load(env={})
    assert loaded.gateway_port == 50051
    assert loaded.kafka_bootstrap == "127.0.0.1:9092"


def test_environment_overrides_a_default_with_the_declared_type():
    loaded = config.load(env={"WEIR_GATEWAY_PORT": "6000", "WEIR_SHUTDOWN_GRACE_SECONDS": "2.5"})
    assert loaded.gateway_port == 6000
    assert loaded.shutdown_grace_seconds == 2.5


def test_every_invalid_setting_is_named_at_once():
    with pytest.raises(config.ConfigError) as raised:
        config.load(env={"WEIR_GATEWAY_PORT": "ninety", "WEIR_TASK_PARTITIONS": "0",
                         "WEIR_LOG_LEVEL": "LOUD"})
    message = str(raised.value)
    for key in ("WEIR_GATEWAY_PORT", "WEIR_TASK_PARTITIONS", "WEIR_LOG_LEVEL"):
        assert key in message


def test_unknown_explicit_overrides_are_refused():
    with pytest.raises(config.ConfigError, match="unknown settings: nope"):
        config.load(env={}, nope=1)


def test_describe_lists_every_setting_with_its_description():
    text = config.describe(config.load(env={}))
    assert "WEIR_KEYSPACE" in text
    assert "Cassandra keyspace" in text
