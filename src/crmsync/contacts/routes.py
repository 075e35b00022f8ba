from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from crmsync.contacts import service, upsert
from crmsync.contacts.schemas import (
    MAX_BATCH,
    MAX_QUERY_LENGTH,
    ContactBatchOut,
    ContactChangesOut,
    ContactCreate,
    ContactOut,
    ContactPage,
    ContactUpdate,
    ContactUpsertOut,
    contacts_body_schema,
)
from crmsync.deps import (
    AppSettings,
    Conn,
    CurrentUser,
    DeviceId,
    IdempotencyKey,
    JSONBytes,
    Page,
    RawBody,
    Route,
    Tx,
)
from crmsync.openapi import problem_answer
from crmsync.pagination import DEFAULT_LIMIT, MAX_LIMIT
from crmsync.sync.service import Upload, batch_items, parse_json, upload
from crmsync.text import NO_NUL

router = APIRouter(prefix="/contacts", tags=["contacts"], route_class=Route)


# Lists: a header sent as several field lines is one comma-separated list (RFC 9110 5.3);
# OkHttp's addHeader twice sends two lines.
IfMatch = Annotated[
    list[str] | None,
    Header(description="The contact's ETag: a stale one is 412 and nothing changes"),
]
IfNoneMatch = Annotated[
    list[str] | None,
    Header(description="An ETag the phone holds: 304 with no body while it is current"),
]


ETAG_ANSWER = {
    "description": "The contact",
    "headers": {
        "ETag": {
            "description": 'Its version, `"<n>"`: send it as If-Match to PUT or DELETE',
            "schema": {"type": "string"},
        }
    },
}


def etag(version: int) -> str:
    return f'"{version}"'


MAX_VERSION = 2**63 - 1  # change_seq is a bigint


def if_match_versions(fields: list[str] | None) -> list[int] | None:
    """The versions an If-Match header (every field line of it) names; None when it sets no
    condition (absent, `*`). An entity tag this server never made names no version, so it
    never matches."""
    if fields is None:
        return None
    tags = [tag.strip() for field in fields for tag in field.split(",")]
    if "*" in tags:
        return None
    versions = []
    for tag in tags:
        tag = tag.removeprefix("W/")
        digits = tag[1:-1]
        # ASCII digits only ("²".isdigit() is true) and within a bigint, like every version.
        quoted = len(tag) >= 3 and tag[0] == tag[-1] == '"'
        if quoted and digits.isascii() and digits.isdigit() and len(digits) <= 19:
            version = int(digits)
            if version <= MAX_VERSION:
                versions.append(version)
    return versions


@router.get(
    "",
    response_model=ContactPage,
    summary="List contacts",
    description="Live contacts ordered by name, then id.",
)
async def list_contacts(user: CurrentUser, conn: Conn, page: Page) -> Response:
    return JSONBytes(await service.contact_list(conn, page))


@router.get(
    "/search",
    response_model=ContactPage,
    summary="Search contacts",
    description="Mostly digits (at least 3, making up at least 60% of the non-space "
    "characters): live contacts whose E.164 digits contain them, ordered by name. "
    "Otherwise a case-insensitive substring match on the name, names starting with `q` "
    "first, then by name.",
)
async def search_contacts(
    user: CurrentUser,
    conn: Conn,
    page: Page,
    q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_LENGTH, pattern=NO_NUL)],
) -> Response:
    return JSONBytes(await service.contact_search(conn, page, q=q))


@router.get(
    "/lookup",
    response_model=ContactOut,
    summary="Caller ID: the contact of a number",
    description="The live contact with that number in any spelling; 404 when none, 422 "
    "for an impossible number.",
    responses={404: problem_answer("`not_found`: no live contact has that number")},
)
async def lookup_contact(
    user: CurrentUser,
    conn: Conn,
    settings: AppSettings,
    phone: Annotated[str, Query(min_length=1, max_length=200)],
) -> Response:
    return JSONBytes(
        await service.contact_lookup(conn, phone=phone, region=settings.default_region)
    )


@router.get(
    "/changes",
    response_model=ContactChangesOut,
    summary="Contacts changed since a cursor",
    description="Every contact created, changed or deleted after `cursor` (tombstones "
    "included), oldest change first; no cursor: from the beginning. `next_cursor` is "
    "always set; `has_more` says whether to follow it now. A contact changed twice appears "
    "once, at its latest state; changes committed during a pull are never missed.",
)
async def contact_changes(
    request: Request,
    user: CurrentUser,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Query(description="next_cursor of a previous answer (a bad one: 400)")
    ] = None,
) -> Response:
    changes = await service.contact_changes_page(
        conn, cursor=cursor, limit=limit, feed=request.app.state.changes_feed
    )
    return JSONBytes(changes.json(limit=limit))


@router.get(
    "/{contact_id}",
    response_model=ContactOut,
    summary="One contact",
    description="With an `ETag` header, for `If-Match` on PUT and DELETE. A deleted "
    "contact is 404. `If-None-Match` with the current ETag (or `*`) is 304 with no body.",
    responses={
        200: ETAG_ANSWER,
        304: {"description": "The ETag sent in If-None-Match is the current one"},
    },
)
async def get_contact(
    contact_id: uuid.UUID, user: CurrentUser, conn: Conn, if_none_match: IfNoneMatch = None
) -> Response:
    contact = await service.contact_get(conn, contact_id)
    headers = {"ETag": etag(contact.version)}
    # RFC 9110 13.1.2: any tag naming the current version matches, weak or strong.
    versions = if_match_versions(if_none_match)
    if if_none_match is not None and (versions is None or contact.version in versions):
        # RFC 9110 15.4.5: a 304 carries the Vary its 200 would (gzip; harmless when not).
        return Response(status_code=304, headers={**headers, "Vary": "Accept-Encoding"})
    return JSONBytes(contact.json, headers=headers)


@router.post(
    "",
    status_code=201,
    response_model=ContactUpsertOut,
    summary="Create a contact (older wins)",
    description="No live contact with that number: 201 `created` (a deleted contact of "
    "that number is revived with its id). One exists and the incoming `created_at` is "
    "strictly older: 200 `replaced` (it takes the incoming name, phone_raw, created_at and "
    "the caller as created_by). Otherwise 200 `existing` with the server's version.",
    responses={200: {"model": ContactUpsertOut, "description": "`replaced` or `existing`"}},
)
async def create_contact(
    body: ContactCreate, user: CurrentUser, conn: Tx, settings: AppSettings
) -> Response:
    stored = await upsert.contact_upsert(
        conn,
        name=body.name,
        phone_raw=body.phone_raw,
        phone_hint=body.phone_normalized,
        created_at=body.created_at,
        user_id=user.id,
        region=settings.default_region,
    )
    upsert.contact_count_metrics({stored.result: 1})
    return JSONBytes(stored.json, status_code=201 if stored.result == "created" else 200)


@router.post(
    "/batch",
    response_model=ContactBatchOut,
    summary="Upload contacts",
    description=f"1..{MAX_BATCH} contacts as for POST /contacts, in one transaction; "
    "results by index in request order, invalid items `rejected` and the rest stored. "
    "Items of one number are resolved by the same older-wins rule in request order; each "
    "answers its number's contact as the batch leaves it. Writes one sync record.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": contacts_body_schema()}},
        }
    },
)
async def upload_contacts(
    request: Request,
    body: RawBody,
    user: CurrentUser,
    conn: Tx,
    settings: AppSettings,
    device_id: DeviceId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    async def work() -> Upload:
        items = batch_items(
            parse_json(body, max_items=MAX_BATCH), loc=("body",), max_items=MAX_BATCH
        )
        batch = await upsert.contact_upsert_many(
            conn, items, user_id=user.id, region=settings.default_region
        )
        counts = batch.counts
        return Upload(
            synced_contacts=counts["created"] + counts["replaced"],
            synced_calls=0,
            details=counts,
            answer=lambda sync_id: (
                f'{{"sync_id":"{sync_id}","results":{batch.results_json}}}'.encode()
            ),
            count_metrics=lambda: upsert.contact_count_metrics(counts),
        )

    uploaded = await upload(
        conn,
        user_id=user.id,
        kind="contacts",
        key=idempotency_key,
        device_id=device_id,
        request=("POST", request.url.path, body),
        work=work,
    )
    return JSONBytes(uploaded.body, status_code=uploaded.status, headers=uploaded.headers)


@router.put(
    "/{contact_id}",
    response_model=ContactOut,
    summary="Change a contact (owner or admin)",
    description="`If-Match` with the contact's ETag: a stale one is 412 and nothing "
    "changes; without it the last write wins. A number another contact has (deleted ones "
    "included) is 409 `phone_taken` with that contact in `contact`. A PUT that changes "
    "nothing writes nothing: the same contact, the same ETag.",
    responses={
        200: ETAG_ANSWER,
        409: problem_answer("`phone_taken`: another contact has that number, in `contact`"),
        412: problem_answer("`precondition_failed`: If-Match does not match the ETag"),
    },
)
async def update_contact(
    contact_id: uuid.UUID,
    body: ContactUpdate,
    user: CurrentUser,
    conn: Conn,
    settings: AppSettings,
    if_match: IfMatch = None,
) -> Response:
    contact = await service.contact_update(
        conn,
        contact_id,
        name=body.name,
        phone_raw=body.phone_raw,
        phone_hint=body.phone_normalized,
        user_id=user.id,
        is_admin=user.is_admin,
        if_match=if_match_versions(if_match),
        region=settings.default_region,
    )
    return JSONBytes(contact.json, headers={"ETag": etag(contact.version)})


@router.delete(
    "/{contact_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a contact (owner or admin)",
    description="Soft delete: the contact stays as a tombstone (`deleted: true`) that the "
    "changes feed reports, and keeps its calls. `If-Match` as for PUT.",
    responses={412: problem_answer("`precondition_failed`: If-Match does not match the ETag")},
)
async def delete_contact(
    contact_id: uuid.UUID, user: CurrentUser, conn: Conn, if_match: IfMatch = None
) -> Response:
    await service.contact_delete(
        conn,
        contact_id,
        user_id=user.id,
        is_admin=user.is_admin,
        if_match=if_match_versions(if_match),
    )
    return Response(status_code=204)
