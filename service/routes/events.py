"""POST /v1/events: record that a user interacted with an item (Redis, shared by every replica)."""

# No `from __future__ import annotations`: the request models are local to router() (built per app
# from the settings), and FastAPI must see the annotations as objects.

from fastapi import APIRouter, Request

from service.routes.deps import ERRORS, runtime_of, user_id_or_422
from service.schemas import EventResponse, Models
from service.settings import Settings


def router(settings: Settings, models: Models) -> APIRouter:
    EventRequest = models.EventRequest
    r = APIRouter(tags=["events"])

    @r.post("/v1/events", response_model=EventResponse, response_model_exclude_none=True, responses=ERRORS,
            summary="Record that a user interacted with an item")
    async def post_event(body: EventRequest, request: Request) -> EventResponse:  # type: ignore[valid-type]
        uid = user_id_or_422(body.user_id, ("body", "user_id"))  # type: ignore[attr-defined]
        assert uid is not None
        res = await runtime_of(request).add_event(uid, body.item_id, body.timestamp)  # type: ignore[attr-defined]
        return EventResponse(user_id=res.user_id, item_id=res.item_id, events=res.events,
                             warnings=res.warnings or None)

    return r
