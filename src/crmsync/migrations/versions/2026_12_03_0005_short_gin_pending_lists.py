"""Searches stay fast after a bulk upload of contacts: short GIN pending lists.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from crmsync.db import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# A GIN index takes new entries into a pending list, merged into the index proper by
# VACUUM or once the list outgrows gin_pending_list_limit (4 MB by default). Every search
# reads the whole list. After a first sync adds 7,500 contacts to 20,000, the list held
# 236 pages and a name search cost PostgreSQL 1.7 ms, in some runs 12-15 ms, instead of
# 0.9-1.3 ms until autovacuum came by (pgbench, one client, PostgreSQL 15). Capped at
# 256 kB the list stays at ~12 pages and searches at 1.0-1.3 ms. The insert that
# overflows the list merges it, so uploading contacts costs more: 54-62 -> 68-88 ms per
# 500 (fastupdate off, the other way out: 120 ms). Only the pending list is merged early:
# the table's visibility map (index-only scans of the list pages) still waits for VACUUM.
UPGRADE = """
ALTER INDEX ix_contacts_name_trgm SET (gin_pending_list_limit = 256);
ALTER INDEX ix_contacts_phone_trgm SET (gin_pending_list_limit = 256);
"""

DOWNGRADE = """
ALTER INDEX ix_contacts_name_trgm RESET (gin_pending_list_limit);
ALTER INDEX ix_contacts_phone_trgm RESET (gin_pending_list_limit);
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
