"""A sync record's device id and elapsed time in columns of their own, out of `details`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from crmsync.db import run_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The contract says `details` is an object of counts; a client that models it as a map of
# integers broke on `elapsed_ms` (a float) and `device_id` (text or null). Both become
# fields of the record beside it; the records written so far are moved over.
UPGRADE = """
ALTER TABLE sync_audit ADD COLUMN device_id text, ADD COLUMN elapsed_ms double precision;
UPDATE sync_audit
SET device_id = details ->> 'device_id',
    elapsed_ms = (details ->> 'elapsed_ms')::double precision,
    details = details - 'device_id' - 'elapsed_ms'
WHERE details ?| ARRAY['device_id', 'elapsed_ms'];
"""

DOWNGRADE = """
UPDATE sync_audit
SET details = details || jsonb_build_object('elapsed_ms', elapsed_ms, 'device_id', device_id);
ALTER TABLE sync_audit DROP COLUMN device_id, DROP COLUMN elapsed_ms;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
