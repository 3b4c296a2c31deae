"""Shared pieces of the operations console: JSON and link rendering, read-only admins."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django import forms
from django.apps import apps
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DataError, models, transaction
from django.db.models.constants import LOOKUP_SEP
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from orchestration.event_types import EventType
from orchestration.models import Event
from orchestration.services.events import Actor, actor_of, json_value

EMPTY = "-"


def masked(value: Any) -> Any:
    """`value` with secrets masked as the training files mask them (settings.REDACT_KEYS,
    REDACT_PATTERNS and this deployment's own secret values): the console shows every user's
    inputs, outputs and messages to staff, who need what happened, not the credentials in it."""
    from training_export.services.redaction import redact

    return redact(value)


def pretty_json(value: Any) -> SafeString:
    """`value`, masked, as indented, key-sorted JSON in a <pre>, HTML-escaped."""
    try:
        text = json.dumps(masked(value), indent=2, sort_keys=True, ensure_ascii=False, cls=DjangoJSONEncoder)
    except RecursionError:
        # A spec's JSON may nest as deep as its parser reads (about a thousand levels); masking
        # takes a call or two a level, on top of the page's own calls. Not shown rather than
        # shown unmasked, or the whole page a 500.
        return format_html("<p>{}</p>", "not shown: nested too deeply to mask")
    return format_html('<pre class="json" style="margin:0;white-space:pre-wrap">{}</pre>', text)


def text_display(field_name: str, description: str | None = None) -> Callable[[Any, models.Model], SafeString | str]:
    """A read-only admin field showing the text field `field_name`, masked, in a <pre>."""

    @admin.display(description=description or field_name.replace("_", " "))
    def display(model_admin: Any, obj: models.Model) -> SafeString | str:
        value = getattr(obj, field_name)
        if not value:
            return EMPTY
        return format_html('<pre style="margin:0;white-space:pre-wrap">{}</pre>', masked(value))

    display.__name__ = f"{field_name}_display"
    display.masked_field = field_name  # type: ignore[attr-defined]
    return display


def json_display(field_name: str, description: str | None = None) -> Callable[[Any, models.Model], SafeString]:
    """A read-only admin field showing the JSON field `field_name` pretty-printed."""

    @admin.display(description=description or field_name.replace("_", " "))
    def display(model_admin: Any, obj: models.Model) -> SafeString:
        return pretty_json(getattr(obj, field_name))

    display.__name__ = f"{field_name}_display"
    display.masked_field = field_name  # type: ignore[attr-defined]
    return display


def change_url(model: type[models.Model], pk: Any) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[pk])


def changelist_url(model: type[models.Model], params: Mapping[str, Any] | None = None) -> str:
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def link(url: str, text: Any) -> SafeString:
    return format_html('<a href="{}">{}</a>', url, text)


def object_link(model: type[models.Model], pk: Any, text: Any = None) -> SafeString | str:
    if pk is None:
        return EMPTY
    return link(change_url(model, pk), pk if text is None else text)


def links(items: Iterable[tuple[str, Any]]) -> SafeString:
    return format_html_join(" | ", '<a href="{}">{}</a>', items)


def local_datetime(value: Any) -> str:
    """To the second: events of one task often fall within the same minute."""
    return date_format(timezone.localtime(value), "Y-m-d H:i:s") if value else EMPTY


def utc_storable(moment: dt.datetime) -> dt.datetime:
    """A date-time the console read in TIME_ZONE, in UTC, or a form error: 9999-12-31 23:59 west
    of UTC is in the year 10000 in UTC (0001-01-01 00:00 east of it in the year 0), which
    PostgreSQL would store and then no query could read back."""
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:
        edge = "after 9999-12-31" if moment.year == dt.MAXYEAR else "before 0001-01-01"
        raise forms.ValidationError(f"{moment.isoformat()} is {edge} UTC") from None


def events_table(events: Iterable[Event], *, limit: int) -> SafeString:
    """Events as a small HTML table, each row linking to the event; at most `limit` rows."""
    events = list(events)
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}:{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                object_link(Event, event.sequence),
                local_datetime(event.created_at),
                event.event_type,
                event.entity_type or "",
                event.entity_id or "",
                event.severity,
                pretty_json(event.payload),
            )
            for event in events[:limit]
        ),
    )
    more = format_html("<p>Only the first {} events are shown.</p>", limit) if len(events) > limit else ""
    return format_html(
        "<table><thead><tr><th>#</th><th>at</th><th>type</th><th>entity</th><th>severity</th><th>payload</th>"
        "</tr></thead><tbody>{}</tbody></table>{}",
        rows or format_html('<tr><td colspan="6">{}</td></tr>', "no events"),
        more,
    )


def selected_rows(
    model_admin: admin.ModelAdmin, request: HttpRequest, queryset: models.QuerySet
) -> tuple[models.QuerySet, list[str]]:
    """The rows a list action is to act on, in pk order, and the ids selected that no longer
    exist. Django hands an action the selected rows that the list's filters and search still
    match, read again as the action runs: a workflow selected in the list of pending ones that
    started meanwhile was left out without a word, and a key revoked from the list of active
    ones no longer matched it once revoked. Every row selected is acted on (what its state no
    longer allows is refused by name); "select all" stays every row the list matches."""
    if request.POST.get("select_across") == "1":
        return queryset.order_by("pk"), []
    selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
    rows = model_admin.get_queryset(request).filter(pk__in=selected).order_by("pk")
    found = {str(pk) for pk in rows.values_list("pk", flat=True)}
    return rows, [pk for pk in selected if pk not in found]


class CheckedChangeList(ChangeList):
    """A changelist whose URL filters are refused with a message naming them, the list shown
    again unfiltered (Django's `?e=1`, as for a filter it refuses while building the query),
    where Django would answer 500: a `__range` (Django does not split the URL's value, so each
    character of it is a bound), a value PostgreSQL or Django refuses only once the rows are
    counted (`?name__regex=(`, `?created_at__year=0`, an integer past any year)."""

    def get_filters(self, request: HttpRequest) -> Any:
        for name, values in self.get_filters_params().items():
            if name.split(LOOKUP_SEP)[-1] == "range":
                self._refuse(request, name, values, "a range cannot be given in a URL (use __gte and __lte)")
        return super().get_filters(request)

    def get_results(self, request: HttpRequest) -> None:
        try:
            # A savepoint: the refused statement leaves the request's transaction usable.
            with transaction.atomic(using=self.queryset.db):
                super().get_results(request)
        except (DataError, ValueError, OverflowError) as exc:
            params = self.get_filters_params()
            if not params:  # no filter of the URL's: a fault of ours, not the request's
                raise
            name = ", ".join(sorted(params))
            reason = "a number is out of range" if isinstance(exc, OverflowError) else str(exc)
            self._refuse(request, name, [v for values in params.values() for v in values], reason)

    @staticmethod
    def _refuse(request: HttpRequest, name: str, values: list[str], reason: str) -> None:
        shown = ", ".join(values)
        messages.error(request, f"The list cannot be filtered by {name} = {shown[:100]!r}: {reason}.")
        raise IncorrectLookupParameters(reason)


class CheckedFiltersMixin:
    """A ModelAdmin whose list is a CheckedChangeList."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CheckedChangeList


class ChangingActionsMixin:
    """A ModelAdmin whose list actions that name no permission are offered (and run) only to
    staff who may change the model. Django checks an action's `allowed_permissions` and nothing
    else: django-celery-beat's enable, disable, toggle and run actions name none, so staff who
    could only view the schedules turned off the relay, the reaper or retention, or ran them."""

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)  # type: ignore[misc]
        if self.has_change_permission(request):  # type: ignore[attr-defined]
            return actions
        return {name: action for name, action in actions.items() if getattr(action[0], "allowed_permissions", ())}


def checked_filters_everywhere(site: admin.AdminSite) -> None:
    """Registers again, as CheckedFiltersMixin and ChangingActionsMixin admins, the models other
    apps registered with a plain changelist (Django's groups, django-celery-beat's schedules):
    their lists take the same URL filters, and the same ones were 500s; their actions that name
    no permission need the change permission."""
    for model in apps.get_models():
        if not site.is_registered(model):
            continue
        model_admin = type(site.get_model_admin(model))
        own_changelist = model_admin.get_changelist is not admin.ModelAdmin.get_changelist
        if issubclass(model_admin, CheckedFiltersMixin) or own_changelist:
            continue
        site.unregister(model)
        bases = (CheckedFiltersMixin, ChangingActionsMixin, model_admin)
        site.register(model, type(model_admin.__name__, bases, {}))


class MaskedLookupsMixin:
    """Refuses a list's lookups on what the console shows masked (or not at all, as
    `unfilterable_fields`): Django lets any changelist URL filter on any of the model's own
    fields, so `?input_data__api_key__startswith=sk-a` would tell, a character at a time,
    the secret the page masks. Django's own UserAdmin refuses lookups on passwords so. The
    search box is the same oracle (`?q=sk-live-0`, `?q=sk-live-01`, ...): those fields are left
    out of the search too."""

    unfilterable_fields: tuple[str, ...] = ()

    def masked_fields(self) -> set[str]:
        hidden = set(self.unfilterable_fields)
        for name in getattr(self, "readonly_fields", ()):
            field_name = getattr(getattr(self, name, None), "masked_field", None) if isinstance(name, str) else None
            if field_name:
                hidden.add(field_name)
        return hidden

    def lookup_allowed(self, lookup: str, value: Any, request: HttpRequest | None = None) -> bool:
        if lookup.split(LOOKUP_SEP, 1)[0] in self.masked_fields():
            return False
        return super().lookup_allowed(lookup, value, request)  # type: ignore[misc]

    def get_search_fields(self, request: HttpRequest) -> Sequence[str]:
        hidden = self.masked_fields()
        fields = super().get_search_fields(request)  # type: ignore[misc]
        return [name for name in fields if name.lstrip("^=@").split(LOOKUP_SEP, 1)[0] not in hidden]


class ChangedFieldsOnlyMixin:
    """A change form writes only the fields it changed. A plain save writes every column as it
    was read when the form was posted, so whatever the engine (counters, status, usage) or
    another operator (a revocation) wrote in between would be undone.

    An admin whose `change_event` names an event type appends one for each edit, in the change
    view's transaction: who made it and each field changed, its value before (read under the
    row's lock) and after. Django's own log of it (django_admin_log) is no part of the audit
    log, which the API and the event stream read."""

    change_event: EventType | None = None

    def save_model(self, request: HttpRequest, obj: models.Model, form: Any, change: bool) -> None:
        if not change:
            super().save_model(request, obj, form, change)  # type: ignore[misc]
            return
        fields = form.changed_data
        if self.change_event is None or not fields:
            obj.save(update_fields=fields)
            return
        rows = type(obj)._default_manager.select_for_update().filter(pk=obj.pk)
        before = rows.values(*fields).get()
        obj.save(update_fields=fields)
        changes = {name: {"old": json_value(before[name]), "new": json_value(getattr(obj, name))} for name in fields}
        self.change_record(obj, changes, actor_of(request.user, "console"))

    def change_record(self, obj: models.Model, changes: dict[str, dict[str, Any]], actor: Actor) -> None:
        """Appends `self.change_event` for `obj` with `changes` and `actor`."""
        raise NotImplementedError


class NoAddChangeMixin:
    """For records written by the platform itself: viewable (and deletable with the
    permission), never created or edited through the admin."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class RecordOnlyMixin(NoAddChangeMixin):
    """For the record itself (attempts, messages, interactions, prompt versions, metrics):
    viewable only. A row deleted here would silently change what an exported window, a
    conversation's history or a dashboard says happened; retention is the one path that
    deletes them, with what they belong to."""

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class EventsShownMixin:
    """For a page whose `events_display` field shows the object's events (events_table): the
    audit log is a model of its own, so the events are shown only to staff who may view events
    (the event list refuses the others); a fieldset left empty is dropped."""

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)  # type: ignore[misc]
        if request.user.has_perm("orchestration.view_event"):
            return fieldsets
        shown = []
        for name, options in fieldsets:
            fields = tuple(field for field in options.get("fields", ()) if field != "events_display")
            if fields:
                shown.append((name, {**options, "fields": fields}))
        return shown


class ReadOnlyTabularInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class BoundedInlineFormSet(BaseInlineFormSet):
    """The first `shown` rows of the inline's queryset (BoundedTabularInline sets it)."""

    shown = 0

    def get_queryset(self) -> models.QuerySet:
        if not hasattr(self, "_bounded"):
            self._bounded = super().get_queryset()[: self.shown]
        return self._bounded


class BoundedTabularInline(ReadOnlyTabularInline):
    """A read-only inline of at most `shown` rows, whose heading says so and links to the list
    of them all when there are more: the page renders a form for every row (a workflow of
    5,000 tasks was a 14.5 MB page that took 47 s, a task tried 1,000 times 3.3 MB in 13 s)."""

    formset = BoundedInlineFormSet
    shown = 100

    def all_url(self, obj: models.Model) -> str:
        """The list of every row of `obj`'s inline."""
        raise NotImplementedError

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> type[BoundedInlineFormSet]:
        formset = super().get_formset(request, obj, **kwargs)
        formset.shown = self.shown  # a class made for this request (inlineformset_factory)
        rows = self.get_queryset(request).filter(**{formset.fk.name: obj}) if obj is not None else None
        if rows is not None and rows[self.shown : self.shown + 1].exists():
            # Inline instances are made per request, so this heading is this page's own.
            self.verbose_name_plural = format_html(
                '{} (the first {}: <a href="{}">all of them</a>)',
                self.model._meta.verbose_name_plural,
                self.shown,
                self.all_url(obj),
            )
        return formset
