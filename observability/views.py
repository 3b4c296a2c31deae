"""The web process's /metrics: django_prometheus and platform metrics, plus scrape-time state."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from observability.collectors import state_registry


def process_registry() -> CollectorRegistry:
    """This process's metrics, or with PROMETHEUS_MULTIPROC_DIR (gunicorn's several
    processes) the sum over every process writing to that directory, the files of those that
    have exited merged first (as a worker's: a reload replaces every process)."""
    if settings.PROMETHEUS_MULTIPROC_DIR:
        from observability.worker import PoolMetricsCollector

        registry = CollectorRegistry()
        registry.register(PoolMetricsCollector(settings.PROMETHEUS_MULTIPROC_DIR))
        return registry
    return REGISTRY


@login_not_required
@require_http_methods(["GET", "HEAD"])
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition. Unauthenticated: keep it off the public network."""
    # State first: a collector failing during this scrape is counted in the process metrics below.
    state = generate_latest(state_registry)
    return HttpResponse(state + generate_latest(process_registry()), content_type=CONTENT_TYPE_LATEST)
