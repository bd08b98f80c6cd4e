"""Action: parameter validation (unknown keys always rejected) and misconfiguration."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from celery_warmpool import Action, ActionContext, Agent, ConfigurationError, InvalidSignal
from celery_warmpool.core.action import NoParams


class Search(Action):
    name = "search"

    class Params(BaseModel):
        model_config = ConfigDict(extra="allow")

        query: str
        limit: int = 10

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {}


class Ping(Action):
    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {}


def test_params_validate_into_the_users_model() -> None:
    params = Search().validate_params({"query": "pools"}, "search.run")

    assert isinstance(params, Search.Params)
    assert params.model_dump() == {"query": "pools", "limit": 10}


def test_unknown_key_is_rejected_even_when_params_allow_extra() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Search().validate_params({"query": "pools", "colour": "red"}, "search.run")

    assert str(caught.value) == (
        "invalid parameters for action 'search': colour: Extra inputs are not permitted")
    assert caught.value.signal_type == "search.run"
    assert [error["loc"] for error in caught.value.errors] == [("colour",)]


def test_users_params_model_keeps_its_own_config() -> None:
    # Rejecting unknown keys must not change the model the user declared.
    assert Search.Params.model_config.get("extra") == "allow"
    assert Search.Params(query="q", colour="red").model_extra == {"colour": "red"}


def test_missing_and_invalid_params_name_each_field() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Search().validate_params({"limit": "many"}, "search.run")

    assert str(caught.value) == (
        "invalid parameters for action 'search': query: Field required, "
        "limit: Input should be a valid integer, unable to parse string as an integer")


def test_non_object_data_is_invalid() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Search().validate_params(["pools"], "search.run")

    assert str(caught.value) == "action 'search' expects an object as signal data, got list"


def test_no_data_means_no_params() -> None:
    params = Ping().validate_params(None)

    assert isinstance(params, NoParams)
    assert params.model_dump() == {}


def test_action_without_params_rejects_any_key() -> None:
    with pytest.raises(InvalidSignal, match=r"'Ping': x: Extra inputs are not permitted$"):
        Ping().validate_params({"x": 1})


def test_name_defaults_to_class_name() -> None:
    assert Ping.name == "Ping"
    assert Search.name == "search"


def test_params_that_are_not_a_pydantic_model_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as caught:
        class Broken(Action):
            Params = dict  # type: ignore[assignment]

    assert caught.value.field == "Params"
    assert "Broken.Params must be a pydantic BaseModel subclass" in str(caught.value)


def test_action_without_run_is_a_configuration_error_when_routed() -> None:
    class Lazy(Action):
        name = "lazy"

    with pytest.raises(ConfigurationError) as caught:
        class LazyAgent(Agent[Any]):
            signal_routes: ClassVar[dict[str, Any]] = {"lazy.go": Lazy}

    assert caught.value.field == "signal_routes"
    assert str(caught.value) == (
        "test_action_without_run_is_a_configuration_error_when_routed.<locals>.Lazy "
        "(routed from 'lazy.go') does not implement run(params, context)")


def test_route_to_something_not_an_action_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"signal_routes\['x'\] must be an Action"):
        class Confused(Agent[Any]):
            signal_routes: ClassVar[dict[str, Any]] = {"x": len}  # type: ignore[dict-item]


def test_action_instance_can_be_routed() -> None:
    class Routed(Agent[Any]):
        signal_routes: ClassVar[dict[str, Any]] = {"ping": Ping()}

    assert isinstance(Routed().route("ping"), Ping)
