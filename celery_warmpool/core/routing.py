"""Routes: which action handles a signal type.

A route is a signal type (``"search.run"``) or a pattern of dot-separated segments where
``*`` matches exactly one segment and ``**`` any number of them (``"search.**"``). An
exact route wins over a pattern, and a more specific pattern (fewer ``**``, then fewer
``*``, then more segments) over a looser one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .action import Action
from .errors import ConfigurationError, UnknownSignal

__all__ = ["Routes", "matches"]


class Routes:
    """An agent class's compiled routes: looked up once per signal, checked at definition."""

    def __init__(self, owner: str, routes: Mapping[str, type[Action] | Action]) -> None:
        """Compile ``routes`` of the agent class named ``owner``.

        Raises:
            ConfigurationError: a target is not an Action, or does not implement ``run``.
        """
        self.owner = owner
        self._exact: dict[str, Action] = {}
        ranked: list[tuple[tuple[int, int, int], tuple[str, ...], Action]] = []
        for route, target in routes.items():
            action = _action_instance(owner, route, target)
            segments = tuple(route.split("."))
            if "*" in segments or "**" in segments:
                specificity = (segments.count("**"), segments.count("*"), -len(segments))
                ranked.append((specificity, segments, action))
            else:
                self._exact[route] = action
        ranked.sort(key=lambda item: item[0])
        self._patterns = [(segments, action) for _, segments, action in ranked]
        self._names = sorted(routes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def actions(self) -> list[Action]:
        """Every routed action, once each."""
        unique = {id(action): action for action in
                  [*self._exact.values(), *(action for _, action in self._patterns)]}
        return list(unique.values())

    def action_for(self, signal_type: str) -> Action:
        """The action that handles ``signal_type``.

        Raises:
            UnknownSignal: no route matches; the message lists the routes.
        """
        action = self._exact.get(signal_type)
        if action is not None:
            return action
        segments = tuple(signal_type.split("."))
        for pattern, candidate in self._patterns:
            if matches(pattern, segments):
                return candidate
        raise UnknownSignal(
            f"{self.owner} has no route for signal type {signal_type!r} "
            f"(routes: {', '.join(self._names) or 'none'})", signal_type)


def matches(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Whether dot-separated ``segments`` match ``pattern`` (``*`` one, ``**`` any)."""
    if not pattern:
        return not segments
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(matches(rest, segments[skip:]) for skip in range(len(segments) + 1))
    if not segments:
        return False
    return (head == "*" or head == segments[0]) and matches(rest, segments[1:])


def _action_instance(owner: str, route: str, target: Any) -> Action:
    action = target() if isinstance(target, type) and issubclass(target, Action) else target
    if not isinstance(action, Action):
        raise ConfigurationError(
            f"{owner}.signal_routes[{route!r}] must be an Action class or instance, "
            f"got {target!r}", field="signal_routes")
    if not action.implemented():
        raise ConfigurationError(
            f"{type(action).__qualname__} (routed from {route!r}) does not implement "
            f"{action.required_method}", field="signal_routes")
    return action
