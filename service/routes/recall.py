"""POST /v1/recall and /v1/recall/batch: top-k items for users.

``fast_recall`` is the same answer as the route's, for service.fastpath to call on well-formed
requests without FastAPI's routing machinery."""

# No `from __future__ import annotations`: the request models are local to router() (built per app
# from the settings), and FastAPI must see the annotations as objects.

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from service.pipeline import with_cached
from service.routes.deps import ERRORS, JSON, recall_query, runtime_of
from service.schemas import BatchRecallResponse, Models, RecallResponse
from service.settings import Settings


def router(settings: Settings, models: Models) -> APIRouter:
    RecallRequest, BatchRecallRequest = models.RecallRequest, models.BatchRecallRequest
    r = APIRouter(tags=["recall"], responses=ERRORS)

    @r.post("/v1/recall", response_model=RecallResponse, summary="Top-k items for one user")
    async def recall(body: RecallRequest, request: Request) -> Response:  # type: ignore[valid-type]
        answer, cached = await runtime_of(request).recall(recall_query(body))
        return Response(with_cached(answer, cached), media_type=JSON)

    @r.post("/v1/recall/batch", response_model=BatchRecallResponse,
            summary=f"Top-k items for up to {settings.max_batch_users} users")
    async def recall_batch(body: BatchRecallRequest, request: Request) -> Response:  # type: ignore[valid-type]
        reqs = body.requests  # type: ignore[attr-defined]
        qs = [recall_query(q, ("body", "requests", i)) for i, q in enumerate(reqs)]
        answers = await runtime_of(request).recall_many(qs)
        return Response(b'{"results":[' + b",".join(with_cached(a, c) for a, c in answers) + b"]}",
                        media_type=JSON)

    return r


def fast_recall(models: Models) -> Callable[[Request, Any], Awaitable[bytes]]:
    """The recall route's work on an already parsed JSON body: validation errors are raised as
    FastAPI raises them (RequestValidationError, located under "body"), so the app's handler
    answers them as it would have."""
    RecallRequest = models.RecallRequest

    async def handle(request: Request, doc: Any) -> bytes:
        try:
            body = RecallRequest.model_validate(doc)
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        answer, cached = await runtime_of(request).recall(recall_query(body))
        return with_cached(answer, cached)

    return handle
