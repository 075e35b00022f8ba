from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from crmsync.deps import Conn, CurrentUser, JSONBytes, Page
from crmsync.errors import Forbidden
from crmsync.sync import service
from crmsync.sync.schemas import SyncPage

router = APIRouter(prefix="/sync", tags=["sync"])


@router.get(
    "",
    response_model=SyncPage,
    summary="List sync records",
    description="Newest first (created_at, then id). Admins see everyone's, or one user's "
    "with user_id; others see only their own (naming another user_id is 403).",
)
async def list_sync_records(
    user: CurrentUser, conn: Conn, page: Page, user_id: uuid.UUID | None = None
) -> Response:
    if not user.is_admin:
        if user_id is not None and user_id != user.id:
            raise Forbidden("Only admins may see other users' sync records")
        user_id = user.id
    return JSONBytes(await service.sync_list(conn, page, user_id=user_id))
