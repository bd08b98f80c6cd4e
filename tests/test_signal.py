"""Signal: CloudEvents 1.0 fields, building, JSON round trip, validation errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from celery_warmpool import InvalidSignal, Signal


def test_new_fills_cloudevents_attributes() -> None:
    before = datetime.now(UTC)
    signal = Signal.new("search.run", {"query": "pools"}, source="/api")
    after = datetime.now(UTC)

    assert signal.type == "search.run"
    assert signal.data == {"query": "pools"}
    assert signal.source == "/api"
    assert signal.specversion == "1.0"
    assert signal.datacontenttype == "application/json"
    assert signal.subject is None
    assert signal.dataschema is None
    assert str(uuid.UUID(signal.id)) == signal.id
    assert before <= signal.time <= after
    assert signal.time.tzinfo is not None


def test_new_gives_each_signal_its_own_id() -> None:
    assert Signal.new("a").id != Signal.new("a").id


def test_new_defaults_source_and_accepts_extra_attributes() -> None:
    signal = Signal.new("a.b", subject="user-7", dataschema="https://example.com/s.json")

    assert signal.source == "/celery_warmpool"
    assert signal.subject == "user-7"
    assert signal.dataschema == "https://example.com/s.json"
    assert signal.data is None


def test_json_round_trip_keeps_every_field() -> None:
    signal = Signal.new("search.run", {"query": "pools", "limit": 3}, source="/api",
                        subject="s")

    again = Signal.from_json(signal.to_json())

    assert again == signal
    assert again.time == signal.time


def test_to_json_is_a_cloudevents_document_without_empty_fields() -> None:
    signal = Signal.new("a.b", {"x": 1}, id="fixed-id",
                        time=datetime(2024, 5, 1, 12, 0, tzinfo=UTC))

    assert json.loads(signal.to_json()) == {
        "id": "fixed-id", "type": "a.b", "source": "/celery_warmpool", "specversion": "1.0",
        "time": "2024-05-01T12:00:00Z", "datacontenttype": "application/json",
        "data": {"x": 1},
    }


def test_to_wire_is_json_compatible_and_parses_back() -> None:
    signal = Signal.new("a.b", [1, 2])

    wire = signal.to_wire()

    assert json.loads(json.dumps(wire)) == wire
    assert Signal.parse(wire) == signal


def test_parse_accepts_signal_mapping_and_bytes() -> None:
    signal = Signal.new("a.b", {"x": 1})

    assert Signal.parse(signal) is signal
    assert Signal.parse(signal.to_wire()) == signal
    assert Signal.parse(signal.to_json().encode()) == signal


def test_signal_is_immutable() -> None:
    signal = Signal.new("a.b")

    with pytest.raises(ValidationError, match="frozen"):
        signal.type = "c.d"  # type: ignore[misc]


def test_missing_type_is_invalid_naming_the_field() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Signal.parse({"source": "/api"})

    assert str(caught.value) == "invalid signal: type: Field required"
    assert [error["loc"] for error in caught.value.errors] == [("type",)]
    assert caught.value.signal_type is None


def test_empty_type_is_invalid() -> None:
    with pytest.raises(InvalidSignal, match=r"^invalid signal: type: String should have at "):
        Signal.new("")


def test_bad_specversion_is_invalid_naming_the_field() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Signal.new("a.b", specversion="0.3")

    assert str(caught.value) == (
        "invalid signal: specversion: Value error, only CloudEvents specversion '1.0' "
        "is supported")
    assert caught.value.signal_type == "a.b"


def test_non_json_datacontenttype_is_invalid_naming_the_field() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Signal.new("a.b", datacontenttype="application/xml")

    assert str(caught.value) == (
        "invalid signal: datacontenttype: Value error, signals carry JSON data only "
        "(application/json)")


def test_json_suffixed_datacontenttype_is_accepted() -> None:
    signal = Signal.new("a.b", datacontenttype="application/cloudevents+json")

    assert signal.datacontenttype == "application/cloudevents+json"


def test_unknown_attribute_is_invalid() -> None:
    with pytest.raises(InvalidSignal, match=r"^invalid signal: colour: Extra inputs are not "):
        Signal.new("a.b", colour="red")


def test_malformed_json_is_invalid() -> None:
    with pytest.raises(InvalidSignal, match=r"^invalid signal: <signal>: Invalid JSON"):
        Signal.from_json("{not json")


def test_invalid_signal_survives_celery_style_rebuild() -> None:
    with pytest.raises(InvalidSignal) as caught:
        Signal.new("a.b", specversion="2.0")
    error = caught.value

    rebuilt = type(error)(*error.args)

    assert str(rebuilt) == str(error)
    assert rebuilt.signal_type == "a.b"
    assert rebuilt.errors == error.errors


def test_data_that_json_cannot_carry_is_an_invalid_signal_naming_where() -> None:
    import datetime

    with pytest.raises(InvalidSignal, match=r"data\.when is a date"):
        Signal.new("report.run", {"when": datetime.date(2026, 1, 1)})
    with pytest.raises(InvalidSignal, match=r"non-string key 1"):
        Signal.new("report.run", {"rows": {1: "a"}})
