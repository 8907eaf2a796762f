"""Pagination of the REST lists: the body stays a JSON list, the position travels in headers.

``?limit=&offset=`` as DRF's LimitOffsetPagination reads them (default ``PAGE_SIZE``, at most
``MAX_LIMIT``); the answer carries ``X-Total-Count`` and an RFC 8288 ``Link`` header with
``rel="next"`` / ``rel="prev"`` where there is such a page. Keeping the body a list means a client
that only reads the first page (the newest runs) needs no change, and a client that wants
everything follows ``next`` until it is absent - nothing is cut off silently.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response

MAX_LIMIT = 500

LIST_PARAMETERS = [
    OpenApiParameter(
        "limit", OpenApiTypes.INT, description=f"items per page (default 50, at most {MAX_LIMIT})"
    ),
    OpenApiParameter(
        "offset", OpenApiTypes.INT, description="items to skip (follow the Link header instead)"
    ),
]


class HeaderLimitOffsetPagination(LimitOffsetPagination):
    max_limit = MAX_LIMIT

    def get_paginated_response(self, data) -> Response:
        return Response(data, headers=self.headers())

    def headers(self) -> dict[str, str]:
        """``X-Total-Count`` and ``Link`` of the page last paginated."""
        links = []
        next_url, previous_url = self.get_next_link(), self.get_previous_link()
        if next_url:
            links.append(f'<{next_url}>; rel="next"')
        if previous_url:
            links.append(f'<{previous_url}>; rel="prev"')
        headers = {"X-Total-Count": str(self.count)}
        if links:
            headers["Link"] = ", ".join(links)
        return headers


def paginated_response(request, queryset, serializer_class) -> Response:
    """One page of ``queryset`` (which must be ordered) serialised as a list, position in headers."""
    paginator = HeaderLimitOffsetPagination()
    page = paginator.paginate_queryset(queryset, request)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)
