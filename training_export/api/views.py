"""Training-data exports over the API: list and read runs, queue exports, download files.

Exports hold every user's data, so every operation needs export:read or export:create,
which only the admin role grants.
"""

from __future__ import annotations

import base64
from typing import Any

from django.http import FileResponse, HttpResponseBase
from django.urls import reverse
from django.utils.cache import get_conditional_response
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from orchestration.api.exceptions import Conflict
from orchestration.api.permissions import ActionPermission
from orchestration.api.schema import problem_responses
from orchestration.api.views import ApiMixin, WriteBodyMixin, ordering_parameter
from orchestration.services.access import EXPORT_CREATE, EXPORT_READ
from training_export.api.filters import ExportRunFilter
from training_export.api.serializers import ALL, ExportAcceptedSerializer, ExportRequestSerializer, ExportRunSerializer
from training_export.models import ExportRun
from training_export.services.export import (
    DATA_TYPES,
    DOWNLOAD_FILES,
    ExportError,
    ExportFileGone,
    ExportFileNone,
    WindowNotClosed,
    export_file_open,
    export_runs_request,
)

JSONL_CONTENT_TYPE = "application/x-ndjson"
EXPORT_ORDERINGS = {"-created_at": ("-created_at", "-id"), "created_at": ("created_at", "id")}

REQUEST_EXAMPLE = {"data_type": "events", "start_date": "2024-03-05", "end_date": "2024-03-05"}


class Gone(exceptions.APIException):
    status_code = status.HTTP_410_GONE
    default_detail = "The resource is no longer available."
    default_code = "gone"


class PreconditionFailed(exceptions.APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "The resource is not in the state the request's preconditions name."
    default_code = "precondition_failed"


class JsonLinesRenderer(BaseRenderer):
    """Lets a download ask for `Accept: application/x-ndjson`. The file itself is a
    FileResponse; only problem documents (409, 410, ...) pass through a renderer."""

    media_type = JSONL_CONTENT_TYPE
    format = "jsonl"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return JSONRenderer().render(data)


class _NoFormatOverride:
    URL_FORMAT_OVERRIDE = None


class FormatIsAFilter(DefaultContentNegotiation):
    """`?format=` filters runs by their format here; DRF would otherwise take it as the name of
    a renderer (and answer 404 for `csv`)."""

    settings = _NoFormatOverride()


@extend_schema_view(
    list=extend_schema(
        summary="List export runs (admins)",
        description="Newest first (`ordering=created_at` for oldest first).",
        parameters=[ordering_parameter(EXPORT_ORDERINGS, "-created_at")],
        responses={200: ExportRunSerializer(many=True), **problem_responses(400, 401, 403, 429)},
    ),
    retrieve=extend_schema(
        summary="An export run (admins)",
        description="Its status and, once succeeded, the facts of its manifest: rows, bytes, sha256, schema "
        "version, the watermark the data was read up to, and the data file below the export directory.",
        responses={200: ExportRunSerializer, **problem_responses(401, 403, 404, 429)},
    ),
)
class ExportRunViewSet(
    ApiMixin, WriteBodyMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """Training-data export runs (admins only: an export holds every user's data)."""

    permission_classes = [ActionPermission]
    required_permissions = {
        "list": EXPORT_READ,
        "retrieve": EXPORT_READ,
        "download": EXPORT_READ,
        "create": EXPORT_CREATE,
    }
    content_negotiation_class = FormatIsAFilter
    queryset = ExportRun.objects.select_related("requested_by")
    serializer_class = ExportRunSerializer
    request_serializers = {"create": ExportRequestSerializer}
    filterset_class = ExportRunFilter
    lookup_value_regex = "[0-9]+"
    orderings = EXPORT_ORDERINGS
    default_ordering = "-created_at"

    @extend_schema(
        summary="Export training data for a closed window (admins)",
        description=(
            "Queues an export per data type (`all`: every type) of the UTC days start_date..end_date, both "
            "included, and answers **202** with the queued run ids (`Location`: the first queued run); poll "
            "`GET /exports/{id}/` until it is `succeeded` or `failed`. A window already exported whose files "
            "are intact is not exported again unless `force`: its succeeded run is listed under "
            "`already_exported`, and when that holds for every requested type the answer is **200** with "
            "status `already_exported` and nothing is queued. A type whose window already waits for a worker "
            "(a pending run, also one an earlier or concurrent request queued) gets that run under `queued`; "
            "no second run is queued. A window is closed once its end lies "
            "TRAINING_EXPORT_SAFETY_LAG_SECONDS (at least 60 s) in the past and no transaction that began "
            "before it, or up to 60 s after it, is still open; before that the answer is a 409 saying from "
            "when it can be exported."
        ),
        request=ExportRequestSerializer,
        examples=[
            OpenApiExample("one day of events", value=REQUEST_EXAMPLE, request_only=True),
            OpenApiExample(
                "queued",
                value={"status": "accepted", "queued": [42], "already_exported": [], "runs": []},
                response_only=True,
                status_codes=["202"],
            ),
        ],
        responses={
            202: ExportAcceptedSerializer,
            200: ExportAcceptedSerializer,
            **problem_responses(400, 401, 403, 409, 413, 429),
        },
    )
    def create(self, request: Request) -> Response:
        data = ExportRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        data_types = list(DATA_TYPES) if values["data_type"] == ALL else [values["data_type"]]
        try:
            result = export_runs_request(
                data_types=data_types,
                start_date=values["start_date"],
                end_date=values["end_date"],
                force=values["force"],
                requested_by_id=request.user.pk,
            )
        except WindowNotClosed as exc:
            raise Conflict(str(exc)) from None
        except ExportError as exc:
            raise exceptions.ValidationError({"data_type": [str(exc)]}) from None
        order = {data_type: i for i, data_type in enumerate(DATA_TYPES)}
        runs = sorted(
            self.get_queryset().filter(pk__in=[run.pk for run in result.runs]), key=lambda r: order[r.data_type]
        )
        queued = [run.pk for run in result.queued]
        body = {
            "status": "accepted" if queued else "already_exported",
            "queued": queued,
            "already_exported": [run.pk for run in result.already_exported],
            "runs": runs,
        }
        response = Response(
            ExportAcceptedSerializer(body, context=self.get_serializer_context()).data,
            status=status.HTTP_202_ACCEPTED if queued else status.HTTP_200_OK,
        )
        if queued:
            response["Location"] = request.build_absolute_uri(reverse("api:export-detail", kwargs={"pk": queued[0]}))
        return response

    @extend_schema(
        summary="Download the data file (or keys file) of a succeeded export run (admins)",
        description=(
            "The JSONL file as an attachment, checked against the sha256 its run recorded before it is sent; "
            "`?file=keys` gives a conversations export's keys file instead (each example's thread, messages, "
            "tasks, attempts and tool call ids, a line per example in the data file's order), checked against "
            "the sha256 its manifest lists (404 for another type, or a run written before keys files were); "
            "`ETag` is that sha256 (`If-None-Match` with it: 304 while the file is intact; `If-Match` without it: 412) "
            "and `Repr-Digest` "
            "(RFC 9530) carries it for the client to verify. 409 while "
            "the run has not succeeded (or was superseded by a later run of the window); 410 when the file is "
            "gone or no longer matches its sha256 (export the window again with `force`)."
        ),
        filters=False,
        parameters=[
            OpenApiParameter("format", exclude=True),
            OpenApiParameter(
                "file",
                str,
                enum=list(DOWNLOAD_FILES),
                default="data",
                description="which file: the data file, or a conversations export's keys file",
            ),
        ],
        responses={
            (200, JSONL_CONTENT_TYPE): OpenApiResponse(OpenApiTypes.BINARY, description="the JSONL file"),
            304: OpenApiResponse(description="the file is the one `If-None-Match` names, and intact"),
            **problem_responses(400, 401, 403, 404, 409, 410, 412, 429),
        },
    )
    @action(
        detail=True,
        methods=["get"],
        filterset_class=None,
        renderer_classes=[JSONRenderer, JsonLinesRenderer],
    )
    def download(self, request: Request, pk: str) -> HttpResponseBase:
        # `?files=keys` ignored would send the data file for the keys file asked for.
        self.refuse_unknown_parameters(frozenset({"file"}))
        file = request.query_params.get("file", "data")
        if file not in DOWNLOAD_FILES:
            raise exceptions.ValidationError({"file": [f"must be one of {', '.join(DOWNLOAD_FILES)}, not {file!r}"]})
        try:
            download = export_file_open(run=self.get_object(), file=file)
        except ExportFileNone as exc:
            raise exceptions.NotFound(str(exc)) from None
        except ExportFileGone as exc:
            raise Gone(str(exc)) from None
        etag = f'"{download.sha256.hex()}"'
        # If-None-Match (304) and If-Match (412), answered once the file on disk is checked: a
        # changed file is a 410 above, not a 304 that would vouch for a stale copy.
        conditional = get_conditional_response(request, etag=etag)
        if conditional is not None:
            download.file.close()
            if conditional.status_code == status.HTTP_412_PRECONDITION_FAILED:
                # Django's is an empty body: a problem document like every other error here,
                # naming the version the file is.
                raise PreconditionFailed(f"If-Match names no version of this file; its ETag is {etag}")
            conditional["ETag"] = etag
            return conditional
        response = FileResponse(
            download.file, as_attachment=True, filename=download.filename, content_type=JSONL_CONTENT_TYPE
        )
        response["ETag"] = etag
        response["Repr-Digest"] = f"sha-256=:{base64.b64encode(download.sha256).decode()}:"
        return response
