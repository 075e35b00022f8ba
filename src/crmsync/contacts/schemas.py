from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
)
from typing_extensions import TypedDict

from crmsync.errors import ItemProblem
from crmsync.pagination import PageOut
from crmsync.phone import MAX_PHONE_LENGTH
from crmsync.text import NO_NUL, Name
from crmsync.times import PastRfc3339

MAX_BATCH = 1000
MAX_QUERY_LENGTH = 100


PhoneText = Annotated[str, StringConstraints(max_length=MAX_PHONE_LENGTH, pattern=NO_NUL)]
Result = Literal["created", "replaced", "existing"]


class ContactIn(TypedDict):
    """One uploaded contact. A TypedDict, so that a whole batch validates in one call."""

    name: Name
    phone_raw: Annotated[PhoneText, Field(description="As the user typed it")]
    phone_normalized: NotRequired[
        Annotated[
            PhoneText | None,
            Field(description="E.164 hint; phone_raw decides"),
        ]
    ]
    created_at: NotRequired[
        Annotated[
            PastRfc3339 | None,
            Field(description="When the contact was created on the phone; decides older-wins"),
        ]
    ]


CONTACT_ADAPTER: TypeAdapter[ContactIn] = TypeAdapter(ContactIn)
BATCH_ADAPTER: TypeAdapter[list[ContactIn]] = TypeAdapter(list[ContactIn])


def contacts_body_schema() -> dict[str, Any]:
    """The batch body's JSON schema, for a route that reads the body itself."""
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_BATCH,
        "items": CONTACT_ADAPTER.json_schema(),
    }


class ContactCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "Bruno Costa",
                    "phone_raw": "(415) 555-0123",
                    "created_at": "2026-10-01T08:00:00Z",
                }
            ]
        }
    )
    name: Name
    phone_raw: Annotated[PhoneText, Field(description="As the user typed it")]
    phone_normalized: Annotated[
        PhoneText | None, Field(description="E.164 hint; phone_raw decides")
    ] = None
    created_at: Annotated[
        PastRfc3339 | None,
        Field(description="When the contact was created on the phone; the server's time if absent"),
    ] = None


class ContactUpdate(BaseModel):
    name: Name | None = None
    phone_raw: Annotated[
        PhoneText | None,
        Field(description="As the user typed it; the contact's own spelling again is no change"),
    ] = None
    phone_normalized: Annotated[
        PhoneText | None,
        Field(description="E.164 hint for a new phone_raw, as in POST; phone_raw decides"),
    ] = None


class ContactOut(BaseModel):
    id: uuid.UUID
    name: str
    phone_raw: str
    phone_normalized: str = Field(description="E.164, computed by the server")
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    deleted: bool
    etag: str = Field(
        description="This version's ETag, `\"<n>\"` (as GET's header): send it as If-Match to "
        "PUT or DELETE; a stale one is 412"
    )


class ContactPage(PageOut[ContactOut]):
    pass


class ContactUpsertOut(BaseModel):
    result: Result
    contact: ContactOut


class ContactResultOut(BaseModel):
    index: int
    result: Literal["created", "replaced", "existing", "rejected"]
    contact: ContactOut | None = Field(default=None, description="Absent when rejected")
    errors: list[ItemProblem] | None = Field(default=None, description="Only when rejected")


class ContactBatchOut(BaseModel):
    sync_id: uuid.UUID
    results: list[ContactResultOut]


class ContactChangesOut(BaseModel):
    items: list[ContactOut] = Field(description="Oldest change first; tombstones included")
    limit: int
    next_cursor: str = Field(description="Always set: follow it now if has_more, else later")
    has_more: bool
    restarted: bool = Field(
        default=False,
        description="True when the cursor is from before the server was restored from a "
        "backup: this pull starts again from the beginning, and what was written after the "
        "backup is gone (see the sync algorithm in the API docs).",
    )
