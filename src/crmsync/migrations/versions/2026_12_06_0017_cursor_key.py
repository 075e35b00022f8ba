"""The key that signs pagination and changes cursors, kept in the database.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from crmsync.db import run_script

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# Cursors were signed with a key derived from CRMSYNC_JWT_SECRET, so changing the secret
# (after a leak) also made every phone's saved changes cursor a 400, and a POST /sync that
# carried one stored nothing. Cursors are no credentials: they are signed so that no
# client makes one up. Their key now lives with the data: the same for every server of the
# database, from its creation on, kept by a backup and a restore, and untouched by a new
# secret. 32 random bytes from gen_random_uuid (pg_strong_random; 244 of the bits).
UPGRADE = r"""
CREATE TABLE server_keys (
    name text CONSTRAINT pk_server_keys PRIMARY KEY,
    key bytea NOT NULL CONSTRAINT ck_server_keys_key CHECK (length(key) >= 32)
);
INSERT INTO server_keys (name, key)
VALUES ('cursor', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
                         'hex'));
"""

DOWNGRADE = r"""
DROP TABLE server_keys;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
