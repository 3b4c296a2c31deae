from django.contrib import admin
from django.urls import include, path

from config import health

# Problem-detail answers under /api/, Django's pages elsewhere.
handler400 = "orchestration.api.errors.bad_request"
handler403 = "orchestration.api.errors.permission_denied"
handler404 = "orchestration.api.errors.not_found"
handler500 = "orchestration.api.errors.server_error"

admin.site.site_header = "AgentLedger operations"
admin.site.site_title = "AgentLedger"
admin.site.index_title = "Workflows, tasks, agents and the audit trail"

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("config.api_router")),
    # Unauthenticated, like the probes: serve it to the scraper only, never publicly.
    path("", include("observability.urls")),
]
