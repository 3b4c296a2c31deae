"""The REST API: /api/v1/ with its OpenAPI schema and interactive docs."""

from __future__ import annotations

from django.urls import include, path

from orchestration.api.schema import CachedSchemaView, DocsView

app_name = "api"

urlpatterns = [
    path("schema/", CachedSchemaView.as_view(), name="schema"),
    path("docs/", DocsView.as_view(url_name="api:schema"), name="docs"),
    path("", include("orchestration.api.urls")),
]
