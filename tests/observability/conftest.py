from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.orchestration.conftest import builtin_agents, engine  # noqa: F401 - shared fixtures

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser,
    keyed by (sample name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent (a counter with that label set not yet touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a local test URL
        assert response.status == 200
        return parse_samples(response.read().decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_port() -> int:
    """A local port where nothing listens."""
    return free_port()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A local port that accepts TCP connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]
