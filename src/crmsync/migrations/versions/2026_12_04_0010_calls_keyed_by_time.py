"""call_logs' primary key is ("timestamp", id), the call list's order: one index fewer.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from crmsync.db import run_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Every call was written into four indexes (three when unlinked): the primary key on id,
# the dedupe key, ix_call_logs_timestamp ("timestamp" DESC, id DESC) for the call list, and
# the contact's. Nothing looks a call up by its id alone, so the primary key becomes the
# list's key, ("timestamp", id), read backwards for newest first, and ix_call_logs_timestamp
# goes: one index entry fewer per call (pgbench, 16 clients, 100-call inserts on 1M calls,
# PostgreSQL 15, six interleaved rounds: +4% to +13% transactions/s; the deep list page the
# same, bench/NOTES.md). Ids stay unique: UUID v7, 62 or more random bits each.
#
# The new key's index is built before the old key is dropped, so the table is never without
# one; PRIMARY KEY USING INDEX needs no scan (both columns are NOT NULL already).
UPGRADE = """
CREATE UNIQUE INDEX pk_call_logs_v2 ON call_logs ("timestamp", id);
ALTER TABLE call_logs DROP CONSTRAINT pk_call_logs;
ALTER TABLE call_logs ADD CONSTRAINT pk_call_logs_v2 PRIMARY KEY USING INDEX pk_call_logs_v2;
ALTER TABLE call_logs RENAME CONSTRAINT pk_call_logs_v2 TO pk_call_logs;
DROP INDEX ix_call_logs_timestamp;
"""

DOWNGRADE = """
CREATE INDEX ix_call_logs_timestamp ON call_logs ("timestamp" DESC, id DESC);
CREATE UNIQUE INDEX pk_call_logs_v1 ON call_logs (id);
ALTER TABLE call_logs DROP CONSTRAINT pk_call_logs;
ALTER TABLE call_logs ADD CONSTRAINT pk_call_logs_v1 PRIMARY KEY USING INDEX pk_call_logs_v1;
ALTER TABLE call_logs RENAME CONSTRAINT pk_call_logs_v1 TO pk_call_logs;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
