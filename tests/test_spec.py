"""PoolSpec: defaults, clear errors naming pool and field, parsing, environment overrides."""

from __future__ import annotations

import pytest

from celery_warmpool import AgentPool, ConfigurationError, PoolOptions, PoolSpec
from celery_warmpool.core.spec import import_object

from .core_agents import Boom, CounterAgent


def test_defaults_are_the_documented_ones() -> None:
    spec = PoolSpec("search", CounterAgent)

    assert spec.model_dump() == {
        "name": "search", "agent": CounterAgent, "size": 5, "max_overflow": 0,
        "strategy": "lifo", "overflow_ttl": 0.0, "max_uses": None, "max_age": None,
        "health_check_interval": None, "reset_on_checkin": False, "reply_state": True,
        "discard_on": (),
        "start_timeout": 60.0, "monitor_interval": None, "stream_buffer": 256,
        "stream_idle_timeout": 30.0, "max_models": None, "models": (), "warmup": (),
        "devices": (), "initial_state": None, "worker_opts": None,
        "queue": "warmpool.search",
        "dead_letter_queue": "warmpool.search.dead", "max_redeliveries": 3,
        "max_queued": None,
    }


def test_options_are_the_pool_behaviour_part() -> None:
    spec = PoolSpec("search", CounterAgent, size=8, max_overflow=4, strategy="fifo")

    assert spec.options == PoolOptions(size=8, max_overflow=4, strategy="fifo")


def test_agent_may_be_given_as_an_import_path() -> None:
    assert PoolSpec("a", "tests.core_agents:CounterAgent").agent is CounterAgent
    assert PoolSpec("a", "tests.core_agents.CounterAgent").agent is CounterAgent


def test_discard_on_accepts_classes_paths_and_a_single_class() -> None:
    assert PoolSpec("a", CounterAgent, discard_on=["builtins:KeyError", Boom]).discard_on == (
        KeyError, Boom)
    assert PoolSpec("a", CounterAgent, discard_on=Boom).discard_on == (Boom,)
    assert PoolSpec("a", CounterAgent, discard_on=None).discard_on == ()


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"size": 0}, "size", "pool 'search': invalid size: Input should be greater than or "
                          "equal to 1"),
    ({"max_overflow": -1}, "max_overflow",
     "pool 'search': invalid max_overflow: Input should be greater than or equal to 0"),
    ({"strategy": "random"}, "strategy",
     "pool 'search': invalid strategy: Input should be 'lifo' or 'fifo'"),
    ({"max_age": 0}, "max_age",
     "pool 'search': invalid max_age: Input should be greater than 0"),
    ({"size": "many"}, "size",
     "pool 'search': invalid size: Input should be a valid integer, unable to parse "
     "string as an integer"),
    ({"colour": "red"}, "colour", "pool 'search': invalid colour: Extra inputs are not "
                                  "permitted"),
    ({"discard_on": ["builtins:len"]}, "discard_on",
     "pool 'search': invalid discard_on: Value error, 'builtins:len' is not an exception "
     "class"),
    ({"discard_on": ["nowhere:Gone"]}, "discard_on",
     "pool 'search': invalid discard_on: Value error, cannot import 'nowhere:Gone': "
     "No module named 'nowhere'"),
])
def test_invalid_option_is_a_configuration_error_naming_pool_and_field(
        options: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("search", CounterAgent, **options)

    assert str(caught.value) == message
    assert (caught.value.pool, caught.value.field) == ("search", field)


def test_every_invalid_field_is_mentioned() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("search", CounterAgent, size=0, strategy="random")

    assert str(caught.value) == (
        "pool 'search': invalid size: Input should be greater than or equal to 1 "
        "(also invalid: strategy)")


def test_agent_that_is_not_an_agent_class_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("search", "builtins:dict")

    assert str(caught.value) == (
        "pool 'search': invalid agent: Value error, 'builtins:dict' is not a "
        "celery_warmpool.Agent subclass")
    assert caught.value.field == "agent"


def test_agent_path_that_cannot_be_imported_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("search", "tests.core_agents:Missing")

    assert str(caught.value) == (
        "pool 'search': invalid agent: Value error, cannot import "
        "'tests.core_agents:Missing': module 'tests.core_agents' has no attribute 'Missing'")
    assert caught.value.field == "agent"


def test_pool_name_must_be_an_identifier() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("9-lives", CounterAgent)

    assert caught.value.field == "name"
    assert str(caught.value) == (
        "pool '9-lives': invalid name: Value error, a pool name starts with a letter and "
        "holds letters, digits and _")


def test_missing_agent_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("search")

    assert str(caught.value) == "pool 'search': invalid agent: Field required"


def test_parse_reads_spec_mapping_and_tuple() -> None:
    spec = PoolSpec("search", CounterAgent, size=2)

    assert PoolSpec.parse(spec) is spec
    assert PoolSpec.parse({"name": "search", "agent": CounterAgent, "size": 2}) == spec
    assert PoolSpec.parse(("search", CounterAgent, {"size": 2})) == spec
    assert PoolSpec.parse(("search", CounterAgent)).size == 5


def test_parse_of_anything_else_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec.parse(["search", CounterAgent])  # type: ignore[arg-type]

    assert caught.value.field == "pools"
    assert str(caught.value).startswith("cannot read a pool spec from ['search', ")


def test_environment_overrides_options() -> None:
    spec = PoolSpec("fast_search", CounterAgent, size=8, max_overflow=4)

    changed = spec.with_environment({
        "WARMPOOL_FAST_SEARCH_SIZE": "16", "WARMPOOL_FAST_SEARCH_STRATEGY": "fifo",
        "WARMPOOL_FAST_SEARCH_RESET_ON_CHECKIN": "true",
    })

    assert (changed.size, changed.max_overflow, changed.strategy, changed.reset_on_checkin) \
        == (16, 4, "fifo", True)
    assert spec.size == 8


def test_environment_of_other_pools_is_ignored() -> None:
    spec = PoolSpec("fast", CounterAgent, size=2)

    unchanged = spec.with_environment({"WARMPOOL_FAST_SEARCH_SIZE": "16",
                                       "WARMPOOL_SLOW_SIZE": "3", "SIZE": "9"})

    assert unchanged is spec


def test_invalid_environment_value_names_the_variable() -> None:
    spec = PoolSpec("search", CounterAgent)

    with pytest.raises(ConfigurationError) as caught:
        spec.with_environment({"WARMPOOL_SEARCH_SIZE": "0"})

    assert str(caught.value) == (
        "pool 'search': invalid WARMPOOL_SEARCH_SIZE: Input should be greater than or "
        "equal to 1")
    assert caught.value.field == "size"


def test_stream_options_are_overridable_from_the_environment() -> None:
    spec = PoolSpec("writers", CounterAgent)

    changed = spec.with_environment({"WARMPOOL_WRITERS_STREAM_BUFFER": "32",
                                     "WARMPOOL_WRITERS_STREAM_IDLE_TIMEOUT": "2.5"})

    assert (changed.stream_buffer, changed.stream_idle_timeout) == (32, 2.5)
    assert changed.options.stream_buffer == 32


@pytest.mark.parametrize("option,value,message", [
    ("stream_buffer", 0, "Input should be greater than or equal to 1"),
    ("stream_idle_timeout", 0, "Input should be greater than 0"),
])
def test_stream_options_out_of_bounds_are_refused(option: str, value: int,
                                                  message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        PoolSpec("writers", CounterAgent, **{option: value})

    assert str(caught.value) == f"pool 'writers': invalid {option}: {message}"
    assert caught.value.field == option


def test_environment_is_read_from_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_SEARCH_MAX_OVERFLOW", "3")

    assert PoolSpec("search", CounterAgent).with_environment().max_overflow == 3


def test_pool_options_are_validated_when_the_pool_is_made() -> None:
    with pytest.raises(ConfigurationError) as caught:
        AgentPool(CounterAgent, name="direct", size=0)

    assert (caught.value.pool, caught.value.field) == ("direct", "size")


def test_import_object_says_what_is_missing() -> None:
    assert import_object("tests.core_agents:CounterAgent.State") is CounterAgent.State
    with pytest.raises(ImportError, match="is not an import path"):
        import_object("nodots")
