from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response

from crmsync.auth.schemas import UserOut
from crmsync.deps import AdminUser, AppSettings, Conn, JSONBytes, Page, Route
from crmsync.openapi import problem_answer
from crmsync.users import service
from crmsync.users.schemas import UserCreate, UserPage, UserUpdate

router = APIRouter(prefix="/users", tags=["users"], route_class=Route)

EMAIL_TAKEN: dict[int | str, dict[str, Any]] = {
    409: problem_answer("`email_taken`: another user has that email")
}


@router.get(
    "",
    response_model=UserPage,
    summary="List users (admin)",
    description="Live users ordered by created_at, then id.",
)
async def list_users(admin: AdminUser, conn: Conn, page: Page) -> Response:
    return JSONBytes(await service.user_list(conn, page))


@router.post(
    "",
    status_code=201,
    response_model=UserOut,
    summary="Create a user (admin)",
    responses=EMAIL_TAKEN,
)
async def create_user(
    body: UserCreate, admin: AdminUser, conn: Conn, settings: AppSettings
) -> Response:
    json = await service.user_create(
        conn,
        name=body.name,
        email=body.email,
        password=body.password,
        is_admin=bool(body.is_admin),
        rounds=settings.bcrypt_rounds,
    )
    return JSONBytes(json, status_code=201)


@router.patch(
    "/{user_id}",
    response_model=UserOut,
    summary="Change a user (admin)",
    description="Fields left out stay as they are. A new password signs the user out "
    "everywhere. Taking the admin right from the last admin is refused (409 `last_admin`).",
    responses={
        409: problem_answer(
            "`email_taken`: another live user has that email; `last_admin`: that would"
            " leave no admin"
        )
    },
)
async def update_user(
    user_id: uuid.UUID, body: UserUpdate, admin: AdminUser, conn: Conn, settings: AppSettings
) -> Response:
    json = await service.user_update(
        conn,
        user_id,
        name=body.name,
        email=body.email,
        password=body.password,
        is_admin=body.is_admin,
        rounds=settings.bcrypt_rounds,
    )
    return JSONBytes(json)


@router.delete(
    "/{user_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a user (admin)",
    description="The user can no longer sign in and its tokens are rejected at once; "
    "its contacts, calls and sync records stay. An admin cannot delete itself (409), and a "
    "delete that would leave no admin (two admins deleting each other at once) is refused "
    "(409 `last_admin`).",
    responses={
        409: problem_answer(
            "`cannot_delete_self`: an admin cannot delete itself; `last_admin`: that would"
            " leave no admin"
        )
    },
)
async def delete_user(user_id: uuid.UUID, admin: AdminUser, conn: Conn) -> Response:
    await service.user_delete(conn, user_id, actor_id=admin.id)
    return Response(status_code=204)
