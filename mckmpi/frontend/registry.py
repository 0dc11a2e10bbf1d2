"""The subcommand registry: each command module registers its commands with `@command`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    build: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = []


def command(name: str, summary: str, description: str = "") -> Callable:
    """Register a subcommand: the decorated function fills its parser; `.run` attaches the
    handler that executes it."""

    def register(build: Callable[[argparse.ArgumentParser], None]) -> Callable:
        def attach(handler: Callable[[argparse.Namespace], int]) -> Callable:
            COMMANDS.append(Command(name, summary, description or summary, build, handler))
            return handler

        build.run = attach  # type: ignore[attr-defined]
        return build

    return register
