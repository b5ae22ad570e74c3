"""Liveness, readiness and metrics: what a load balancer, an orchestrator and Prometheus ask."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.routes.deps import RuntimeDep
from service.schemas import Models
from service.settings import Settings


def router(settings: Settings, models: Models) -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz", summary="Ready to serve: bundle loaded; 'degraded' when Redis is down",
           responses={503: {"description": "no bundle loaded, or shutting down"}})
    async def readyz(rt: RuntimeDep) -> JSONResponse:
        code, doc = rt.readiness()
        return JSONResponse(doc, status_code=code)

    @r.get("/metrics", summary="Prometheus metrics (this replica's)", response_class=Response)
    async def prometheus(request: Request) -> Response:
        data, ctype = request.app.state.metrics.render()
        return Response(data, media_type=ctype)

    return r
