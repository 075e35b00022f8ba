from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from crmsync.text import NO_NUL


class UserOut(BaseModel):
    id: UUID
    name: str
    email: str
    is_admin: bool
    created_at: datetime
    updated_at: datetime


class LoginIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "ana@example.com", "password": "s3cret-pass"}]}
    )
    email: str = Field(min_length=1, max_length=320, pattern=NO_NUL)
    password: str = Field(min_length=1, max_length=1024)


class LoginOut(BaseModel):
    token: str
    token_type: Literal["bearer"]
    expires_at: datetime
    user: UserOut
