"""User administration. Deleting is soft: a deleted user's data stays, its tokens die."""

from __future__ import annotations

import uuid

import asyncpg

from crmsync.auth.service import (
    USER,
    USER_JSON,
    hash_password,
    registered_email,
    throttle_clear,
)
from crmsync.db import Connection
from crmsync.errors import CannotDeleteSelf, EmailTaken, LastAdmin, NotFound
from crmsync.pagination import Listing, PageRequest, SortKey, paginate


async def user_list(conn: Connection, page: PageRequest) -> bytes:
    listing = Listing(
        scope="users",
        from_sql="FROM users u",
        shape=USER,
        where=["u.deleted_at IS NULL"],
        keys=[
            SortKey("u.created_at", "timestamptz", "created_at"),
            SortKey("u.id", "uuid", "id"),
        ],
    )
    return await paginate(conn, listing, page)


async def user_create(
    conn: Connection, *, name: str, email: str, password: str, is_admin: bool, rounds: int
) -> str:
    password_hash = await hash_password(password, rounds=rounds)
    try:
        json: str = await conn.fetchval(
            f"""INSERT INTO users AS u (name, email, password_hash, is_admin)
                VALUES ($1, $2, $3, $4) RETURNING {USER_JSON}::text""",
            name,
            email,
            password_hash,
            is_admin,
        )
    except asyncpg.UniqueViolationError:
        raise EmailTaken("That email is already used by another user") from None
    return json


# A write that would leave no live admin (a demotion, or a deletion racing another) is
# refused: nobody could manage users through the API any more. Every live admin's row is
# locked first, in id order, so that two such writes at once take turns and the second
# sees the first's result: two admins deleting each other leave one.
OTHER_ADMINS = """(SELECT count(*) FROM (SELECT id FROM users
                   WHERE is_admin AND deleted_at IS NULL ORDER BY id FOR UPDATE) a
                   WHERE a.id <> u.id) > 0"""


async def _refused_or_unknown(conn: Connection, user_id: uuid.UUID) -> Exception:
    """Why a write of user_id matched no row: it would remove the last admin, or no live
    user has that id."""
    if await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL)", user_id
    ):
        return LastAdmin("That would leave no admin: make another user an admin first")
    return NotFound("No such user")


async def user_update(
    conn: Connection,
    user_id: uuid.UUID,
    *,
    name: str | None,
    email: str | None,
    password: str | None,
    is_admin: bool | None,
    rounds: int,
) -> str:
    password_hash = await hash_password(password, rounds=rounds) if password else None
    try:
        json: str | None = await conn.fetchval(
            f"""UPDATE users AS u SET name = coalesce($2, name), email = coalesce($3, email),
                  password_hash = coalesce($4, password_hash),
                  -- a new password signs the user out everywhere (auth.service.authenticate)
                  token_generation = token_generation + CASE WHEN $4 IS NULL THEN 0 ELSE 1 END,
                  is_admin = coalesce($5, is_admin),
                  -- a PATCH that changes nothing leaves the user as it was, updated_at too
                  updated_at = CASE
                      WHEN $4 IS NOT NULL OR (name, email, is_admin) IS DISTINCT FROM
                           (coalesce($2, name), coalesce($3, email), coalesce($5, is_admin))
                      THEN now() ELSE updated_at END
                WHERE id = $1 AND deleted_at IS NULL
                  AND ($5 IS NOT FALSE OR NOT is_admin OR {OTHER_ADMINS})
                RETURNING {USER_JSON}::text""",
            user_id,
            name,
            email,
            password_hash,
            is_admin,
        )
    except asyncpg.UniqueViolationError:
        raise EmailTaken("That email is already used by another user") from None
    if json is None:
        raise await _refused_or_unknown(conn, user_id)
    return json


async def user_reset_password(
    conn: Connection, *, email: str, password: str, make_admin: bool, rounds: int
) -> str | None:
    """The operator's way back in (`crmsync reset-password`): a live user's new password,
    which signs it out everywhere as PATCH does, its login lockout lifted, and with
    make_admin the admin right. The user's JSON; None when no live user has that email."""
    email = registered_email(email)
    user_id = await conn.fetchval(
        "SELECT id FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL", email
    )
    if user_id is None:
        return None
    json = await user_update(
        conn,
        user_id,
        name=None,
        email=None,
        password=password,
        is_admin=True if make_admin else None,
        rounds=rounds,
    )
    await throttle_clear(conn, email)
    return json


async def user_delete(conn: Connection, user_id: uuid.UUID, *, actor_id: uuid.UUID) -> None:
    if user_id == actor_id:
        raise CannotDeleteSelf("An admin cannot delete its own account")
    status = await conn.execute(
        "UPDATE users AS u SET deleted_at = now(), updated_at = now()"
        f" WHERE id = $1 AND deleted_at IS NULL AND (NOT is_admin OR {OTHER_ADMINS})",
        user_id,
    )
    if status == "UPDATE 0":
        raise await _refused_or_unknown(conn, user_id)
