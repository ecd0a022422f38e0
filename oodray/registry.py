"""A small name -> builder map, so components are chosen by name (datasets, classifiers, translators, losses)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from oodray.errors import ConfigError


class Registry:
    """Maps names to builders. Unknown names raise a one-line `ConfigError` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._builders[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Calls the builder, dropping kwargs left as None so each builder keeps its own defaults."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
