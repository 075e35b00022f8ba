"""Passwords, tokens, login throttling and revocation. Shared by every server process
through the database: nothing here lives only in one process's memory."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache

import bcrypt
import jwt
from pydantic import EmailStr, TypeAdapter, ValidationError

from crmsync import db
from crmsync.db import Connection, delete_in_batches
from crmsync.errors import InvalidCredentials, TooManyAttempts, Unauthenticated
from crmsync.observability import LOGIN_FAILURES
from crmsync.pagination import Shape

ALGORITHM = "HS256"

USER = Shape(
    (
        ("id", "u.id::text"),
        ("name", "u.name"),
        ("email", "u.email"),
        ("is_admin", "u.is_admin"),
        ("created_at", "api_time(u.created_at)"),
        ("updated_at", "api_time(u.updated_at)"),
    )
)
USER_JSON = USER.object_sql


@dataclass(frozen=True)
class AuthedUser:
    id: uuid.UUID
    is_admin: bool
    json: str  # the user as the API shows it
    jti: uuid.UUID
    expires_at: datetime


BCRYPT_MAX_BYTES = 72  # bcrypt refuses longer passwords


async def hash_password(password: str, *, rounds: int) -> str:
    salt = bcrypt.gensalt(rounds)
    hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), salt)
    return hashed.decode()


async def check_password(password: str, password_hash: str) -> bool:
    """Passwords are set at most BCRYPT_MAX_BYTES long: a longer one is wrong, and still
    checked (cut to that length) so that it costs the same time."""
    raw = password.encode()
    same = await asyncio.to_thread(bcrypt.checkpw, raw[:BCRYPT_MAX_BYTES], password_hash.encode())
    return same and len(raw) <= BCRYPT_MAX_BYTES


@cache
def _dummy_hash(rounds: int) -> str:
    # Compared against when the email is unknown, so both failures cost the same time.
    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds)).decode()


def issue_token(
    user_id: uuid.UUID, generation: int, *, secret: str, ttl_seconds: int
) -> tuple[str, datetime]:
    """A signed token for the user. Its `gen` claim is the user's token generation: a new
    password moves it on, and every token of an older generation is rejected from then on."""
    now = datetime.now(UTC).replace(microsecond=0)
    expires_at = now + timedelta(seconds=ttl_seconds)
    claims = {
        "sub": str(user_id),
        "jti": str(uuid.uuid4()),
        "gen": generation,
        "iat": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM), expires_at


@lru_cache(maxsize=4096)
def _verified_claims(token: str, secret: str) -> tuple[uuid.UUID, uuid.UUID, datetime, int]:
    """(user id, jti, expiry, generation) of a token whose signature holds. A pure
    function of its arguments, so a phone's token is verified once, not on every request;
    expiry, revocation, generation and deletion are checked on every request by the caller."""
    claims = jwt.decode(
        token,
        secret,
        algorithms=[ALGORITHM],
        options={"require": ["exp", "sub", "jti"], "verify_exp": False},
    )
    return (
        uuid.UUID(claims["sub"]),
        uuid.UUID(claims["jti"]),
        datetime.fromtimestamp(int(claims["exp"]), UTC),
        _generation(claims.get("gen", 0)),  # tokens from before generations: 0
    )


def _generation(value: object) -> int:
    if type(value) is not int or not 0 <= value < 2**31:
        raise ValueError("bad token generation")
    return value


def signed_claims(token: str, secret: str) -> tuple[uuid.UUID, uuid.UUID, datetime, int]:
    """(user id, jti, expiry, generation) of a token this server signed and that has not
    expired, else Unauthenticated; without the database (revocation and deletion are
    authenticate's)."""
    try:
        claims = _verified_claims(token, secret)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError, OSError):
        raise Unauthenticated("Invalid or expired token") from None
    if claims[2] <= datetime.now(UTC):
        raise Unauthenticated("Invalid or expired token")
    return claims


async def authenticate(conn: Connection, token: str, *, secret: str) -> AuthedUser:
    """The live user a token belongs to, or Unauthenticated (bad, expired, revoked, deleted)."""
    user_id, jti, expires_at, generation = signed_claims(token, secret)
    row = await conn.fetchrow(
        f"""SELECT u.is_admin, {USER_JSON}::text AS json FROM users u
            WHERE u.id = $1 AND u.deleted_at IS NULL AND u.token_generation = $3
              AND NOT EXISTS (SELECT 1 FROM revoked_tokens t WHERE t.jti = $2)""",
        user_id,
        jti,
        generation,
    )
    if row is None:
        raise Unauthenticated("Token revoked, password changed or user deleted")
    return AuthedUser(user_id, row["is_admin"], row["json"], jti, expires_at)


@dataclass(frozen=True)
class Throttle:
    max_failures: int
    window_seconds: int
    lockout_seconds: int


async def throttle_clear(conn: Connection, email: str) -> None:
    """The account's failed sign-ins forgotten, and its lockout lifted."""
    await conn.execute("DELETE FROM login_throttle WHERE email_key = lower($1)", email)


async def _count_failure(conn: Connection, email_key: str, throttle: Throttle) -> None:
    """One more failure of the account, locking it once they reach max_failures in the window."""
    await conn.execute(
        """INSERT INTO login_throttle AS t (email_key, failures, window_started_at, locked_until)
           VALUES (lower($1), 1, now(), CASE WHEN $2 <= 1 THEN now() + make_interval(secs => $4) END)
           ON CONFLICT (email_key) DO UPDATE SET
             failures = CASE WHEN t.window_started_at < now() - make_interval(secs => $3)
                             THEN 1 ELSE t.failures + 1 END,
             window_started_at = CASE
                             WHEN t.window_started_at < now() - make_interval(secs => $3)
                             THEN now() ELSE t.window_started_at END,
             locked_until = CASE
                 WHEN CASE WHEN t.window_started_at < now() - make_interval(secs => $3)
                           THEN 1 ELSE t.failures + 1 END >= $2
                 THEN now() + make_interval(secs => $4) END""",
        email_key,
        throttle.max_failures,
        float(throttle.window_seconds),
        float(throttle.lockout_seconds),
    )


_EMAIL = TypeAdapter(EmailStr)


def registered_email(email: str) -> str:
    """An email spelled as POST /users stores it (pydantic's EmailStr: the domain lowercased
    and in Unicode, an "xn--" label decoded, the address in NFC), so that whichever spelling
    an admin registered signs in; as given, stripped, when it is no address (it then
    matches no user)."""
    text = email.strip()
    try:
        return _EMAIL.validate_python(text)
    except ValidationError:
        return text


async def login(
    conn: Connection,
    *,
    email: str,
    password: str,
    secret: str,
    ttl_seconds: int,
    rounds: int,
    throttle: Throttle,
) -> tuple[str, datetime, str]:
    """(token, expires_at, user JSON) for right credentials.

    One attempt per account at a time, in every server process: an advisory lock on the
    email, held from the lockout check to the failure's count. Attempts sent together
    otherwise all passed the check before any of them was counted, and each had its
    password checked (20 at once: 20 guesses, not 5). A failed attempt's count is
    committed before the request fails.
    """
    # Lowercased by PostgreSQL, as the unique index on lower(email) does: Python's lower()
    # differs for some letters ("İ" -> "i̇", a final "Σ" -> "ς").
    email_key = registered_email(email)
    row = None
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(lower($2)))", db.LOGIN_LOCK_CLASS, email_key
        )
        wait = await conn.fetchval(
            """SELECT extract(epoch FROM locked_until - now()) FROM login_throttle
               WHERE email_key = lower($1) AND locked_until > now()""",
            email_key,
        )
        if wait is None:
            row = await conn.fetchrow(
                f"""SELECT u.id, u.password_hash, u.token_generation, {USER_JSON}::text AS json
                    FROM users u
                    WHERE lower(u.email) = lower($1) AND u.deleted_at IS NULL""",
                email_key,
            )
            password_hash = row["password_hash"] if row else _dummy_hash(rounds)
            if not await check_password(password, password_hash):
                row = None
            if row is None:
                await _count_failure(conn, email_key, throttle)
            else:
                await throttle_clear(conn, email_key)
    if wait is not None:
        LOGIN_FAILURES.inc()
        raise TooManyAttempts(max(1, math.ceil(wait)))
    if row is None:
        LOGIN_FAILURES.inc()
        raise InvalidCredentials("Invalid email or password")
    token, expires_at = issue_token(
        row["id"], row["token_generation"], secret=secret, ttl_seconds=ttl_seconds
    )
    return token, expires_at, row["json"]


async def logout(conn: Connection, user: AuthedUser) -> None:
    await conn.execute(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        user.jti,
        user.expires_at,
    )


async def auth_prune(conn: Connection, *, login_window_seconds: int) -> None:
    """Forget what can no longer matter: expired revocations, and throttle rows whose window
    and lockout both ended a day ago (a lockout ends after its window starts, so the later
    of the two is past once the row's coalesce is older than a window). The window is the
    configured one: with a fixed day, a window of up to 7 days (CRMSYNC_LOGIN_WINDOW_SECONDS)
    lost its failures to the hourly prune after one. Outside a transaction: each batch
    commits."""
    await delete_in_batches(
        conn, "revoked_tokens", "t.expires_at < now()", oldest_first="t.expires_at"
    )
    await delete_in_batches(
        conn,
        "login_throttle",
        "coalesce(t.locked_until, t.window_started_at)"
        " < now() - interval '1 day' - make_interval(secs => $1)",
        float(login_window_seconds),
        oldest_first="coalesce(t.locked_until, t.window_started_at)",
    )
