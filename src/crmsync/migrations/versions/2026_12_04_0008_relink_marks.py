"""Marks that let the minute's relink look only at recently changed contacts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from crmsync.db import run_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# One row per relink round: when it ran (clock time, read after its snapshot was taken)
# and that snapshot's xmin, below which every transaction had finished. A round relinks
# only contacts written by transactions at or above the xmin of a mark an hour older than
# the previous round (crmsync.calls.service.call_relink); about sixty rows, a round a minute.
UPGRADE = """
CREATE TABLE relink_marks (
    taken_at timestamptz NOT NULL,
    snapshot_xmin bigint NOT NULL,
    CONSTRAINT pk_relink_marks PRIMARY KEY (taken_at)
);
"""

DOWNGRADE = """
DROP TABLE relink_marks;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
