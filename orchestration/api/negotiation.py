"""Content negotiation: DRF's, but a `?format=` naming no renderer is a 400 naming those
there are, not a 404."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.negotiation import DefaultContentNegotiation


class FormatParameterNegotiation(DefaultContentNegotiation):
    """DRF answers `?format=csv` with a 404, which a client reads as "no such workflow" (or
    list) for one that exists, and before the request is authenticated or counted. The
    parameter's value is wrong, as `?ordering=bogus` is: a 400 naming the formats."""

    def filter_renderers(self, renderers: list[Any], format: str) -> list[Any]:
        matching = [renderer for renderer in renderers if renderer.format == format]
        if not matching:
            formats = ", ".join(sorted({renderer.format for renderer in renderers}))
            raise ValidationError({"format": [f"must be one of: {formats}"]})
        return matching
