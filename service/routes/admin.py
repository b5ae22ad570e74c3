"""POST /v1/admin/reload (bearer token TT_ADMIN_TOKEN): load the current, or a named, bundle now."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.exceptions import HTTPException

from service.reload import NoBundle
from service.routes.deps import RuntimeDep, require_admin
from service.schemas import Models, ReloadRequest, ReloadResponse
from service.settings import Settings


def router(settings: Settings, models: Models) -> APIRouter:
    r = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])

    @r.post("/v1/admin/reload", response_model=ReloadResponse,
            responses={400: {"description": "the body is not decodable JSON"},
                       401: {"description": "missing or wrong token"}, 403: {"description": "admin disabled"},
                       404: {"description": "no such bundle"},
                       409: {"description": "the bundle CURRENT names was rejected; the previous one is still served"}},
            summary="Load the current (or a named) bundle now")
    async def reload(rt: RuntimeDep, body: ReloadRequest | None = None) -> ReloadResponse:
        before = rt.bundles.current
        try:
            if body is not None and body.index_version:
                await rt.bundles.load_version(body.index_version)
            elif (not await rt.bundles.refresh(force=True) and rt.bundles.last_error
                  and rt.bundles.current is not None):
                # a 200 "changed: false" would hide that the published bundle was refused
                raise HTTPException(409, f"{rt.bundles.last_error}; still serving {rt.bundles.current.index_version}")
        except NoBundle as exc:
            raise HTTPException(404, str(exc)) from None
        b = rt.bundles.current
        if b is None:
            raise HTTPException(503, rt.bundles.last_error or "no bundle published yet")
        changed = before is None or (before.index_version, before.model_version) != (b.index_version, b.model_version)
        return ReloadResponse(changed=changed, model_version=b.model_version, index_version=b.index_version)

    return r
