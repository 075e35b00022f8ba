"""Contact names stored in Unicode's composed form (NFC), as the server now stores them.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

import logging

from alembic import op
from sqlalchemy import text

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

# "Élodie" sent with a combining accent (NFD, as some address books export it) was kept
# as sent, and the name search, which compares code points, did not find it for "Élo"
# typed on a phone (NFC), nor the other way round. The server now stores names in NFC
# (contacts.schemas.Name) and searches in NFC; the names stored before are recomposed
# here, one pass over contacts. Each is a write like any other: a new ETag, and an entry
# in the changes feed, so the phones take the recomposed name. A name that NFC would make
# longer than the 200 characters allowed (rare compositions expand) is left as it was.
# PostgreSQL normalizes only in a UTF-8 database.
RECOMPOSE = """
UPDATE contacts SET name = normalize(name, NFC)
WHERE name IS NOT NFC NORMALIZED AND char_length(normalize(name, NFC)) <= 200
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.execute(text("SHOW server_encoding")).scalar() != "UTF8":
        return
    contacts = bind.execute(text(RECOMPOSE)).rowcount
    if contacts:
        log.info("%d contact names recomposed into NFC", contacts)


def downgrade() -> None:
    """Not undone: which names were sent decomposed is not kept, and the older code reads
    either form."""
