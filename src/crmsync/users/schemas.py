from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StrictBool,
)

from crmsync.auth.schemas import UserOut
from crmsync.auth.service import BCRYPT_MAX_BYTES
from crmsync.pagination import PageOut
from crmsync.text import Name


def _bcrypt_sized(password: str) -> str:
    if len(password.encode()) > BCRYPT_MAX_BYTES:
        raise ValueError(f"must be at most {BCRYPT_MAX_BYTES} bytes (a bcrypt limit)")
    return password


Password = Annotated[
    str,
    Field(
        min_length=8,
        max_length=BCRYPT_MAX_BYTES,  # characters; the bytes are checked too
        description=f"8 characters at least, {BCRYPT_MAX_BYTES} bytes of UTF-8 at most",
    ),
    AfterValidator(_bcrypt_sized),
]


class UserCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "Ana", "email": "ana@example.com", "password": "s3cret-pass"}]
        }
    )
    name: Name
    email: EmailStr
    password: Password
    # true or false (the admin right is not given by a 1 or "yes"); null, like absent, is false
    is_admin: StrictBool | None = False


class UserUpdate(BaseModel):
    name: Name | None = None
    email: EmailStr | None = None
    password: Password | None = None
    is_admin: StrictBool | None = None


class UserPage(PageOut[UserOut]):
    pass
