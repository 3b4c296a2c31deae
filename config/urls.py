from django.contrib import admin
from django.urls import include, path

from config import health

admin.site.site_header = "AgentLedger operations"
admin.site.site_title = "AgentLedger"
admin.site.index_title = "Workflows, tasks, agents and the audit trail"

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    # Unauthenticated, like the probes: serve it to the scraper only, never publicly.
    path("", include("observability.urls")),
]
