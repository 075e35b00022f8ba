"""Phone numbers to E.164 under the configured default region. Pure; the one place that does it."""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

MAX_PHONE_LENGTH = 64
_POSSIBLE = phonenumbers.ValidationResult.IS_POSSIBLE  # not IS_POSSIBLE_LOCAL_ONLY
_DIALLED = re.compile(r"[\d\s().\-/]+")  # digits (any script's) and the spacing between them


@lru_cache(maxsize=65_536)
def normalize(raw: str, region: str) -> str | None:
    """E.164 for a possible phone number, None for anything else (withheld, short code, junk,
    or a number dialable only locally: `555-0150` without its area code is no E.164 number,
    and as `+15550150` it would make one contact of every area's 555-0150)."""
    text = raw.strip()
    if not text or len(text) > MAX_PHONE_LENGTH:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != _POSSIBLE:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


_WHY = "Not a possible phone number: "
_REASONS = {
    phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "dialable only locally, add its area code",
    phonenumbers.ValidationResult.TOO_SHORT: "too few digits",
    phonenumbers.ValidationResult.TOO_LONG: "too many digits",
    phonenumbers.ValidationResult.INVALID_LENGTH: "no number of its country has that many digits",
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
}
_PARSE_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too few digits",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too few digits",
    phonenumbers.NumberParseException.TOO_LONG: "too many digits",
}


def why_not(raw: str | None, hint: str | None, region: str) -> str:
    """Why `normalize_with_hint(raw, hint, region)` is None, in words a phone can show its
    user (the `msg` of a validation error of type "phone")."""
    text = (raw_or_hint(raw, hint) or "").strip()
    if not text:
        return _WHY + "empty"
    if len(text) > MAX_PHONE_LENGTH:
        return _WHY + f"longer than {MAX_PHONE_LENGTH} characters"
    if _could_be_dialled_from_abroad(text, region):
        return _WHY + "written for calling out of another country, give it with its +country code"
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as exc:
        return _WHY + _PARSE_REASONS.get(exc.error_type, "no number in it")
    return _WHY + _REASONS.get(phonenumbers.is_possible_number_with_reason(number), "unknown")


@lru_cache(maxsize=4_096)
def _region_of(e164: str) -> str | None:
    return phonenumbers.region_code_for_number(phonenumbers.parse(e164))


@lru_cache(maxsize=1)
def _international_prefixes() -> re.Pattern[str]:
    """Any country's prefix for dialling out of it: "00" in most, "011" in North America,
    "0011" in Australia, "810" in Russia (libphonenumber's metadata of every region)."""
    prefixes = {
        meta.international_prefix
        for region in phonenumbers.SUPPORTED_REGIONS
        if (meta := phonenumbers.PhoneMetadata.metadata_for_region(region))
        and meta.international_prefix
    }
    return re.compile("|".join(f"(?:{p})" for p in sorted(prefixes)))


def _international_prefix(digits: str) -> bool:
    """Whether `digits` dial out of some country: two digits or more (not a trunk "0")."""
    return len(digits) >= 2 and _international_prefixes().fullmatch(digits) is not None


def _digits(raw: str) -> str | None:
    """The digits, as ASCII, of a spelling of digits and spacing only, else None."""
    text = raw.strip()
    if len(text) > MAX_PHONE_LENGTH or not _DIALLED.fullmatch(text):
        return None
    return str(phonenumbers.normalize_digits_only(text))


@lru_cache(maxsize=4_096)
def _valid(e164: str) -> bool:
    """Whether a number is in a range its country has given out, not only of a possible
    length (libphonenumber's metadata)."""
    return bool(phonenumbers.is_valid_number(phonenumbers.parse(e164)))


def _dialled_from_abroad(raw: str, e164: str) -> bool:
    """Whether `raw` is `e164` dialled out of some country: an international prefix, then
    the number with its country code ("001 212 208 0059" from Europe for +12122080059). The
    number must be a valid one: the prefixes of all countries together take many lengths
    ("003" is one too), so "0034 912 345 678" is +34 912 345 678 or +49 1234 5678, and only
    the first is a number anyone has."""
    digits, number = _digits(raw), e164[1:]
    return (
        digits is not None
        and digits.endswith(number)
        and _international_prefix(digits[: len(digits) - len(number)])
        and _valid(e164)
    )


def _could_be_dialled_from_abroad(raw: str, region: str) -> bool:
    """Whether `raw` is some number dialled out of some country. Only an error's reason asks
    (each prefix tried is a parse): "0049 30 1234567" is "00" and +49... or "004" and +9...,
    which only a hint tells apart."""
    digits = _digits(raw) or ""
    return any(
        _international_prefix(digits[:n])
        and (number := normalize("+" + digits[n:], region)) is not None
        and _valid(number)
        for n in range(2, min(len(digits), 9))
    )


def raw_or_hint(raw: str | None, hint: str | None) -> str | None:
    """The spelling kept as phone_raw: the hint stands in for a missing or blank one, the
    spelling from which normalize_with_hint then reads the number."""
    return hint if hint is not None and (raw is None or not raw.strip()) else raw


def normalize_with_hint(raw: str | None, hint: str | None, region: str) -> str | None:
    """The number as the server reads it. The raw spelling decides; the client's E.164 hint
    is never taken on its word: it stands alone only when there is no raw spelling, and
    otherwise counts only when the raw spelling, read in the hint's own country, is that
    same number (a national spelling from abroad: "020 7946 0958" with "+442079460958"), or,
    where the server's region reads no number in it, is that number dialled out of some
    country ("001 212 208 0059" with "+12122080059" from a phone in Europe: a US server,
    whose own prefix is 011, reads nothing in it alone).
    A raw spelling that is no possible number (a short code, junk) is no number, hint or not.
    """
    hinted = normalize(hint, region) if hint else None
    if raw is None or not raw.strip():
        return hinted
    if hinted is not None:
        hint_region = _region_of(hinted)
        if hint_region not in (None, region) and normalize(raw, hint_region) == hinted:
            return hinted
    read = normalize(raw, region)
    if read is None and hinted is not None and _dialled_from_abroad(raw, hinted):
        return hinted
    return read
