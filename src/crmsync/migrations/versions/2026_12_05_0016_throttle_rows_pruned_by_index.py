"""Stale login-throttle rows found through an index by the hourly prune.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from crmsync.db import run_script

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# login_throttle keeps a row per email that failed a login, known or not, so a password
# spray of made-up emails grows it by a row per attempt. The hourly prune deletes the rows
# idle for a day in batches (db.delete_in_batches); with no index on what it bounds, each
# batch scanned the whole table again. The prune now reads them oldest first from this one.
UPGRADE = r"""
CREATE INDEX ix_login_throttle_idle_since
    ON login_throttle ((coalesce(locked_until, window_started_at)));
"""

DOWNGRADE = r"""
DROP INDEX ix_login_throttle_idle_since;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
