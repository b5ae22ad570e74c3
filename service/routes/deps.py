"""What several route modules share: the runtime lookup, the admin check, ids on the wire, the
documented error answers."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from service.pipeline import InputError, RecallQuery
from service.runtime import Runtime
from towers.schema import normalize_user_id

JSON = "application/json"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the body is not decodable JSON"},
    413: {"description": "request body larger than TT_MAX_BODY_BYTES"},
    503: {"description": "no bundle loaded yet, or shutting down"},
}


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


# The ops and admin routes take the runtime as a dependency. The hot routes (recall, batch, similar,
# events) take the Request and call runtime_of(): a dependency costs ~15 us per request in
# FastAPI's resolver, about a tenth of a cached recall.
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
_bearer = HTTPBearer(auto_error=False, description="TT_ADMIN_TOKEN")


def require_admin(request: Request,
                  creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    expected = request.app.state.settings.admin_token.get_secret_value()
    if not expected:
        raise HTTPException(403, "admin endpoints are disabled: set TT_ADMIN_TOKEN to enable them")
    given = creds.credentials if creds is not None else ""
    # constant time: the comparison must not leak how many leading characters were right
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def user_id_or_422(value: Any, loc: tuple[str | int, ...]) -> str | None:
    """A wire user id (7 or "7") as the service's string form; an InputError (422) naming ``loc``."""
    if value is None:
        return None
    try:
        return normalize_user_id(value)
    except ValueError as exc:
        raise InputError(loc, str(exc)) from None


def recall_query(body: Any, loc: tuple[str | int, ...] = ("body",)) -> RecallQuery:
    """A validated recall request body (RecallRequest) as the pipeline's query."""
    return RecallQuery(user_id=user_id_or_422(body.user_id, (*loc, "user_id")), history=body.history,
                       features=body.features, k=body.k, exclude_seen=body.exclude_seen,
                       exclude_ids=body.exclude_ids)
