"""What text the API takes: no NUL in any string, and one rule for what a name may be."""

from __future__ import annotations

import unicodedata
from typing import Annotated

from pydantic import BeforeValidator, StringConstraints

# PostgreSQL text cannot hold NUL: every string field refuses it (a 422) by this pattern,
# rather than failing in the database.
NO_NUL = r"^[^\x00]*$"

# Characters that show nothing: controls, format characters (zero-width space and joiners,
# direction marks, the byte order mark), separators, and the Hangul fillers, letters that
# render as blanks. A name made of them alone would be an empty line in every list.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
MAX_NAME_LENGTH = 200
_HANGUL_FILLERS = frozenset("\u115f\u1160\u3164\uffa0")


def _shows_nothing(value: str) -> bool:
    return all(
        ch.isspace() or ch in _HANGUL_FILLERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES
        for ch in value
    )


def name_text(value: object) -> object:
    """A name in Unicode's composed form (NFC), before its length is checked: "Élodie" sent
    with a combining accent is the same name, stored and searched alike (migration 0014).
    A name that shows nothing is no name: empty, so that the length check refuses it as it
    refuses a name of spaces. Invisible characters among visible ones are kept as sent."""
    if not isinstance(value, str):
        return value
    # Only a name the length check could pass is looked at character by character: a
    # batch of megabyte-long names costs no more than before.
    text = value.strip()
    if len(text) <= MAX_NAME_LENGTH and _shows_nothing(text):
        return ""
    if not unicodedata.is_normalized("NFC", value):
        return unicodedata.normalize("NFC", value)
    return value


# The validator runs before the constraints whatever its place. Placed before them, it
# made pydantic drop them in the contact batch's TypedDict: a 201-character name passed.
Name = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=MAX_NAME_LENGTH, pattern=NO_NUL
    ),
    BeforeValidator(name_text),
]
