"""A gateway's OpenAPI document as a check of what the gateway answers.

Used by ``tests/test_http.py`` (every response its tests see) and
``tests/test_http_contract.py`` (hostile requests): a response to a documented route must
have a documented status and a body its schema takes; a stream's events must be the
events the document describes.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from jsonschema import Draft202012Validator, FormatChecker

#: Routes the document leaves out on purpose: the pages a browser opens, and the document.
PAGES = frozenset({"/", "/docs", "/openapi.json"})
#: What a route the document does not have may answer: no token, no such route (or pool),
#: not that method, a body over the limit (refused before any route is looked up).
UNDOCUMENTED = frozenset({401, 404, 405, 413})


class Contract:
    """Checks responses against ``document`` (a gateway's ``/openapi.json``)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[tuple[str, str, int]] = set()

    @classmethod
    def fetch(cls, url: str, token: str | None) -> Contract:
        """The contract of the gateway at ``url``."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = httpx.get(f"{url}/openapi.json", headers=headers, timeout=30)
        answer.raise_for_status()
        return cls(answer.json())

    def operation(self, method: str, path: str) -> dict[str, Any] | None:
        """The document's operation for ``method`` on ``path``, if it has one."""
        operation: dict[str, Any] | None = self.document["paths"].get(path, {}).get(
            method.lower())
        return operation

    def response_hook(self, response: httpx.Response) -> None:
        """For ``httpx``'s ``event_hooks``: check each response as it comes (a stream's
        body is left unread, for its reader)."""
        if not _is_stream(response):
            response.read()
        self.check(response)

    def check(self, response: httpx.Response) -> None:
        """Fail unless ``response`` is one the document describes for its request.

        Raises:
            AssertionError: saying what does not match.
        """
        method, path = response.request.method, response.request.url.path
        status = response.status_code
        where = f"{method} {path} -> {status}"
        if path in PAGES:
            assert status in (200, 401, 413), where
            return
        operation = self.operation(method, path)
        if operation is None:
            assert status in UNDOCUMENTED, f"{where}: not a route, yet not 401/404/405/413"
            assert response.headers["content-type"] == "application/problem+json", where
            return
        self.seen.add((method, path, status))
        documented = operation["responses"].get(str(status))
        assert documented is not None, (
            f"{where}: status not in the document (it has {sorted(operation['responses'])})")
        media = response.headers.get("content-type", "").split(";")[0]
        content = documented.get("content", {})
        assert media in content, f"{where}: {media} not documented (only {sorted(content)})"
        if media == "text/event-stream":
            return  # read by the test; see check_events
        self.validate(json.loads(response.content), content[media]["schema"], where)

    def check_events(self, path: str, events: list[tuple[str, Any]]) -> None:
        """Fail unless ``events`` (name, decoded data) are a stream the document describes:
        chunks, then one reply or one error, each of its documented schema."""
        operation = self.operation("POST", path)
        assert operation is not None, path
        media = operation["responses"]["200"]["content"]["text/event-stream"]
        kinds = {item["properties"]["event"]["const"]: item["properties"]["data"]
                 for item in media["x-itemSchema"]["oneOf"]}
        names = [name for name, _ in events]
        assert names and names[-1] in ("reply", "error"), names
        assert set(names[:-1]) <= {"chunk"}, names
        for name, data in events:
            assert name in kinds, name
            self.validate(data, kinds[name]["contentSchema"], f"{path} event {name}")

    def validate(self, value: Any, schema: dict[str, Any], where: str) -> None:
        """Fail unless ``value`` is valid under ``schema`` (its ``$ref`` into the
        document's components resolved), formats asserted."""
        rooted = {**schema, "components": self.document["components"]}
        errors = sorted(Draft202012Validator(rooted, format_checker=FormatChecker())
                        .iter_errors(value), key=str)
        assert not errors, f"{where}: {errors[0].message} in {json.dumps(value)[:500]}"


def _is_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
