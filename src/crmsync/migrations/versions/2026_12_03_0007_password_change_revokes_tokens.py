"""A new password rejects every token the user already holds.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from crmsync.db import run_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# A token carries its user's token generation (claim `gen`, 0 for tokens issued before
# this revision); authentication checks it against this column on every request, and
# PATCH /users/{id} with a password adds one to it. A constant default: no table rewrite.
UPGRADE = """
ALTER TABLE users ADD COLUMN token_generation integer NOT NULL DEFAULT 0;
"""

DOWNGRADE = """
ALTER TABLE users DROP COLUMN token_generation;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
