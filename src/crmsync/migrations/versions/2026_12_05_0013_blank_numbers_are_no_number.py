"""Calls stored with a blank phone_raw (" ", a tab) and no phone_normalized keep "" instead,
as the server now stores them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

import logging

from alembic import op
from sqlalchemy import text

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

# A call without a number counts as one number for the duplicate rule: its key is "". A
# blank spelling was kept as sent and so keyed apart, and the same withheld call sent
# once as "" and once as " " was stored twice. The server now stores a blank spelling as
# "" (calls.service._as_stored); the calls stored before are re-keyed the same way here,
# or a phone sending its call log again would store each of them twice. A call whose new
# key another stored call already has (it was stored twice) is left as it was: nothing
# acknowledged is deleted.
# Blank is what Python's str.strip() empties, as the server decides it (calls.service):
# these 29 characters. A database that is not UTF-8 cannot even be sent the ones beyond
# ASCII (the conversion fails, and the migration with it): there, the ASCII ones.
BLANK = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())

# One pass over call_logs. The probe of the new key uses uq_call_logs_dedupe.
REKEY = """
WITH rekeyed AS (
    SELECT DISTINCT ON (l.user_id, l."timestamp", l.direction) l."timestamp", l.id
    FROM call_logs l
    WHERE l.phone_normalized IS NULL AND l.phone_raw <> ''
      AND btrim(l.phone_raw, CAST(:blank AS text)) = ''
      AND NOT EXISTS (SELECT FROM call_logs o
                      WHERE o.user_id = l.user_id AND o."timestamp" = l."timestamp"
                        AND o.direction = l.direction
                        AND coalesce(o.phone_normalized, o.phone_raw, '') = '')
    ORDER BY l.user_id, l."timestamp", l.direction, l.id
)
UPDATE call_logs l SET phone_raw = ''
FROM rekeyed r WHERE l."timestamp" = r."timestamp" AND l.id = r.id
"""


def upgrade() -> None:
    bind = op.get_bind()
    utf8 = bind.execute(text("SHOW server_encoding")).scalar() == "UTF8"
    blank = BLANK if utf8 else "".join(c for c in BLANK if c.isascii())
    calls = bind.execute(text(REKEY), {"blank": blank}).rowcount
    if calls:
        log.info('%d calls with a blank number keep "" as phone_raw', calls)


def downgrade() -> None:
    """Not undone: which blank spelling each call had is not kept. Harmless to the older
    code: "" is the key it gives a call without a number."""
