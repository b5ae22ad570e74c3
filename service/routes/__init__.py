"""The HTTP routes, one ``APIRouter`` module per area (recall, items, events, admin, ops), plus the
shared dependencies (``deps``) and the error handlers (``errors``). ``service.app.create_app`` only
wires them together.

Each area exposes ``router(settings, models) -> APIRouter``: the request models carry this
deployment's limits (``service.schemas.make_models``), so a router is built per app.
"""
