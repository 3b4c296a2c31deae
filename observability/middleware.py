"""django_prometheus' request metrics with every `method` label bounded."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django_prometheus.middleware import PrometheusAfterMiddleware as _PrometheusAfterMiddleware


class PrometheusAfterMiddleware(_PrometheusAfterMiddleware):
    """django_prometheus (2.5) counts a method outside HTTP's as `<invalid method>`, except in
    `django_http_requests_latency_seconds_by_view_method`, labelled with the request's method as
    sent: every method token a client invents (unauthenticated: the label is set whatever the
    answer) would be a histogram of its own, kept for good in each web process's file and in
    the merged archive. That label goes through the same bound here."""

    def label_metric(
        self, metric: Any, request: HttpRequest, response: HttpResponse | None = None, **labels: str
    ) -> Any:
        if "method" in labels:
            labels["method"] = self._method(request)
        return super().label_metric(metric, request, response, **labels)
