from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from crmsync.auth import service
from crmsync.auth.schemas import LoginIn, LoginOut, UserOut
from crmsync.db import login_slot
from crmsync.deps import AppSettings, Conn, CurrentUser, JSONBytes, Route

router = APIRouter(prefix="/auth", tags=["auth"], route_class=Route)


@router.post(
    "/login",
    response_model=LoginOut,
    summary="Sign in",
    description="Exchange email (case-insensitive) and password for a bearer token. "
    "Repeated failures for one account answer 429 with Retry-After.",
    dependencies=[Depends(login_slot, scope="function")],  # before the connection
)
async def login(body: LoginIn, conn: Conn, settings: AppSettings) -> Response:
    token, expires_at, user_json = await service.login(
        conn,
        email=body.email,
        password=body.password,
        secret=settings.secret,
        ttl_seconds=settings.token_ttl_seconds,
        rounds=settings.bcrypt_rounds,
        throttle=service.Throttle(
            settings.login_max_failures,
            settings.login_window_seconds,
            settings.login_lockout_seconds,
        ),
    )
    expires = expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    body_json = (
        f'{{"token":"{token}","token_type":"bearer","expires_at":"{expires}","user":{user_json}}}'
    )
    return JSONBytes(body_json, headers={"Cache-Control": "no-store"})  # a token: never cached


@router.post(
    "/logout",
    status_code=204,
    response_class=Response,
    summary="Sign out",
    description="Revoke this token for every server process.",
)
async def logout(user: CurrentUser, conn: Conn) -> Response:
    await service.logout(conn, user)
    return Response(status_code=204)


@router.get("/me", response_model=UserOut, summary="The signed-in user")
async def me(user: CurrentUser) -> Response:
    return JSONBytes(user.json)
