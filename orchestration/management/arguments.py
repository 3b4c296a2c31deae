"""Argument types and errors the management commands share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from django.conf import settings
from django.core.management.base import CommandError


def seconds(*, zero: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type for a duration in seconds: a finite number above 0 (or 0 itself with
    `zero`), at most `maximum`. NaN and infinity are refused: a deadline computed from either
    never passes, so the command would wait for ever."""
    if maximum is not None:
        wanted = f"a number of seconds between 0 and {maximum:g}"
    else:
        wanted = "a number of seconds (0 or more)" if zero else "a positive number of seconds"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and (number >= 0 if zero else number > 0)) or (
            maximum is not None and number > maximum
        ):
            raise argparse.ArgumentTypeError(f"{value!r} is not {wanted}")
        return number

    return parse


@contextmanager
def synapse_reachable() -> Iterator[None]:
    """Redis errors of the Synapse stream's client as a CommandError naming them; without
    REDIS_URL (the embedded SQLite mode) there is no stream to reach."""
    if not settings.REDIS_URL:
        raise CommandError("the Synapse stream needs Redis: set REDIS_URL")
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CommandError(f"cannot reach the Synapse stream: {type(exc).__name__}: {exc}") from None
