"""RFC 3339 times as the contract wants them: an offset is required, answers are UTC."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field

FUTURE_SKEW = timedelta(minutes=5)
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339_text(value: object) -> object:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not RFC3339.match(value):
        if isinstance(value, str) and RFC3339.match(value[:-6] + "+" + value[-5:]):
            # 2026-11-02T09:00:00+01:00 sent in a URL unencoded: the '+' arrived as a space
            raise ValueError(
                "must be an RFC 3339 date-time with an offset; a '+' in a URL reads as a space:"
                " send it as %2B"
            )
        raise ValueError("must be an RFC 3339 date-time with an offset, e.g. 2026-01-31T09:30:00Z")
    return value


def _not_in_future(value: datetime) -> datetime:
    if value > datetime.now(UTC) + FUTURE_SKEW:
        raise ValueError("must not be more than 5 minutes in the future")
    return value


# Years 1 to 9999 in UTC, checked inside pydantic-core: 0001-01-01T00:30:00+01:00 is year 0
# in UTC, which Python cannot convert to and PostgreSQL would print as year 1, without "BC".
UtcDatetime = Annotated[
    AwareDatetime,
    Field(
        ge=datetime(1, 1, 1, tzinfo=UTC), le=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    ),
]
Rfc3339 = Annotated[UtcDatetime, BeforeValidator(_rfc3339_text)]
PastRfc3339 = Annotated[Rfc3339, AfterValidator(_not_in_future)]


def as_utc(value: datetime | None) -> datetime | None:
    """The same instant in UTC, for a time handed to PostgreSQL inside JSON text: RFC 3339
    allows offsets up to +-23:59, PostgreSQL reads at most +-15:59 from text."""
    return None if value is None else value.astimezone(UTC)
