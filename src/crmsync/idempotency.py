"""Idempotency-Key for uploads: a repeat with the same key and body gets the first answer.

The key is claimed inside the request's transaction, before any write, and the answer
is stored in that same transaction: a retry either finds the whole first answer or
none of it. A concurrent repeat waits on the key's row until the first commits.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable

from crmsync.db import Connection
from crmsync.errors import ValidationFailed

MAX_KEY_LENGTH = 200

Answer = tuple[int, bytes]  # status code, JSON body


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).digest()


async def idempotent(
    conn: Connection,
    *,
    user_id: uuid.UUID,
    key: str | None,
    request: tuple[str, str, bytes],
    produce: Callable[[], Awaitable[Answer]],
) -> Answer:
    """Run `produce` once per (user, key); later calls with the same key get its answer.
    `request` is (method, path, body): a repeat must send the same."""
    if key is None:
        return await produce()
    assert conn.is_in_transaction(), "a key's claim, its work and its answer commit together"
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ValidationFailed.one(
            ["header", "Idempotency-Key"], f"must be 1..{MAX_KEY_LENGTH} characters"
        )
    request_hash = fingerprint(*request)
    while not await conn.fetchval(
        """INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
           ON CONFLICT (user_id, key) DO NOTHING RETURNING true""",
        user_id,
        key,
        request_hash,
    ):
        stored = await conn.fetchrow(
            "SELECT request_hash, status_code, response FROM idempotency_keys"
            " WHERE user_id = $1 AND key = $2",
            user_id,
            key,
        )
        if stored is None:
            # The row it conflicted with was committed, and then pruned (older than the
            # TTL) before this read: the key has expired, so claim it again.
            continue
        if stored["request_hash"] != request_hash:
            raise ValidationFailed.one(
                ["header", "Idempotency-Key"],
                "this key was already used with another request (another body or endpoint)",
                "idempotency_key_reused",
            )
        return stored["status_code"], stored["response"]
    status, body = await produce()
    await conn.execute(
        "UPDATE idempotency_keys SET status_code = $3, response = $4"
        " WHERE user_id = $1 AND key = $2",
        user_id,
        key,
        status,
        body,
    )
    return status, body
