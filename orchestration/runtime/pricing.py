"""Token prices (prices.json beside this module) and the cost of a call.

The table is read once per process. A malformed file raises ImproperlyConfigured naming the
file and the entry, so a bad edit fails loudly instead of recording wrong costs.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

PRICES_PATH = Path(__file__).with_name("prices.json")
MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal("0.000001")

# The unpriced models this process has warned about (once each, and about the first few only:
# an HTTP agent's service names the model it ran in each result, and a name that changes with
# every result (a build, a date, a run id) must not grow this for the life of the worker).
_warned: set[str] = set()
_warned_lock = threading.Lock()
WARNED_MODELS_MAX = 64


@dataclass(frozen=True)
class Price:
    """USD per million input and output tokens; and, where the provider bills them otherwise,
    per million input tokens read from its prompt cache, written to it, and written to it for
    an hour (Anthropic's 1-hour cache writes, billed above its 5-minute ones) (None: at the
    input price; a 1-hour write without its own price, at the cache_write price)."""

    input_per_million: Decimal
    output_per_million: Decimal
    cached_input_per_million: Decimal | None = None
    cache_write_per_million: Decimal | None = None
    cache_write_1h_per_million: Decimal | None = None


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ImproperlyConfigured(f"{where}: must be a number or a numeric string, got {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ImproperlyConfigured(f"{where}: {value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ImproperlyConfigured(f"{where}: must be a non-negative number, got {value!r}")
    return number


def parse_price_table(data: Any, *, source: str) -> dict[str, Price]:
    """Validate the JSON document of a price table; errors name `source` and the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ImproperlyConfigured(f"{source}: must be an object with a 'models' object")
    table: dict[str, Price] = {}
    for model, entry in data["models"].items():
        where = f"{source}: models.{model}"
        if not isinstance(entry, dict):
            raise ImproperlyConfigured(f"{where}: must be an object with 'input' and 'output'")
        unknown = set(entry) - {"input", "output", "cached_input", "cache_write", "cache_write_1h", "aliases"}
        if unknown:
            raise ImproperlyConfigured(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("input", "output"):
            if key not in entry:
                raise ImproperlyConfigured(f"{where}: '{key}' is required (USD per million tokens)")
        cache_rates = {
            key: _decimal(entry[key], f"{where}.{key}") if key in entry else None
            for key in ("cached_input", "cache_write", "cache_write_1h")
        }
        price = Price(
            _decimal(entry["input"], f"{where}.input"),
            _decimal(entry["output"], f"{where}.output"),
            cache_rates["cached_input"],
            cache_rates["cache_write"],
            cache_rates["cache_write_1h"],
        )
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ImproperlyConfigured(f"{where}.aliases: must be a list of model names")
        for name in (model, *aliases):
            if name in table:
                raise ImproperlyConfigured(f"{where}: {name!r} is priced twice")
            table[name] = price
    return table


@cache
def price_table() -> dict[str, Price]:
    """The table from prices.json, loaded once per process."""
    try:
        data = json.loads(PRICES_PATH.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImproperlyConfigured(f"{PRICES_PATH}: cannot be read as JSON: {exc}") from None
    return parse_price_table(data, source=str(PRICES_PATH))


def is_priced(model: str | None) -> bool:
    return bool(model) and model in price_table()


def cost_usd(
    model: str | None,
    input_tokens: int,
    output_tokens: int,
    *,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
) -> Decimal:
    """Cost in USD, quantized to 6 decimal places. `input_tokens` counts every input token,
    those of them the provider's prompt cache served (`cached_input_tokens`) or stored
    (`cache_write_tokens`, of which `cache_write_1h_tokens` for an hour) included: these are
    priced at the model's cached_input, cache_write and cache_write_1h prices when it lists
    them. An unknown model costs 0 and is logged once per
    process and model, for the first WARNED_MODELS_MAX models (a missing price must be
    noticed, not fail the task)."""
    price = price_table().get(model or "")
    if price is None:
        if model:
            with _warned_lock:
                first = model not in _warned and len(_warned) < WARNED_MODELS_MAX
                if first:
                    _warned.add(model)
            if first:
                logger.warning("no price for model %r in %s: its tokens are recorded at cost 0", model, PRICES_PATH)
        return Decimal(0).quantize(COST_QUANTUM)
    cached = min(cached_input_tokens, input_tokens)
    written = min(cache_write_tokens, input_tokens - cached)
    written_1h = min(cache_write_1h_tokens, written)
    cached_rate = price.cached_input_per_million
    write_rate = price.input_per_million if price.cache_write_per_million is None else price.cache_write_per_million
    write_1h_rate = write_rate if price.cache_write_1h_per_million is None else price.cache_write_1h_per_million
    cost = (
        (input_tokens - cached - written) * price.input_per_million
        + cached * (price.input_per_million if cached_rate is None else cached_rate)
        + (written - written_1h) * write_rate
        + written_1h * write_1h_rate
        + output_tokens * price.output_per_million
    ) / MILLION
    return cost.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)
