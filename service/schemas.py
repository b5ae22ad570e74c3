"""Request and response bodies. Bounds come from the settings, so the OpenAPI page documents the
limits this deployment actually enforces (``make_models(settings)`` builds the classes per app)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    StringConstraints,
)

from service.settings import Settings


def _whole_number(v: object) -> object:
    """JSON Schema's "integer" includes 7.0; Python's bool is an int but never a valid id or count."""
    if isinstance(v, bool):
        raise ValueError("expected an integer, not a boolean")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if not isinstance(v, int):
        raise ValueError("expected an integer")
    return v


def _encodable(v: str) -> str:
    # JSON may carry lone UTF-16 surrogates; they cannot be stored (Redis keys are UTF-8) or compared
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return v


WholeInt = Annotated[int, BeforeValidator(_whole_number)]
# Ids on the wire: an integer or a string with a visible character; 7 and "7" mean the same user (and
# the same item in an integer catalogue). Booleans and fractional numbers are rejected, not guessed at.
IdStr = Annotated[StrictStr, StringConstraints(min_length=1, max_length=256, pattern=r"\S"), AfterValidator(_encodable)]
WireId = WholeInt | IdStr
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
FeatureValue = (Annotated[float, Field(allow_inf_nan=False)] | Annotated[str, StringConstraints(max_length=1024)]
                | Annotated[list[Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=256)] | None)


class RecallItem(BaseModel):
    item_id: int | str = Field(description="catalogue item id, with the catalogue's type")
    score: float = Field(description="inner product of user and item vectors (the best interest's, for a "
                                     "multi-interest model), plus w * n / sqrt(T(last) T(item)) when the bundle "
                                     "blends in the last item's neighbours (n: the times the item sat next to the "
                                     "user's last item in the histories, T: an item's total over its neighbours; "
                                     "w: the manifest's neighbour_weight); for the "
                                     "popularity fallback a rank score, 1 - rank / list length (1.0 for the most "
                                     "popular item)")


class RecallResponse(BaseModel):
    items: list[RecallItem]
    model_version: str
    index_version: str
    cached: bool = Field(description="true when served from the result cache")
    fallback: Literal["popular"] | None = Field(
        default=None, description="present when the user had nothing to embed and the popularity list was served")
    warnings: list[str] | None = Field(default=None, description="present when part of the input was ignored")


class BatchRecallResponse(BaseModel):
    results: list[RecallResponse]


class SimilarResponse(BaseModel):
    item_id: int | str
    items: list[RecallItem]
    model_version: str
    index_version: str
    cached: bool


class EventResponse(BaseModel):
    user_id: str
    item_id: int | str
    events: int = Field(description="events now kept for the user (capped)")
    warnings: list[str] | None = None


class ReloadResponse(BaseModel):
    changed: bool
    model_version: str
    index_version: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_version: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")] | None = Field(
        default=None, description="serve this bundle (rollback); default: the one bundles/CURRENT names")


@dataclass
class Models:
    RecallRequest: type[BaseModel]
    BatchRecallRequest: type[BaseModel]
    EventRequest: type[BaseModel]


def make_models(s: Settings) -> Models:
    class RecallRequest(BaseModel):
        """Who to recall for. Any of user_id, history and features may be given; none of them -> the
        popularity fallback."""

        model_config = ConfigDict(extra="forbid")
        user_id: WireId | None = Field(default=None, description="user id; 7 and \"7\" are the same user")
        history: Annotated[list[WireId], Field(max_length=s.max_history)] | None = Field(
            default=None, description="item ids the user interacted with, oldest first; replaces the stored history")
        features: Annotated[dict[FeatureName, FeatureValue], Field(max_length=s.max_features)] | None = Field(
            default=None, description="user feature values by name; override the stored profile feature by feature")
        k: int = Field(default=s.default_k, ge=1, le=s.max_k, description="number of items to return")
        exclude_seen: StrictBool = Field(default=True, description="drop every item the user interacted with")
        exclude_ids: Annotated[list[WireId], Field(max_length=s.max_exclude_ids)] | None = Field(
            default=None, description="item ids never to return")

    class BatchRecallRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: Annotated[list[RecallRequest], Field(min_length=1, max_length=s.max_batch_users)]

    class EventRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: WireId
        item_id: WireId
        timestamp: Annotated[int, Field(ge=0, le=2**53), BeforeValidator(_whole_number)] | None = Field(
            default=None, description="unix seconds; default: now")

    return Models(RecallRequest, BatchRecallRequest, EventRequest)
