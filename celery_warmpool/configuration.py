"""PoolConfiguration: which pools an app has, and which of them a worker hosts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .core.errors import ConfigurationError, UnknownPool
from .core.spec import PoolSpec

__all__ = ["PoolConfiguration"]


class PoolConfiguration:
    """An app's pool specs, read once, with environment overrides applied.

    Specs come from ``pools`` or, when it is ``None``, from ``app.conf.warmpool_pools``
    (a list of :class:`PoolSpec`, mappings, or ``(name, agent, {options})`` tuples).
    ``WARMPOOL_<POOL>_<OPTION>`` environment variables override options. A worker hosts
    every pool unless ``host``, the worker option ``--warmpool-pools a,b`` or
    ``app.conf.warmpool_host_pools`` names a subset.

    Raises:
        ConfigurationError: a spec is invalid; the message names the pool and the field.
    """

    def __init__(self, app: Any, pools: Iterable[Any] | None = None,
                 host: Iterable[str] | None = None) -> None:
        self.app = app
        self._specs = None if pools is None else self._parse(pools)
        self._host = list(host) if host is not None else None

    @property
    def specs(self) -> dict[str, PoolSpec]:
        """Every configured pool's spec, by name (read from ``app.conf`` on first use)."""
        if self._specs is None:
            self._specs = self._parse(self.app.conf.get("warmpool_pools") or [])
        return self._specs

    def spec(self, pool: str) -> PoolSpec:
        """The spec of ``pool``.

        Raises:
            UnknownPool: no pool of that name is configured.
        """
        try:
            return self.specs[pool]
        except KeyError:
            known = ", ".join(sorted(self.specs)) or "none"
            raise UnknownPool(f"no pool named {pool!r} is configured (pools: {known})",
                              pool) from None

    def hosted(self, option: str | None = None) -> list[str]:
        """The pools a worker hosts, given its ``--warmpool-pools`` option (if any).

        Raises:
            ConfigurationError: a named pool is not configured.
        """
        chosen: Iterable[str] | None = None
        if option:
            chosen = [name.strip() for name in option.split(",") if name.strip()]
        elif self._host is not None:
            chosen = self._host
        elif self.app.conf.get("warmpool_host_pools"):
            chosen = self.app.conf.get("warmpool_host_pools")
        if chosen is None:
            return list(self.specs)
        names = list(chosen)
        unknown = [name for name in names if name not in self.specs]
        if unknown:
            raise ConfigurationError(
                f"this worker is asked to host unknown pools {unknown} "
                f"(configured: {sorted(self.specs)})", field="warmpool_pools")
        return names

    @staticmethod
    def _parse(pools: Iterable[Any]) -> dict[str, PoolSpec]:
        if isinstance(pools, str | bytes | Mapping):
            raise ConfigurationError(
                "warm pools must be a list of PoolSpec, mappings or (name, agent, {options})",
                field="pools")
        specs: dict[str, PoolSpec] = {}
        for given in pools:
            spec = PoolSpec.parse(given).with_environment()
            if spec.name in specs:
                raise ConfigurationError(f"pool {spec.name!r} is configured twice",
                                         spec.name, "name")
            specs[spec.name] = spec
        return specs
