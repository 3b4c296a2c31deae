from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import GroupAdmin as DjangoGroupAdmin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from orchestration.admin.base import (
    ChangedFieldsOnlyMixin,
    CheckedFiltersMixin,
    MaskedLookupsMixin,
    change_url,
    json_display,
    selected_rows,
    utc_storable,
)
from orchestration.api.redis_store import store
from orchestration.errors import SpecError
from orchestration.event_types import EventType
from orchestration.models import ApiKey
from orchestration.selectors import user_spend
from orchestration.services.access import (
    KNOWN_PERMISSIONS,
    api_key_create,
    api_key_event,
    api_key_revoke,
    api_key_rotate,
)
from orchestration.services.events import Actor, actor_of

logger = logging.getLogger(__name__)


@contextmanager
def _failures_counted() -> Iterator[None]:
    """A Redis outage refuses the sign-in, saying so: a limit that cannot be counted is not
    silently lifted (the API answers 503 for the same reason). The error's text names hosts
    and stays in the log."""
    try:
        yield
    except redis.RedisError:
        logger.warning("console sign-in: Redis did not answer", exc_info=True)
        raise ValidationError(
            "Failed sign-ins are counted in Redis, which is not answering; retry shortly.", code="unavailable"
        ) from None


class ConsoleLoginForm(AdminAuthenticationForm):
    """The console's login form, with failed sign-ins counted per user name in Redis (shared by
    every web process). Past CONSOLE_LOGIN_FAILURE_LIMIT in a window of
    CONSOLE_LOGIN_FAILURE_WINDOW_SECONDS the name is refused without checking a password: a
    password is not guessed at request speed, and a refused guess costs no hash. Names that
    exist and names that do not are counted alike, so the answer tells neither apart. (Guesses
    already past the check when the limit is reached are still checked: a window allows at most
    the web's concurrency more.)"""

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # a field is missing: nothing is checked
        key = "console_login_failures:" + hashlib.sha256(username.encode()).hexdigest()
        with _failures_counted():
            failures, wait = store().peek(key)
        if failures >= settings.CONSOLE_LOGIN_FAILURE_LIMIT:
            raise ValidationError(
                "Too many failed sign-ins for this user name; try again in %(minutes)d minute(s).",
                code="throttled",
                params={"minutes": math.ceil(wait / 60)},
            )
        try:
            return super().clean()
        except ValidationError as exc:
            if exc.code == "invalid_login":
                with _failures_counted():
                    store().hit(key, settings.CONSOLE_LOGIN_FAILURE_WINDOW_SECONDS)
            raise


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

    def clean_expires_at(self) -> dt.datetime | None:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is None:
            return None
        return utc_storable(expires_at)  # read in TIME_ZONE, as a workflow's deadline


def may_mint_keys_for(user: Any, owner: Any) -> bool:
    """Whether `user` may create (or rotate) a key of `owner`: the key acts as its owner, so only
    for an owner who can do nothing `user` cannot (a superuser: anyone)."""
    if user.is_superuser:
        return True
    return not owner.is_superuser and owner.is_active and owner.get_all_permissions() <= user.get_all_permissions()


class ApiKeyCreateForm(forms.Form):
    owner = forms.ModelChoiceField(queryset=get_user_model().objects.filter(is_active=True).order_by("username"))
    name = forms.CharField(max_length=100)
    expires_at = forms.DateTimeField(required=False, help_text="blank: never (format 2026-12-31 23:59)")
    permissions = forms.MultipleChoiceField(
        choices=[(p, p) for p in KNOWN_PERMISSIONS],
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="narrow the key below the owner's role; none ticked: the role's permissions",
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_owner(self) -> Any:
        owner = self.cleaned_data["owner"]
        if not may_mint_keys_for(self.user, owner):
            raise forms.ValidationError("You may create keys only for users who have no permission you lack.")
        return owner


@admin.register(ApiKey)
class ApiKeyAdmin(CheckedFiltersMixin, MaskedLookupsMixin, ChangedFieldsOnlyMixin, admin.ModelAdmin):
    """API keys. The secret's hash is never shown. A key is created on its own page (the
    "Create API key" button, or `manage.py create_api_key`), which shows the secret once;
    the model's add form stays off because it would ask for a prefix and hash."""

    form = ApiKeyAdminForm
    change_event = EventType.API_KEY_CHANGED
    unfilterable_fields = ("secret_hash",)
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
    actions = ("revoke_selected", "rotate_selected")

    permissions_display = json_display("permissions")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def change_record(self, obj: ApiKey, changes: dict[str, dict[str, Any]], actor: Actor) -> None:
        api_key_event(obj, EventType.API_KEY_CHANGED, actor, changes=changes)

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        """A key's expiry is how long it acts as its owner: extending it, or bringing an expired
        key back, hands out the owner's rights as minting a key does, so only those who may mint
        keys for its owner change it (others see it read-only). Revoking, a list action, stays
        open to whoever may change keys."""
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or may_mint_keys_for(request.user, obj.owner))

    def _can_create_key(self, request: HttpRequest) -> bool:
        return request.user.has_perm("orchestration.add_apikey")

    def get_urls(self) -> list[URLPattern]:
        opts = self.model._meta
        return [
            path(
                "create/",
                self.admin_site.admin_view(self.create_key_view),
                name=f"{opts.app_label}_{opts.model_name}_create_key",
            ),
            *super().get_urls(),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "can_create_key": self._can_create_key(request)}
        return super().changelist_view(request, extra_context)

    def create_key_view(self, request: HttpRequest) -> HttpResponse:
        if not self._can_create_key(request):
            raise PermissionDenied
        form = ApiKeyCreateForm(request.POST or None, user=request.user)
        if request.method == "POST" and form.is_valid():
            try:
                created = api_key_create(
                    owner=form.cleaned_data["owner"],
                    name=form.cleaned_data["name"],
                    expires_at=form.cleaned_data["expires_at"],
                    permissions=form.cleaned_data["permissions"],
                    actor=actor_of(request.user, "console"),
                )
            except SpecError as exc:
                for problem in exc.listed:
                    form.add_error(None, problem)
            else:
                self.log_addition(request, created.api_key, "Created")
                self.message_user(
                    request,
                    f"API key created. Copy it now, it is not shown again: {created.key}",
                    messages.SUCCESS,
                )
                return self._keys_shown(request, [created.api_key])
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Create API key",
            "form": form,
        }
        return TemplateResponse(request, "admin/orchestration/apikey/create_key.html", context)

    def _keys_shown(self, request: HttpRequest, api_keys: list[ApiKey]) -> TemplateResponse:
        """A page showing the messages that carry new keys, in the answer to the request that
        made them. A redirect would hand them to the next page through the message storage:
        the messages cookie (signed, not encrypted), a copy of the secret the browser keeps and
        sends back, where only its hash is ever to be stored."""
        opts = self.model._meta
        context = {
            **self.admin_site.each_context(request),
            "opts": opts,
            "title": "API key created" if len(api_keys) == 1 else "API keys created",
            "api_keys": [(api_key, change_url(ApiKey, api_key.pk)) for api_key in api_keys],
        }
        return TemplateResponse(request, "admin/orchestration/apikey/keys_shown.html", context)

    @admin.display(description="active", boolean=True)
    def is_active(self, obj: ApiKey) -> bool:
        return obj.is_active

    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        self.delete_queryset(request, ApiKey.objects.filter(pk=obj.pk))

    @transaction.atomic
    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        """A key is revoked before it is deleted: its api_key_revoked event says, as a revocation's
        does, when and by whom it stopped working; the audit log keeps its api_key_created."""
        api_key_revoke(
            api_key_ids=queryset.values_list("pk", flat=True),
            now=timezone.now(),
            actor=actor_of(request.user, "console"),
        )
        super().delete_queryset(request, queryset)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        rows, gone = selected_rows(self, request, queryset)
        selected = list(rows.values_list("pk", flat=True))
        revoked = api_key_revoke(api_key_ids=selected, now=timezone.now(), actor=actor_of(request.user, "console"))
        for api_key in ApiKey.objects.filter(pk__in=revoked).select_related("owner"):
            self.log_change(request, api_key, "Revoked")
        skipped = len(selected) - len(revoked)
        message = f"Revoked {len(revoked)} key(s)."
        if skipped:
            message += f" {skipped} already revoked."
        if gone:
            message += f" {len(gone)} selected no longer exist."
        self.message_user(request, message, messages.SUCCESS if revoked else messages.WARNING)

    def has_rotate_permission(self, request: HttpRequest) -> bool:
        """Rotating mints a key: it needs the right to create keys as well as to change them."""
        return self._can_create_key(request) and self.has_change_permission(request)

    @admin.action(description="Rotate selected keys (new key shown once, old one revoked)", permissions=["rotate"])
    def rotate_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> TemplateResponse | None:
        now = timezone.now()
        rotated = []
        rows, gone = selected_rows(self, request, queryset)
        if gone:
            self.message_user(request, f"Not rotated: key(s) {', '.join(gone)} no longer exist.", messages.WARNING)
        for api_key in rows.select_related("owner"):
            if not may_mint_keys_for(request.user, api_key.owner):
                problem = f"{api_key}: not rotated, its owner {api_key.owner} has permissions you lack"
                self.message_user(request, problem, messages.ERROR)
                continue
            try:
                created = api_key_rotate(api_key_id=api_key.pk, now=now, actor=actor_of(request.user, "console"))
            except SpecError as exc:
                self.message_user(request, "; ".join(exc.listed), messages.WARNING)
                continue
            self.log_change(request, api_key, "Rotated")
            self.log_addition(request, created.api_key, "Created by rotation")
            self.message_user(
                request,
                f"{api_key.owner}: new key {created.api_key.name!r}, copy it now, it is not shown again: {created.key}",
                messages.SUCCESS,
            )
            rotated.append(created.api_key)
        return self._keys_shown(request, rotated) if rotated else None


SPEND_HELP = (
    "Tokens and cost of the user's workflows and of the replies to their conversation messages created in "
    "each window; wasted: what their failed, timed-out and lost tries cost."
)

SPEND_WINDOWS = (("last 24 hours", dt.timedelta(hours=24)), ("last 30 days", dt.timedelta(days=30)))
# What a staff user needs to see a user's spend: what the workflows' and tasks' own pages need.
SPEND_PERMISSIONS = ("orchestration.view_workflow", "orchestration.view_taskexecution")


def _within_rights_of(user: Any, permissions: QuerySet[Permission]) -> bool:
    """Whether `user` holds every one of `permissions`."""
    rights = permissions.values_list("content_type__app_label", "codename")
    return {f"{app}.{codename}" for app, codename in rights} <= user.get_all_permissions()


def _may_manage(user: Any, account: Any) -> bool:
    """Whether `user` may change or delete `account`: it holds no right `user` lacks, counted
    from its permissions and groups whether it is active or not (reactivating an account is
    handing out its rights; a superuser's are all)."""
    if user.is_superuser:
        return True
    if account.is_superuser:
        return False
    return _within_rights_of(user, Permission.objects.filter(Q(user=account) | Q(group__user=account)))


def _may_manage_group(user: Any, group: Group) -> bool:
    """Whether `user` may change or delete `group`: it holds no right `user` lacks."""
    return user.is_superuser or _within_rights_of(user, group.permissions.all())


def _permission_name(permission: Any) -> str:
    """`app_label.codename`, as User.get_all_permissions names it."""
    return f"{permission.content_type.app_label}.{permission.codename}"


def _held_only(permissions: QuerySet[Permission], held: set[str]) -> QuerySet[Permission]:
    """The permissions of `permissions` named in `held`: what a form offers a staff user to grant."""
    return permissions.filter(
        pk__in=[p.pk for p in permissions.select_related("content_type") if _permission_name(p) in held]
    )


class WithinOwnRightsMixin:
    """Managing accounts or groups is no way to more rights than one's own: an object holding a
    right the staff user lacks is read-only to them and cannot be deleted (`may_manage`)."""

    def may_manage(self, user: Any, obj: Any) -> bool:
        raise NotImplementedError

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_change_permission(request, obj)  # type: ignore[misc]
        return allowed and (obj is None or self.may_manage(request.user, obj))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        allowed = super().has_delete_permission(request, obj)  # type: ignore[misc]
        return allowed and (obj is None or self.may_manage(request.user, obj))


class UserAdmin(CheckedFiltersMixin, WithinOwnRightsMixin, DjangoUserAdmin):
    """Django's user admin, with what the user's work cost beside it (DESIGN §4's wasted
    spend per user; the API's `me/spend`)."""

    readonly_fields = (*DjangoUserAdmin.readonly_fields, "spend")
    fieldsets = (
        *DjangoUserAdmin.fieldsets,
        ("Spend", {"fields": ("spend",), "description": SPEND_HELP}),
    )

    # Managing accounts is no way to more rights than one's own, the rule the console's API keys
    # follow (may_mint_keys_for): Django's user admin lets anyone who may change users tick
    # "superuser status" on their own account, grant any permission or group, and set the
    # password of a superuser (then sign in as one). Here a staff user who is not a superuser
    # cannot make one, grants only permissions (and groups of permissions) they hold, and may
    # change or delete only accounts that hold no right they lack (others are read-only).

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = super().get_readonly_fields(request, obj)
        return fields if request.user.is_superuser else (*fields, "is_superuser")

    def may_manage(self, user: Any, obj: Any) -> bool:
        return _may_manage(user, obj)

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_manytomany(db_field, request, **kwargs)
        if request.user.is_superuser or field is None:
            return field
        held = request.user.get_all_permissions()
        if db_field.name == "user_permissions":
            field.queryset = _held_only(field.queryset, held)
        elif db_field.name == "groups":
            field.queryset = field.queryset.filter(
                pk__in=[
                    group.pk
                    for group in field.queryset.prefetch_related("permissions__content_type")
                    if {_permission_name(p) for p in group.permissions.all()} <= held
                ]
            )
        return field

    # What an account holds that no deletion in the console may take: its workflows hold it
    # (PROTECT); its conversation messages, which would go with it, are the record.
    KEPT_RECORDS = (("workflows", "workflows"), ("agent_messages", "conversation messages"))

    def get_deleted_objects(
        self, objs: Any, request: HttpRequest
    ) -> tuple[list[Any], dict[str, int], set[str], list[str]]:
        """An account that owns workflows or conversation messages is listed as protected, saying
        why, as Django lists a protected object (the delete page and the "delete selected" action
        then delete nothing), before Django collects every row its deletion would reach: the page
        of an account with 50 000 messages took 35 s and 226 MB to refuse it (the messages may
        not be deleted). Such an account is deactivated instead."""
        protected = []
        for account in objs:
            held = [label for relation, label in self.KEPT_RECORDS if getattr(account, relation).exists()]
            if held:
                protected.append(
                    f"User {account}: owns {' and '.join(held)}, which are kept; deactivate the account instead"
                )
        if protected:
            return [], {}, set(), protected
        return super().get_deleted_objects(objs, request)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        self.delete_queryset(request, type(obj).objects.filter(pk=obj.pk))

    @transaction.atomic
    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """A deleted account's API keys go with it (on_delete CASCADE); they are revoked first,
        so the audit log says when and by whom they stopped working, as for a key deleted."""
        api_key_revoke(
            api_key_ids=ApiKey.objects.filter(owner__in=queryset).values_list("pk", flat=True),
            now=timezone.now(),
            actor=actor_of(request.user, "console"),
        )
        super().delete_queryset(request, queryset)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if request.user.has_perms(SPEND_PERMISSIONS):
            return fieldsets
        return tuple(fieldset for fieldset in fieldsets if "spend" not in fieldset[1].get("fields", ()))

    @admin.display(description="spend")
    def spend(self, user: Any) -> str:
        if user.pk is None:
            return "-"
        now = timezone.now()
        rows = []
        for label, window in SPEND_WINDOWS:
            spent = user_spend(user_id=user.pk, since=now - window)
            rows.append(
                (
                    label,
                    spent["workflows"]["count"],
                    spent["conversation_replies"]["count"],
                    spent["total_tokens"],
                    spent["total_cost_usd"],
                    spent["wasted_cost_usd"],
                )
            )
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", rows)
        return format_html(
            "<table><thead><tr><th>window</th><th>workflows</th><th>conversation replies</th><th>tokens</th>"
            "<th>cost (USD)</th><th>wasted (USD)</th></tr></thead><tbody>{}</tbody></table>",
            body,
        )


class GroupAdmin(CheckedFiltersMixin, WithinOwnRightsMixin, DjangoGroupAdmin):
    """Django's group admin under the user admin's rule: a staff user who is not a superuser
    grants a group only permissions they hold, and may change or delete only groups holding no
    right they lack (others are read-only). Django's own lets anyone who may change groups
    tick every permission on a group they belong to (a role's group, say), and have them."""

    def may_manage(self, user: Any, obj: Any) -> bool:
        return _may_manage_group(user, obj)

    def formfield_for_manytomany(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_manytomany(db_field, request, **kwargs)
        if request.user.is_superuser or field is None or db_field.name != "permissions":
            return field
        field.queryset = _held_only(field.queryset, request.user.get_all_permissions())
        return field


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)
admin.site.register(User, UserAdmin)
if admin.site.is_registered(Group):
    admin.site.unregister(Group)
admin.site.register(Group, GroupAdmin)
admin.site.login_form = ConsoleLoginForm
