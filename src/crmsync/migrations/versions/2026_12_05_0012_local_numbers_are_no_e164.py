"""Calls to a number dialable only locally keep no phone_normalized, as the server now reads
them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

import logging

import phonenumbers
from alembic import op
from sqlalchemy import text

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

# Until now `555-0150` (no area code) was stored as "+15550150": no E.164 number, and one
# contact for every area's 555-0150. The server now reads such a number as no number, like
# a short code: a contact with it is a 422, a call keeps phone_normalized null and so its
# phone_raw as the number of its duplicate key. The calls stored before are re-keyed the
# same way here, or a phone sending its call log again would store each of them twice.
# They keep their contact_id. A call whose new key another stored call already has (only
# possible if the default region changed between two uploads) is left as it was.
#
# Contacts that hold such a number are left as they are (a contact needs a number, and
# this one's area code is unknown); an edit that gives them their area code fixes them.
REKEY = """
WITH rekeyed AS (
    SELECT DISTINCT ON (l.user_id, l."timestamp", l.phone_raw, l.direction) l."timestamp", l.id
    FROM call_logs l
    WHERE l.phone_normalized = ANY(CAST(:numbers AS text[]))
      AND NOT EXISTS (SELECT FROM call_logs o
                      WHERE o.user_id = l.user_id AND o."timestamp" = l."timestamp"
                        AND o.direction = l.direction AND o.id <> l.id
                        AND coalesce(o.phone_normalized, o.phone_raw, '') = l.phone_raw)
    ORDER BY l.user_id, l."timestamp", l.phone_raw, l.direction, l.id
)
UPDATE call_logs l SET phone_normalized = NULL
FROM rekeyed r WHERE l."timestamp" = r."timestamp" AND l.id = r.id
"""


def _local_only(e164: str) -> bool:
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:
        return False
    reason = phonenumbers.is_possible_number_with_reason(number)
    return bool(reason == phonenumbers.ValidationResult.IS_POSSIBLE_LOCAL_ONLY)


def upgrade() -> None:
    bind = op.get_bind()
    stored = bind.execute(
        text("SELECT DISTINCT phone_normalized FROM call_logs WHERE phone_normalized IS NOT NULL")
    )
    numbers = [n for n in stored.scalars() if _local_only(n)]
    if numbers:
        calls = bind.execute(text(REKEY), {"numbers": numbers}).rowcount
        log.info("%d calls to %d local-only numbers keep no phone_normalized", calls, len(numbers))


def downgrade() -> None:
    """Not undone: which region read each of these numbers is not stored. The older code
    would key a re-sent one by "+1..." again and store it a second time."""
