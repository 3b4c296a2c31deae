"""Operations from the console: cancel, retry and resume workflows and tasks.

Each runs the service the REST API runs (orchestration/services/workflows.py), one object at a
time in its own transaction, so the console records exactly what an API call would: the same
events, counters and refusals. Available as list actions and as buttons on an object's page,
to staff who may change the model; what an operation refuses (a task already finished, a
workflow past its deadline, ...) is reported per object, by the service's own words."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.db import models
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import URLPattern, path, reverse

from orchestration.admin.base import selected_rows
from orchestration.errors import ConversationError, SpecError, TransitionError
from orchestration.services.events import Actor, actor_of

# More than this many selected at once is refused: each is a transaction of its own (with row
# locks and revocations), and "select all" on a big list would reach every matching row.
MAX_SELECTED = 500
REFUSALS_SHOWN = 10

REFUSALS = (TransitionError, SpecError, ConversationError, ObjectDoesNotExist)


def refusal_text(exc: Exception) -> str:
    if isinstance(exc, SpecError):
        return "; ".join(exc.listed)
    if isinstance(exc, ObjectDoesNotExist):
        return "it no longer exists"
    return str(exc)


class Operation:
    """One operation: its verb for messages, the service call, and when its button shows."""

    def __init__(
        self,
        name: str,
        verb: str,
        past: str,
        run: Callable[[HttpRequest, Any], object],
        offered: Callable[[Any], bool],
        note: Callable[[list[Any]], str | None] | None = None,
    ) -> None:
        self.name = name
        self.verb = verb  # "retry": the action and the button
        self.past = past  # "retried": the messages
        self.run = run
        self.offered = offered
        self.note = note  # from what `run` returned for the objects done: anything else to say


def console_reason(request: HttpRequest, what: str) -> str:
    return f"{what} by {request.user.get_username()} in the console"


def console_actor(request: HttpRequest) -> Actor:
    return actor_of(request.user, "console")


class OperationsMixin:
    """List actions and change-page buttons for a ModelAdmin's `operations`."""

    operations: tuple[Operation, ...] = ()
    change_form_template = "admin/orchestration/operations_change_form.html"

    # ModelAdmin's own, for type checkers.
    model: type[models.Model]
    admin_site: admin.AdminSite
    message_user: Callable[..., None]
    log_change: Callable[..., None]
    has_change_permission: Callable[..., bool]
    get_object: Callable[..., Any]
    list_deferred: tuple[str, ...]  # LargeTableAdmin's

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)  # type: ignore[misc]
        if not self.has_change_permission(request):
            return actions
        for operation in self.operations:

            def act(modeladmin: Any, request: HttpRequest, queryset: Any, operation: Operation = operation) -> None:
                rows, gone = selected_rows(modeladmin, request, queryset)
                modeladmin.operate(request, operation, rows.defer(*modeladmin.list_deferred), gone)

            description = f"{operation.verb.capitalize()} selected {self.model._meta.verbose_name_plural}"
            actions[operation.name] = (act, operation.name, description)
        return actions

    def operate(
        self, request: HttpRequest, operation: Operation, objects: Iterable[Any], gone: Sequence[str] = ()
    ) -> list[Any]:
        """Run `operation` on each object (at most MAX_SELECTED); report what was done and, by
        name, what was refused, and the ids in `gone` as no longer existing. Returns the
        objects done."""
        objects = list(objects[: MAX_SELECTED + 1] if hasattr(objects, "__getitem__") else objects)
        noun = self.model._meta.verbose_name_plural
        if len(objects) > MAX_SELECTED:
            self.message_user(
                request, f"Nothing done: select at most {MAX_SELECTED} {noun} to {operation.verb}.", messages.ERROR
            )
            return []
        done, results = [], []
        refused = [f"{pk}: {refusal_text(ObjectDoesNotExist())}" for pk in gone]
        for obj in objects:
            try:
                results.append(operation.run(request, obj))
            except REFUSALS as exc:
                refused.append(f"{obj}: {refusal_text(exc)}")
            else:
                done.append(obj)
                self.log_change(request, obj, f"{operation.past.capitalize()} in the console")
        if done:
            self.message_user(request, f"{operation.past.capitalize()}: {len(done)} {noun}.", messages.SUCCESS)
            if operation.note is not None and (note := operation.note(results)):
                self.message_user(request, note, messages.INFO)
        if refused:
            shown = "; ".join(refused[:REFUSALS_SHOWN])
            more = f"; and {len(refused) - REFUSALS_SHOWN} more" if len(refused) > REFUSALS_SHOWN else ""
            self.message_user(request, f"Not {operation.past} ({len(refused)}): {shown}{more}", messages.WARNING)
        return done

    def get_urls(self) -> list[URLPattern]:
        opts = self.model._meta
        return [
            path(
                f"<path:object_id>/{operation.name}/",
                self.admin_site.admin_view(self._operation_view(operation)),
                name=f"{opts.app_label}_{opts.model_name}_{operation.name}",
            )
            for operation in self.operations
        ] + super().get_urls()  # type: ignore[misc]

    def _operation_view(self, operation: Operation) -> Callable[..., HttpResponse]:
        def view(request: HttpRequest, object_id: str) -> HttpResponse:
            opts = self.model._meta
            if request.method == "GET":
                # A link or a crawler changes nothing. Nor does the login page, which sends an
                # operator whose session had ended (expired, or logged out in another tab) to
                # the address their button posted to: show them the object's page, where it is.
                self.message_user(
                    request,
                    f"Nothing was {operation.past}: the {operation.verb.capitalize()} button on this page does "
                    "that, opening its address does not.",
                    messages.WARNING,
                )
                return HttpResponseRedirect(
                    reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(unquote(object_id))])
                )
            if request.method != "POST":
                return HttpResponseNotAllowed(["POST"])
            obj = self.get_object(request, unquote(object_id))  # None for a malformed id too
            if obj is None:
                raise Http404(f"no {self.model._meta.verbose_name} {object_id!r}")
            if not self.has_change_permission(request, obj):
                raise PermissionDenied
            self.operate(request, operation, [obj])
            return HttpResponseRedirect(
                reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])
            )

        return view

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        obj = self.get_object(request, unquote(object_id))
        buttons = []
        if obj is not None and self.has_change_permission(request, obj):
            opts = self.model._meta
            buttons = [
                {
                    "label": operation.verb.capitalize(),
                    "url": reverse(f"admin:{opts.app_label}_{opts.model_name}_{operation.name}", args=[quote(obj.pk)]),
                }
                for operation in self.operations
                if operation.offered(obj)
            ]
        extra_context = {**(extra_context or {}), "operation_buttons": buttons}
        return super().change_view(request, object_id, form_url, extra_context)  # type: ignore[misc]
