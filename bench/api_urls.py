"""URLs of bench/api.py: the project's, and after them a floor view and a bare events list.

The floor is what any request costs in this stack before the endpoint does its work:
Django's WSGI handler and middleware (metrics, security, sessions, CSRF, ...), URL
resolving, DRF's dispatch and content negotiation, and rendering a page by the renderer the
endpoints use. It answers with a page body an endpoint returned (set by bench/api.py), held
in memory: no authentication, rate limit, database or serialization. An endpoint cannot cost
less than this plus its statement.

The bare events list is `GET /api/v1/events/` with what the platform adds to DRF's request
taken out: no API-key authentication (no key lookup, and no `SELECT 1` health check in its
place), no rate-limit count, no filter set (the `entity_id` filter applied straight to the
queryset) and no ownership rule (an admin's view). What is left is the list itself as the
endpoint runs it (keyset pagination, the statement, the rows' representation, the response
with its links), over the floor."""

from typing import Any

from django.db import connection
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls import handler400, handler403, handler404, handler500  # noqa: F401 (Django looks them up here)
from config.urls import urlpatterns as project_urlpatterns
from orchestration.api.views import ApiMixin, EventViewSet
from orchestration.models import Event

FLOOR_PATH = "/bench/floor/"
FLOOR_BODY: dict[str, Any] = {}
BARE_EVENTS_PATH = "/bench/events-bare/"


class FloorView(ApiMixin, APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes: list[type] = []

    def get(self, request: Request) -> Response:
        return Response(FLOOR_BODY)


class BareEventList(EventViewSet):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes: list[type] = []

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # The endpoint's key lookup, its first statement, serves as the connection's health
        # check (CONN_HEALTH_CHECKS): without it Django would add a `SELECT 1` round trip here
        # that the endpoint does not make.
        connection.health_check_done = True
        super().initial(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        return Event.objects.all()

    def filter_queryset(self, queryset: Any) -> Any:
        return queryset.filter(entity_id=self.request.query_params["entity_id"])


# Appended: the project's URLs resolve as without them.
urlpatterns = [
    *project_urlpatterns,
    path(FLOOR_PATH.strip("/") + "/", FloorView.as_view()),
    path(BARE_EVENTS_PATH.strip("/") + "/", BareEventList.as_view({"get": "list"})),
]
