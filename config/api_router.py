"""The REST API: /api/v1/ with its OpenAPI schema and interactive docs."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularSwaggerView

from orchestration.api.schema import CachedSchemaView

app_name = "api"

urlpatterns = [
    path("schema/", CachedSchemaView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("", include("orchestration.api.urls")),
]
