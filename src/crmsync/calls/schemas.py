from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    StringConstraints,
    TypeAdapter,
)
from pydantic_core import core_schema
from typing_extensions import TypedDict

from crmsync.errors import ItemProblem
from crmsync.pagination import PageOut
from crmsync.text import NO_NUL
from crmsync.times import RFC3339, PastRfc3339, UtcDatetime

MAX_CALLS = 5000

Direction = Literal["incoming", "outgoing", "missed"]
# Anything is kept as the number (withheld, short codes, junk): a call is never rejected
# for it. The bound keeps the dedupe index's key small.
PhoneText = Annotated[str, StringConstraints(max_length=256, pattern=NO_NUL)]


class CallIn(TypedDict):
    """One uploaded call. A TypedDict, not a model: a whole batch validates in pydantic-core."""

    direction: Direction
    duration_seconds: Annotated[int, Field(strict=True, ge=0, le=86400)]
    timestamp: Annotated[PastRfc3339, Field(description="When the call started, with an offset")]
    phone_normalized: NotRequired[
        Annotated[PhoneText | None, Field(description="E.164 hint, parsed again by the server")]
    ]
    phone_raw: NotRequired[PhoneText | None]
    contact_id: NotRequired[uuid.UUID | None]
    user_id: NotRequired[
        Annotated[uuid.UUID | None, Field(description="Defaults to the caller; admins only")]
    ]


def _rfc3339_in_core(source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    return core_schema.chain_schema(
        [core_schema.str_schema(pattern=RFC3339.pattern), handler(source)]
    )


class _BatchCallIn(TypedDict):
    """CallIn for a whole batch at once: the same checks, all inside pydantic-core (the
    timestamp's format and offset too), except "not in the future", which the caller
    checks once for the batch's newest timestamp."""

    direction: Direction
    duration_seconds: Annotated[int, Field(strict=True, ge=0, le=86400)]
    timestamp: Annotated[UtcDatetime, GetPydanticSchema(_rfc3339_in_core)]
    phone_normalized: NotRequired[PhoneText | None]
    phone_raw: NotRequired[PhoneText | None]
    contact_id: NotRequired[uuid.UUID | None]
    user_id: NotRequired[uuid.UUID | None]


CALL_ADAPTER: TypeAdapter[CallIn] = TypeAdapter(CallIn)
BATCH_ADAPTER: TypeAdapter[list[CallIn]] = TypeAdapter(list[_BatchCallIn])


def calls_body_schema() -> dict[str, Any]:
    """The request body's JSON schema, for routes that read the body themselves."""
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_CALLS,
        "items": CALL_ADAPTER.json_schema(),
    }


class RejectedItem(BaseModel):
    index: int
    errors: list[ItemProblem]


class CallUploadOut(BaseModel):
    sync_id: uuid.UUID
    inserted: int
    duplicates: int
    rejected: list[RejectedItem]


class CallOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    contact_id: uuid.UUID | None
    contact_name: str | None
    phone_raw: str | None
    phone_normalized: str | None
    direction: Direction
    duration_seconds: int
    timestamp: datetime


class CallPage(PageOut[CallOut]):
    pass
