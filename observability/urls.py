from django.urls import path

from observability.views import metrics

urlpatterns = [
    # Unauthenticated, like the probes: for the scraper on the internal network, never public.
    path("metrics", metrics, name="prometheus-django-metrics"),
]
