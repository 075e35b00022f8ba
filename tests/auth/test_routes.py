"""Contract: Auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import asyncpg
import bcrypt
import httpx
import jwt
import pytest
from pydantic import ValidationError

from crmsync import db
from crmsync.config import Settings
from crmsync.main import maintain
from tests.conftest import (
    TEST_SECRET,
    Account,
    MakeUser,
    api_routes,
    assert_problem,
    every_place_taken,
    make_app,
)


async def fail_logins(client: httpx.AsyncClient, account: Account, times: int) -> None:
    """`times` sign-ins of the account with a wrong password."""
    for _ in range(times):
        r = await client.post("/auth/login", json={"email": account.email, "password": "bad-pass"})
        assert r.status_code in (401, 429), r.text


async def test_login_returns_token_user_and_expiry(
    client: httpx.AsyncClient, user: Account
) -> None:
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "bearer"
    assert body["expires_at"].endswith("Z")
    assert body["user"]["email"] == user.email
    assert set(body["user"]) == {"id", "name", "email", "is_admin", "created_at", "updated_at"}
    claims = jwt.decode(body["token"], TEST_SECRET, algorithms=["HS256"])
    assert {"sub", "jti", "exp"} <= claims.keys()
    assert r.headers["Cache-Control"] == "no-store"  # a token: no cache may keep it (RFC 6749)


async def test_login_email_is_case_insensitive(client: httpx.AsyncClient, user: Account) -> None:
    r = await client.post(
        "/auth/login", json={"email": user.email.upper(), "password": user.password}
    )
    assert r.status_code == 200


async def test_wrong_password_and_unknown_email_answer_alike(
    client: httpx.AsyncClient, user: Account
) -> None:
    wrong = await client.post("/auth/login", json={"email": user.email, "password": "nope-nope"})
    unknown = await client.post(
        "/auth/login", json={"email": "nobody@example.com", "password": "nope-nope"}
    )
    a = assert_problem(wrong, 401, "invalid_credentials")
    b = assert_problem(unknown, 401, "invalid_credentials")
    assert a == b


async def test_login_throttled_after_repeated_failures_with_retry_after(
    client: httpx.AsyncClient, user: Account
) -> None:
    # One account, however its email is cased: five failures in any spellings lock it.
    spellings = [user.email, user.email.upper(), user.email.title(), user.email.swapcase()]
    for i in range(5):
        email = spellings[i % len(spellings)]
        r = await client.post("/auth/login", json={"email": email, "password": "bad-pass"})
        assert r.status_code == 401
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")
    assert r.headers["Retry-After"] == "300"  # the whole lockout, rounded up: never early


async def test_parallel_failures_are_throttled_like_sequential_ones(
    client: httpx.AsyncClient, user: Account
) -> None:
    # Attempts that arrive together are counted one after another: however many race,
    # only five passwords are checked before the lockout (each used to pass the lockout
    # check before any failure was counted, and was checked).
    answers = await asyncio.gather(
        *[
            client.post("/auth/login", json={"email": user.email, "password": f"bad-{i}"})
            for i in range(20)
        ]
    )
    assert sorted(a.status_code for a in answers) == [401] * 5 + [429] * 15
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")


async def test_two_attempts_racing_at_the_last_allowed_failure_check_one_password(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # Four failures counted, then two attempts in flight together (both held at the count
    # of their failure by this test's lock on the account's throttle row): they are taken
    # one after another, so the fifth failure locks the account before the other attempt
    # has its password checked. Raced past the lockout check, both would be checked:
    # six guesses, not five.
    await fail_logins(client, user, 4)
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM login_throttle FOR UPDATE")
        attempts = [
            asyncio.create_task(
                client.post("/auth/login", json={"email": user.email, "password": f"bad-{i}"})
            )
            for i in range(2)
        ]
        waiting = 0
        for _ in range(500):  # both attempts waiting on a lock in the database
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting == 2:
                break
            await asyncio.sleep(0.01)
        assert waiting == 2
    answers = await asyncio.gather(*attempts)
    assert sorted(a.status_code for a in answers) == [401, 429]


async def test_an_email_that_is_no_address_is_wrong_credentials_and_throttled_too(
    client: httpx.AsyncClient,
) -> None:
    # Taken as it is (it matches no user), not refused nor failing: five attempts lock it.
    attempt = {"email": " not an address ", "password": "whatever1"}
    for _ in range(5):
        r = await client.post("/auth/login", json=attempt)
        assert_problem(r, 401, "invalid_credentials")
    assert_problem(await client.post("/auth/login", json=attempt), 429, "too_many_attempts")


async def test_a_lockout_with_under_a_second_left_says_retry_after_1(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO login_throttle (email_key, failures, window_started_at, locked_until)"
        " VALUES (lower($1), 5, now(), now() + interval '900 milliseconds')",
        user.email,
    )
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")
    assert r.headers["Retry-After"] == "1"  # rounded up, and no later


async def test_throttle_is_shared_by_server_processes(
    client: httpx.AsyncClient, user: Account, database_url: str
) -> None:
    # A second app instance stands for another process: it shares only the database.
    other = make_app(database_url)
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as second:
            for i in range(5):
                target = client if i % 2 else second
                await target.post("/auth/login", json={"email": user.email, "password": "bad!!"})
            r = await second.post(
                "/auth/login", json={"email": user.email, "password": user.password}
            )
            assert_problem(r, 429, "too_many_attempts")
            # logout on one process is honoured by the other
            await client.post("/auth/logout", headers=user.headers)
            assert_problem(
                await second.get("/auth/me", headers=user.headers), 401, "unauthenticated"
            )


async def test_a_process_that_accepted_a_token_refuses_it_once_another_revokes_it(
    client: httpx.AsyncClient, admin: Account, make_user: MakeUser, database_url: str
) -> None:
    """Contract: a signed-out token "is rejected from then on, by every server process"; a
    deleted user's tokens, and a user's tokens after a new password, at once. A process
    that has just accepted the token (so a per-process cache of signed-in tokens would keep
    it in) refuses it on its very next request after another process revoked it."""
    signed_out, deleted, new_password = [await make_user() for _ in range(3)]
    other = make_app(database_url)
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as second:
            for account in (signed_out, deleted, new_password):
                assert (await second.get("/auth/me", headers=account.headers)).status_code == 200
            r = await client.post("/auth/logout", headers=signed_out.headers)
            assert r.status_code == 204
            r = await client.delete(f"/users/{deleted.id}", headers=admin.headers)
            assert r.status_code == 204
            r = await client.patch(
                f"/users/{new_password.id}",
                json={"password": "another-password"},
                headers=admin.headers,
            )
            assert r.status_code == 200
            for account in (signed_out, deleted, new_password):
                r = await second.get("/auth/me", headers=account.headers)
                assert_problem(r, 401, "unauthenticated")
            assert (await second.get("/auth/me", headers=admin.headers)).status_code == 200


async def test_success_resets_failure_count(client: httpx.AsyncClient, user: Account) -> None:
    await fail_logins(client, user, 4)
    ok = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert ok.status_code == 200
    await fail_logins(client, user, 4)
    ok = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert ok.status_code == 200


async def test_login_bad_bodies(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/auth/login", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(r, 400, "bad_request")
    body = assert_problem(
        await client.post("/auth/login", json={"email": "a@b.c"}), 422, "validation_error"
    )
    assert body["errors"][0]["loc"] == ["body", "password"]
    assert_problem(await client.post("/auth/login", json=[1, 2]), 422, "validation_error")
    nul = {"email": "a\x00@b.c", "password": "whatever1"}  # PostgreSQL text holds no NUL
    assert_problem(await client.post("/auth/login", json=nul), 422, "validation_error")
    # The password's bounds in the OpenAPI schema (1..1024 characters) are enforced: an
    # empty or overlong one is a 422, not a wrong password counted against the account.
    for password in ("", "p" * 1025):
        r = await client.post("/auth/login", json={"email": "a@b.c", "password": password})
        body = assert_problem(r, 422, "validation_error")
        assert body["errors"][0]["loc"] == ["body", "password"]


async def test_a_password_longer_than_bcrypt_takes_is_just_wrong(
    client: httpx.AsyncClient, user: Account
) -> None:
    for password in ("x" * 100, user.password + "x" * 72):  # over bcrypt's 72 bytes
        r = await client.post("/auth/login", json={"email": user.email, "password": password})
        assert_problem(r, 401, "invalid_credentials")


async def test_me_returns_the_user(client: httpx.AsyncClient, user: Account) -> None:
    r = await client.get("/auth/me", headers=user.headers)
    assert r.status_code == 200
    assert r.json()["id"] == user.id
    assert r.json()["is_admin"] is False
    assert "password_hash" not in r.text


async def test_me_answers_the_user_object_login_answered(
    client: httpx.AsyncClient, user: Account
) -> None:
    """Contract: GET /auth/me is 200 with the user object, `{id, name, email, is_admin,
    created_at, updated_at}`, the same one the login answered."""
    login = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    r = await client.get("/auth/me", headers=user.headers)
    assert r.status_code == 200
    assert set(r.json()) == {"id", "name", "email", "is_admin", "created_at", "updated_at"}
    assert r.json() == login.json()["user"]


async def test_missing_and_malformed_tokens(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/auth/me"), 401, "unauthenticated")
    for header in ("Bearer", "Bearer garbage", "Basic abc", "Bearer a.b.c"):
        r = await client.get("/auth/me", headers={"Authorization": header})
        assert_problem(r, 401, "unauthenticated")


async def test_forged_expired_and_alg_none_tokens(client: httpx.AsyncClient, user: Account) -> None:
    claims = jwt.decode(user.token, TEST_SECRET, algorithms=["HS256"])
    forged = jwt.encode(claims, "another-secret-" + "y" * 40, algorithm="HS256")
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, TEST_SECRET, algorithm="HS256")
    none = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    no_jti = jwt.encode({"sub": claims["sub"], "exp": claims["exp"]}, TEST_SECRET, "HS256")
    beyond_year_9999 = jwt.encode({**claims, "exp": 10**20}, TEST_SECRET, algorithm="HS256")
    for token in (forged, expired, none, no_jti, beyond_year_9999):
        r = await client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert_problem(r, 401, "unauthenticated")


async def test_a_token_accepted_before_its_expiry_is_refused_after_it(
    client: httpx.AsyncClient, user: Account
) -> None:
    # Verified signatures are cached per token; the expiry must still be checked each time.
    claims = jwt.decode(user.token, TEST_SECRET, algorithms=["HS256"])
    short = jwt.encode({**claims, "exp": int(time.time()) + 2}, TEST_SECRET, algorithm="HS256")
    headers = {"Authorization": f"Bearer {short}"}
    assert (await client.get("/auth/me", headers=headers)).status_code == 200
    await asyncio.sleep(max(0.0, claims_exp(short) - time.time()) + 0.05)
    assert_problem(await client.get("/auth/me", headers=headers), 401, "unauthenticated")


def claims_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_logout_revokes_only_that_token(client: httpx.AsyncClient, user: Account) -> None:
    second = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    other_token = second.json()["token"]
    r = await client.post("/auth/logout", headers=user.headers)
    assert r.status_code == 204
    assert_problem(await client.get("/auth/me", headers=user.headers), 401, "unauthenticated")
    assert_problem(await client.post("/auth/logout", headers=user.headers), 401, "unauthenticated")
    r = await client.get("/auth/me", headers={"Authorization": f"Bearer {other_token}"})
    assert r.status_code == 200


async def test_deleted_users_token_is_rejected_at_once(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    assert (await client.delete(f"/users/{user.id}", headers=admin.headers)).status_code == 204
    assert_problem(await client.get("/auth/me", headers=user.headers), 401, "unauthenticated")
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 401, "invalid_credentials")


async def test_a_new_password_rejects_every_token_the_user_holds(
    client: httpx.AsyncClient, admin: Account, user: Account
) -> None:
    second = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    phones = [user.headers, {"Authorization": f"Bearer {second.json()['token']}"}]
    r = await client.patch(f"/users/{user.id}", json={"name": "Kept"}, headers=admin.headers)
    assert r.status_code == 200
    for headers in phones:  # other changes sign nobody out
        assert (await client.get("/auth/me", headers=headers)).status_code == 200
    r = await client.patch(
        f"/users/{user.id}", json={"password": "changed-password"}, headers=admin.headers
    )
    assert r.status_code == 200
    for headers in phones:
        assert_problem(await client.get("/auth/me", headers=headers), 401, "unauthenticated")
    assert (await client.get("/auth/me", headers=admin.headers)).status_code == 200
    login = await client.post(
        "/auth/login", json={"email": user.email, "password": "changed-password"}
    )
    fresh = {"Authorization": f"Bearer {login.json()['token']}"}
    assert (await client.get("/auth/me", headers=fresh)).status_code == 200
    # an admin that changes its own password signs itself out too
    r = await client.patch(
        f"/users/{admin.id}", json={"password": "admin-changed-pw"}, headers=admin.headers
    )
    assert r.status_code == 200
    assert_problem(await client.get("/auth/me", headers=admin.headers), 401, "unauthenticated")
    assert (await client.get("/auth/me", headers=fresh)).status_code == 200


async def test_token_generation_claim(
    client: httpx.AsyncClient, user: Account, conn: object
) -> None:
    claims = jwt.decode(user.token, TEST_SECRET, algorithms=["HS256"])
    assert claims["gen"] == 0

    def me(token_claims: dict[str, object]) -> Awaitable[httpx.Response]:
        token = jwt.encode(token_claims, TEST_SECRET, algorithm="HS256")
        return client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})

    before_generations = {k: v for k, v in claims.items() if k != "gen"}
    assert (await me(before_generations)).status_code == 200
    for bad in (1, -1, "0", True, 2**31, 0.0, None):
        assert_problem(await me({**claims, "gen": bad}), 401, "unauthenticated")
    await conn.execute("UPDATE users SET token_generation = 1 WHERE id = $1", user.id)  # type: ignore[attr-defined]
    assert_problem(await me(before_generations), 401, "unauthenticated")
    assert (await me({**claims, "gen": 1})).status_code == 200
    # true is no generation, although Python's True == 1
    assert_problem(await me({**claims, "gen": True}), 401, "unauthenticated")


async def test_concurrent_logins_all_succeed(
    client: httpx.AsyncClient, make_user: MakeUser
) -> None:
    account = await make_user()
    answers = await asyncio.gather(
        *[
            client.post("/auth/login", json={"email": account.email, "password": account.password})
            for _ in range(5)
        ]
    )
    assert [a.status_code for a in answers] == [200] * 5


async def test_login_matches_an_email_stored_in_mixed_case(
    client: httpx.AsyncClient, make_user: MakeUser
) -> None:
    account = await make_user(email=f"Ana.Mixed-{uuid.uuid4().hex[:6]}@Example.com")
    for email in (account.email.lower(), account.email.upper()):
        r = await client.post("/auth/login", json={"email": email, "password": account.password})
        assert r.status_code == 200, r.text


async def test_login_matches_emails_whose_letters_python_lowercases_otherwise(
    client: httpx.AsyncClient, admin: Account
) -> None:
    # Python lowercases "İ" to "i" + a combining dot and a final "Σ" to "ς"; the unique
    # index uses PostgreSQL's lower(). A user created with such an address can sign in.
    for local in ("İnfo", "ΣΊΣΥΦΟΣ"):
        email = f"{local}-{uuid.uuid4().hex[:6]}@example.com"
        body = {"name": "U", "email": email, "password": "password-1234"}
        assert (await client.post("/users", json=body, headers=admin.headers)).status_code == 201
        for spelling in (email, email.upper()):
            r = await client.post(
                "/auth/login", json={"email": spelling, "password": "password-1234"}
            )
            assert r.status_code == 200, (spelling, r.text)


async def test_login_takes_every_spelling_of_the_address_the_admin_registered(
    client: httpx.AsyncClient, admin: Account
) -> None:
    """POST /users stores an address as pydantic's EmailStr spells it: an IDNA ("xn--")
    domain decoded, the address in NFC. Sign-in reads it the same way, so the spelling the
    admin typed works too, and both spellings share one throttle."""
    tag = uuid.uuid4().hex[:6]
    for registered, stored, other in (
        (f"maria-{tag}@xn--exmple-cua.com", f"maria-{tag}@exämple.com", None),
        (f"jose\u0301-{tag}@example.com", f"jos\u00e9-{tag}@example.com", None),
        (f"ana-{tag}@exämple.com", f"ana-{tag}@exämple.com", f"ana-{tag}@xn--exmple-cua.com"),
    ):
        body = {"name": "U", "email": registered, "password": "password-1234"}
        r = await client.post("/users", json=body, headers=admin.headers)
        assert (r.status_code, r.json()["email"]) == (201, stored), r.text
        for spelling in filter(None, (registered, stored, other, registered.upper())):
            r = await client.post(
                "/auth/login", json={"email": spelling, "password": "password-1234"}
            )
            assert r.status_code == 200, (spelling, r.text)


async def test_login_ignores_spaces_around_the_email(
    client: httpx.AsyncClient, user: Account
) -> None:
    r = await client.post(
        "/auth/login", json={"email": f"  {user.email} ", "password": user.password}
    )
    assert r.status_code == 200, r.text


async def test_unknown_email_with_the_placeholder_password_is_invalid_credentials(
    client: httpx.AsyncClient,
) -> None:
    # An unknown email is checked against a placeholder hash of "no such user".
    r = await client.post(
        "/auth/login", json={"email": "nobody@example.com", "password": "no such user"}
    )
    assert_problem(r, 401, "invalid_credentials")


async def test_a_72_byte_password_followed_by_more_is_wrong(
    client: httpx.AsyncClient, admin: Account
) -> None:
    password = "p" * 72  # the longest a password may be set to
    payload = {"name": "Long", "email": "long@example.com", "password": password}
    assert (await client.post("/users", json=payload, headers=admin.headers)).status_code == 201
    r = await client.post("/auth/login", json={"email": "long@example.com", "password": password})
    assert r.status_code == 200, r.text
    r = await client.post(
        "/auth/login", json={"email": "long@example.com", "password": password + "q"}
    )
    assert_problem(r, 401, "invalid_credentials")


async def test_an_expired_lockout_lets_the_right_password_in(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await fail_logins(client, user, 5)
    login = {"email": user.email, "password": user.password}
    assert_problem(await client.post("/auth/login", json=login), 429, "too_many_attempts")
    await conn.execute(
        "UPDATE login_throttle SET locked_until = now() - interval '1 second',"
        " window_started_at = now() - interval '20 minutes'"
    )
    assert (await client.post("/auth/login", json=login)).status_code == 200


async def test_one_locked_account_leaves_the_others_signing_in(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    other = await make_user()
    await fail_logins(client, user, 5)
    login = {"email": user.email, "password": user.password}
    assert_problem(await client.post("/auth/login", json=login), 429, "too_many_attempts")
    r = await client.post("/auth/login", json={"email": other.email, "password": other.password})
    assert r.status_code == 200, r.text


async def test_failures_older_than_the_window_start_a_new_count(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await fail_logins(client, user, 4)
    # The window (900 s) has passed since the first of them.
    await conn.execute(
        "UPDATE login_throttle SET window_started_at = now() - interval '16 minutes'"
    )
    for _ in range(2):
        r = await client.post("/auth/login", json={"email": user.email, "password": "bad-pass"})
        assert_problem(r, 401, "invalid_credentials")
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200, r.text


async def test_the_failure_that_starts_a_new_window_counts_towards_the_lockout(
    database_url: str, user: Account, conn: asyncpg.Connection
) -> None:
    """With CRMSYNC_LOGIN_MAX_FAILURES=1 every failure locks, the first of a new window too."""
    app = make_app(database_url, login_max_failures=1)
    wrong = {"email": user.email, "password": "bad-pass"}
    right = {"email": user.email, "password": user.password}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert_problem(await client.post("/auth/login", json=wrong), 401, "invalid_credentials")
            assert_problem(await client.post("/auth/login", json=right), 429, "too_many_attempts")
            # The lockout and the window (900 s) have passed.
            await conn.execute(
                "UPDATE login_throttle SET locked_until = now() - interval '1 second',"
                " window_started_at = now() - interval '16 minutes'"
            )
            assert_problem(await client.post("/auth/login", json=wrong), 401, "invalid_credentials")
            assert_problem(await client.post("/auth/login", json=right), 429, "too_many_attempts")


async def test_token_expires_token_ttl_seconds_after_login(
    client: httpx.AsyncClient, user: Account
) -> None:
    ttl = client.app.state.settings.token_ttl_seconds  # type: ignore[attr-defined]
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    body = r.json()
    claims = jwt.decode(body["token"], TEST_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == ttl
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert expires_at == datetime.fromtimestamp(claims["exp"], UTC)


async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, user: Account) -> None:
    for scheme in ("bearer", "BEARER"):
        r = await client.get("/auth/me", headers={"Authorization": f"{scheme} {user.token}"})
        assert r.status_code == 200, r.text


async def test_the_token_may_follow_the_scheme_after_several_spaces(
    client: httpx.AsyncClient, user: Account
) -> None:
    # RFC 9110 11.4: credentials = auth-scheme [ 1*SP token68 ]
    r = await client.get("/auth/me", headers={"Authorization": f"Bearer   {user.token}"})
    assert r.status_code == 200, r.text


async def test_unauthenticated_answers_ask_for_a_bearer_token(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer garbage"}):
        r = await client.get("/auth/me", headers=headers)
        assert_problem(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"] == "Bearer"


async def test_maintenance_keeps_live_revocations_and_lockouts_and_prunes_stale_ones(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    locked = await make_user()
    await fail_logins(client, locked, 5)
    assert (await client.post("/auth/logout", headers=user.headers)).status_code == 204
    expired_jti = uuid.uuid4()
    await conn.execute(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, now() - interval '1 minute')",
        expired_jti,
    )
    await conn.execute(
        "INSERT INTO login_throttle (email_key, failures, window_started_at)"
        " VALUES ('stale@example.com', 1, now() - interval '2 days')"
    )
    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    assert_problem(await client.get("/auth/me", headers=user.headers), 401, "unauthenticated")
    login = {"email": locked.email, "password": locked.password}
    assert_problem(await client.post("/auth/login", json=login), 429, "too_many_attempts")
    assert (
        await conn.fetchval("SELECT count(*) FROM revoked_tokens WHERE jti = $1", expired_jti) == 0
    )
    assert await conn.fetchval("SELECT array_agg(email_key) FROM login_throttle") == [
        locked.email.lower()
    ]


async def test_the_hourly_prune_keeps_failures_inside_a_window_longer_than_a_day(
    database_url: str, user: Account, conn: asyncpg.Connection
) -> None:
    """CRMSYNC_LOGIN_WINDOW_SECONDS may be up to 7 days: the prune forgets an account's
    failures a day after its window (and lockout) ended, not a day after the window began."""
    window = 3 * 24 * 3600
    app = make_app(database_url, login_max_failures=3, login_window_seconds=window)
    wrong = {"email": user.email, "password": "bad-pass"}
    right = {"email": user.email, "password": user.password}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(2):
                assert_problem(
                    await client.post("/auth/login", json=wrong), 401, "invalid_credentials"
                )
            # Two days later, inside the window; beside it, a row whose window ended a day
            # and a minute ago, and one that ended 23 hours ago.
            await conn.execute(
                """UPDATE login_throttle SET window_started_at = now() - interval '2 days';
                   INSERT INTO login_throttle (email_key, failures, window_started_at) VALUES
                     ('gone@example.com', 1, now() - interval '4 days 1 minute'),
                     ('kept@example.com', 1, now() - interval '3 days 23 hours')"""
            )
            assert await maintain(
                conn, prune=True, idempotency_ttl_days=8, login_window_seconds=window
            )
            assert sorted(
                await conn.fetchval("SELECT array_agg(email_key) FROM login_throttle")
            ) == [
                "kept@example.com",
                user.email.lower(),
            ]
            assert_problem(await client.post("/auth/login", json=wrong), 401, "invalid_credentials")
            assert_problem(await client.post("/auth/login", json=right), 429, "too_many_attempts")


PUBLIC = {("POST", "/auth/login"), ("GET", "/healthz"), ("GET", "/readyz")}


async def test_every_endpoint_but_login_health_and_docs_needs_a_token(
    client: httpx.AsyncClient,
) -> None:
    """The contract's Auth clause, for every route the app has (so a new route that forgets
    CurrentUser fails here): no token, or a forged one, is 401, with a valid body sent and
    with a malformed one (the token is checked before any body is read)."""
    checked = 0
    for route in api_routes(client.app):  # type: ignore[attr-defined]
        path = route.path_format.replace("{user_id}", str(uuid.uuid4()))
        path = path.replace("{contact_id}", str(uuid.uuid4()))
        assert "{" not in path, path
        for method in route.methods - {"HEAD"}:
            if (method, route.path_format) in PUBLIC:
                continue
            for headers in ({}, {"Authorization": "Bearer " + "e30.e30.forged"}):
                for body in ("[]" if method == "POST" else "{}", "{bad"):
                    r = await client.request(method, path, content=body, headers=headers)
                    assert_problem(r, 401, "unauthenticated")
                    checked += 1
    assert checked >= 4 * 20  # every operation of the contract but the public three


async def test_a_revoked_token_is_401_whatever_the_body_and_a_member_403_on_users(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    """A token that is signed but no longer valid (logged out, its user deleted) is 401
    on every route with a malformed body too, as with a valid one: the app signs out on a
    401, and a 400 would tell it its own request was wrong. A member sending a malformed
    body to an admin's route is 403. Only then is a malformed body 400."""
    member = await make_user(name="Other member")
    r = await client.post("/auth/logout", headers=user.headers)
    assert r.status_code == 204
    checked = 0
    for route in api_routes(client.app):  # type: ignore[attr-defined]
        path = route.path_format.replace("{user_id}", str(uuid.uuid4()))
        path = path.replace("{contact_id}", str(uuid.uuid4()))
        for method in route.methods - {"HEAD", "GET", "DELETE"}:
            if (method, route.path_format) in PUBLIC:
                continue
            for body in ("[]" if method == "POST" else "{}", "{bad"):
                r = await client.request(method, path, content=body, headers=user.headers)
                assert_problem(r, 401, "unauthenticated")
                checked += 1
    assert checked >= 2 * 8
    for method, path in (("POST", "/users"), ("PATCH", f"/users/{member.id}")):
        r = await client.request(method, path, content="{bad", headers=member.headers)
        assert_problem(r, 403, "forbidden")
    r = await client.post("/contacts", content="{bad", headers=member.headers)
    assert r.json()["detail"] == "Malformed JSON body"
    assert_problem(r, 400, "bad_request")
    r = await client.put(f"/contacts/{uuid.uuid4()}", content="{bad", headers=member.headers)
    assert_problem(r, 400, "bad_request")


async def test_a_sign_in_that_waits_too_long_for_its_turn_is_told_sign_ins_are_busy(
    client: httpx.AsyncClient, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of sign-ins fills the per-process sign-in slots; one that waits past the
    limit gets a 503 saying so, not "the database is unavailable" (it is not), and the
    rest of the API goes on answering."""
    gate: asyncio.Semaphore = client.app.state.login_gate  # type: ignore[attr-defined]
    monkeypatch.setattr(db, "ACQUIRE_TIMEOUT_SECONDS", 0.2)
    async with every_place_taken(gate):
        r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
        body = assert_problem(r, 503, "unavailable")
        assert body["detail"] == "Too many sign-ins at once; retry shortly"
        assert r.headers["retry-after"] == "5"
        assert (await client.get("/auth/me", headers=user.headers)).status_code == 200
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200


async def test_a_locked_account_is_locked_in_every_spelling_of_its_email(
    client: httpx.AsyncClient, user: Account
) -> None:
    """The lockout is looked up as the failures are counted, by the email lowercased: the
    right password in another case must not slip past it."""
    await fail_logins(client, user, 5)
    for spelling in (user.email, user.email.upper(), user.email.title(), f" {user.email.upper()} "):
        r = await client.post("/auth/login", json={"email": spelling, "password": user.password})
        assert_problem(r, 429, "too_many_attempts")


async def test_failures_within_the_15_minute_window_count_towards_the_lockout(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await fail_logins(client, user, 4)
    # The first failure was 14 minutes ago: still inside the window (900 s).
    await conn.execute(
        "UPDATE login_throttle SET window_started_at = now() - interval '14 minutes'"
    )
    r = await client.post("/auth/login", json={"email": user.email, "password": "bad-pass"})
    assert_problem(r, 401, "invalid_credentials")
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")


async def test_the_window_runs_from_the_first_failure_not_the_latest(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """docs/mobile.md: a fixed window, from the first failure counted. Five failures over
    16 minutes, four of them in the last 2, are two windows: no lockout."""
    wrong = {"email": user.email, "password": "bad-pass"}
    shift = "UPDATE login_throttle SET window_started_at = window_started_at - $1::interval"
    await client.post("/auth/login", json=wrong)
    await conn.execute(shift, timedelta(minutes=14))
    for _ in range(3):
        assert_problem(await client.post("/auth/login", json=wrong), 401, "invalid_credentials")
    await conn.execute(shift, timedelta(minutes=2))  # the first failure: 16 minutes ago
    assert_problem(await client.post("/auth/login", json=wrong), 401, "invalid_credentials")
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert r.status_code == 200, r.text


async def test_maintenance_keeps_the_failures_of_a_running_window(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """Pruning forgets a throttle row only a day after its window ended: an hourly round
    must not hand an account under attack a fresh count of guesses."""
    await fail_logins(client, user, 4)
    assert await maintain(conn, prune=True, idempotency_ttl_days=8, login_window_seconds=900)
    await client.post("/auth/login", json={"email": user.email, "password": "bad-pass"})
    r = await client.post("/auth/login", json={"email": user.email, "password": user.password})
    assert_problem(r, 429, "too_many_attempts")


async def test_an_unknown_email_costs_one_bcrypt_check_as_a_known_one_does(
    client: httpx.AsyncClient, user: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown email and wrong password answer alike in time too: both check a password
    against a hash (a placeholder one for an unknown email). Counted, not timed."""
    checks: list[bytes] = []
    checkpw = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    for email in (user.email, "nobody@example.com"):
        checks.clear()
        r = await client.post("/auth/login", json={"email": email, "password": "bad-pass"})
        assert_problem(r, 401, "invalid_credentials")
        assert len(checks) == 1, email


def test_token_and_throttle_defaults_and_bounds_are_the_documented_ones() -> None:
    """README: a token lives 7 days (60 s to 366 days); 5 failures within 900 s lock an
    account for 300 s."""
    settings = Settings(database_url="postgresql://x/y")
    assert settings.token_ttl_seconds == 7 * 24 * 3600
    assert (
        settings.login_max_failures,
        settings.login_window_seconds,
        settings.login_lockout_seconds,
    ) == (5, 900, 300)
    for ttl in (60, 366 * 24 * 3600):
        assert Settings(database_url="postgresql://x/y", token_ttl_seconds=ttl)
    for ttl in (59, 366 * 24 * 3600 + 1):
        with pytest.raises(ValidationError):
            Settings(database_url="postgresql://x/y", token_ttl_seconds=ttl)
