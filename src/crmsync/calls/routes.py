from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from crmsync.calls import service
from crmsync.calls.schemas import MAX_CALLS, CallPage, CallUploadOut, Direction, calls_body_schema
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
    UploadTx,
)
from crmsync.sync.service import Upload, batch_items, parse_json, upload
from crmsync.times import Rfc3339

router = APIRouter(prefix="/calls", tags=["calls"], route_class=Route)


@router.post(
    "",
    response_model=CallUploadOut,
    summary="Upload call logs",
    description=f"1..{MAX_CALLS} calls, stored in one transaction. A call already stored "
    "(same user, number, timestamp, direction) or repeated in the batch is a duplicate; "
    "invalid items are rejected by index and the rest stored. Only admins may name "
    "another user_id (403 for the whole request otherwise). Writes one sync record.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": calls_body_schema()}},
        }
    },
)
async def upload_calls(
    request: Request,
    body: RawBody,
    user: CurrentUser,
    conn: UploadTx,
    settings: AppSettings,
    device_id: DeviceId,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    async def work() -> Upload:
        # The INSERT writes the sync record too: the upload is one statement without an
        # Idempotency-Key (outside a transaction), and a round trip shorter with one.
        record = service.SyncRecord(device_id=device_id or None, started=time.perf_counter())
        items = batch_items(
            parse_json(body, max_items=MAX_CALLS), loc=("body",), max_items=MAX_CALLS
        )
        batch = await service.call_insert_many(
            conn,
            items,
            user_id=user.id,
            is_admin=user.is_admin,
            region=settings.default_region,
            record=record,
        )
        return Upload(
            synced_contacts=0,
            synced_calls=batch.inserted,
            details={
                "inserted": batch.inserted,
                "duplicates": batch.duplicates,
                "rejected": batch.rejected,
            },
            answer=lambda sync_id: (
                f'{{"sync_id":"{sync_id}","inserted":{batch.inserted},'
                f'"duplicates":{batch.duplicates},"rejected":{batch.rejected_json}}}'
            ).encode(),
            count_metrics=lambda: service.call_count_metrics(batch),
            sync_id=batch.sync_id,
        )

    uploaded = await upload(
        conn,
        user_id=user.id,
        kind="calls",
        key=idempotency_key,
        device_id=device_id,
        request=("POST", request.url.path, body),
        work=work,
    )
    return JSONBytes(uploaded.body, status_code=uploaded.status, headers=uploaded.headers)


@router.get(
    "",
    response_model=CallPage,
    summary="List calls",
    description="Newest first (timestamp, then id). `since` is inclusive, `until` exclusive.",
)
async def list_calls(
    user: CurrentUser,
    conn: Conn,
    page: Page,
    user_id: uuid.UUID | None = None,
    contact_id: uuid.UUID | None = None,
    direction: Direction | None = None,
    since: Annotated[Rfc3339 | None, Query(description="RFC 3339, inclusive")] = None,
    until: Annotated[Rfc3339 | None, Query(description="RFC 3339, exclusive")] = None,
) -> Response:
    return JSONBytes(
        await service.call_list(
            conn,
            page,
            user_id=user_id,
            contact_id=contact_id,
            direction=direction,
            since=since,
            until=until,
        )
    )


@router.get(
    "/{contact_id}",
    response_model=CallPage,
    summary="One contact's calls",
    description="Newest first (timestamp, then id); 404 for an unknown contact.",
)
async def list_contact_calls(
    contact_id: Annotated[uuid.UUID, Path()], user: CurrentUser, conn: Conn, page: Page
) -> Response:
    return JSONBytes(await service.call_list_of_contact(conn, contact_id, page))
