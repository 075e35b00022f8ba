"""Phone numbers to E.164 under the configured default region. Pure; the one place that does it."""

from __future__ import annotations

from functools import lru_cache

import phonenumbers

MAX_PHONE_LENGTH = 64


@lru_cache(maxsize=65_536)
def normalize(raw: str, region: str) -> str | None:
    """E.164 for a possible phone number, None for anything else (withheld, short code, junk)."""
    text = raw.strip()
    if not text or len(text) > MAX_PHONE_LENGTH:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_with_hint(raw: str | None, hint: str | None, region: str) -> str | None:
    """The number as the server reads it: the raw spelling first, the client's E.164 hint
    only when the raw spelling says nothing (never trusted without being parsed)."""
    for candidate in (raw, hint):
        if candidate:
            normalized = normalize(candidate, region)
            if normalized:
                return normalized
    return None
