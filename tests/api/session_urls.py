"""The project's URLconf plus a view that only changes the session, for tests/api/test_errors.py:
the session is then saved by SessionMiddleware after the view returned, outside any view."""

from django.http import HttpRequest, HttpResponse
from django.urls import path

from config.urls import handler400, handler403, handler404, handler500  # noqa: F401 - the URLconf's handlers
from config.urls import urlpatterns as project_urlpatterns


def remember(request: HttpRequest) -> HttpResponse:
    request.session["seen"] = True
    return HttpResponse("remembered")


urlpatterns = [path("remember/", remember), path("api/v1/remember/", remember), *project_urlpatterns]
