from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from orchestration.admin.base import json_display
from orchestration.models import ApiKey
from orchestration.services.access import api_key_revoke


class ApiKeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("expired", "expired"), ("revoked", "revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now), revoked_at__isnull=True)
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now, revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ApiKeyAdminForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("name", "expires_at")

    def clean_name(self) -> str:
        # owner is not a form field, so the model form skips the (owner, name) constraint.
        name = self.cleaned_data["name"]
        taken = ApiKey.objects.filter(owner_id=self.instance.owner_id, name=name).exclude(pk=self.instance.pk)
        if taken.exists():
            raise forms.ValidationError("The owner already has a key with this name.")
        return name


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """API keys. The secret's hash is never shown. Keys are not created here: they come from
    `manage.py create_api_key` (with the REST API work), which shows the secret once."""

    form = ApiKeyAdminForm
    list_display = ("prefix", "name", "owner", "is_active", "last_used_at", "expires_at", "revoked_at", "created_at")
    list_display_links = ("prefix", "name")
    list_filter = (ApiKeyStateFilter, ("owner", admin.RelatedOnlyFieldListFilter), "expires_at", "created_at")
    list_select_related = ("owner",)
    search_fields = ("=prefix", "name", "owner__username")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    fields = (
        "prefix",
        "name",
        "owner",
        "is_active",
        "permissions_display",
        "expires_at",
        "last_used_at",
        "revoked_at",
        ("created_at", "updated_at"),
    )
    readonly_fields = (
        "prefix",
        "owner",
        "is_active",
        "permissions_display",
        "last_used_at",
        "revoked_at",
        "created_at",
        "updated_at",
    )
    actions = ("revoke_selected",)

    permissions_display = json_display("permissions")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="active", boolean=True)
    def is_active(self, obj: ApiKey) -> bool:
        return obj.is_active

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = api_key_revoke(api_key_ids=queryset.values_list("pk", flat=True), now=timezone.now())
        for api_key in ApiKey.objects.filter(pk__in=revoked).select_related("owner"):
            self.log_change(request, api_key, "Revoked")
        skipped = queryset.count() - len(revoked)
        message = f"Revoked {len(revoked)} key(s)."
        if skipped:
            message += f" {skipped} already revoked."
        self.message_user(request, message, messages.SUCCESS)
