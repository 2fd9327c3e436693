"""The plugin registry: pieces that vary (model backends, checkpoint stores, video sources, world stores,
replica discovery) chosen by name.

Built-in and third-party plugins register through Python entry points (group `genie.<kind>`), so a
package adds a plugin by being installed; `register` also lets code and tests add one directly.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

KINDS = ("backends", "stores", "sources", "worlds", "discovery")

_registered: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


class UnknownPlugin(LookupError):
    pass


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")


def register(kind: str, name: str, factory: Callable[..., Any]) -> None:
    _check_kind(kind)
    _registered[kind][name] = factory


def _from_entry_points(kind: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=f"genie.{kind}")}


def available(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted(set(_registered[kind]) | set(_from_entry_points(kind)))


def get(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as `name`; explicit registrations win over entry points."""
    _check_kind(kind)
    if name in _registered[kind]:
        return _registered[kind][name]
    found = _from_entry_points(kind).get(name)
    if found is None:
        raise UnknownPlugin(f"no {kind.removesuffix('s')} plugin named {name!r}; available: {', '.join(available(kind)) or 'none'}")
    return found.load()
