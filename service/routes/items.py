"""GET /v1/items/{item_id}/similar: the items nearest to an item in the served index."""

# No `from __future__ import annotations`: the bounds in the annotations come from this app's
# settings, and FastAPI must see them as objects.

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from service.pipeline import with_cached
from service.routes.deps import ERRORS, JSON, runtime_of
from service.schemas import Models, SimilarResponse
from service.settings import Settings


def router(settings: Settings, models: Models) -> APIRouter:
    r = APIRouter(tags=["recall"])

    @r.get("/v1/items/{item_id}/similar", response_model=SimilarResponse, responses={404: {}, **ERRORS},
           summary="Items nearest to an item in the index")
    async def similar(request: Request,
                      item_id: Annotated[str, Path(min_length=1, max_length=256)],
                      k: Annotated[int, Query(ge=1, le=settings.max_k)] = settings.default_k) -> Response:
        answer, cached = await runtime_of(request).similar(item_id, k)
        return Response(with_cached(answer, cached), media_type=JSON)

    return r
