"""URLs of bench/api.py: the project's, and after them a floor view.

The floor is what any request costs in this stack before the endpoint does its work:
Django's WSGI handler and middleware (metrics, security, sessions, CSRF, ...), URL
resolving, DRF's dispatch and content negotiation, and rendering a page by the renderer the
endpoints use. It answers with a page body an endpoint returned (set by bench/api.py), held
in memory: no authentication, rate limit, database or serialization. An endpoint cannot cost
less than this plus its statement."""

from typing import Any

from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls import handler400, handler403, handler404, handler500  # noqa: F401 (Django looks them up here)
from config.urls import urlpatterns as project_urlpatterns
from orchestration.api.views import ApiMixin

FLOOR_PATH = "/bench/floor/"
FLOOR_BODY: dict[str, Any] = {}


class FloorView(ApiMixin, APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    throttle_classes: list[type] = []

    def get(self, request: Request) -> Response:
        return Response(FLOOR_BODY)


# Appended: the project's URLs resolve as without it.
urlpatterns = [*project_urlpatterns, path(FLOOR_PATH.strip("/") + "/", FloorView.as_view())]
