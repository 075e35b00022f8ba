"""Exact totals without counting: live contacts and calls, kept by statement triggers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from crmsync.db import run_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Page mode answers an exact `total`. Counting a million calls per request is a scan of
# the table (~70 ms on two cores); instead every write statement appends its delta here,
# in its own transaction, so a reader's snapshot sees a sum exactly as current as the rows
# it pages through. Appending (never updating one row) keeps concurrent uploads from
# queueing on a counter; the server's maintenance task folds the deltas into one row per
# name (COMPACT_ROW_COUNTS in crmsync/main.py).
UPGRADE = r"""
CREATE TABLE row_counts (
    name text NOT NULL,
    n bigint NOT NULL,
    CONSTRAINT ck_row_counts_name CHECK (name IN ('contacts', 'calls'))
);

CREATE FUNCTION count_calls() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO row_counts SELECT 'calls', count(*) FROM new_rows HAVING count(*) > 0;
    ELSE
        INSERT INTO row_counts SELECT 'calls', -count(*) FROM old_rows HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END $$;

-- Live contacts: inserted live, deleted or revived by an update, or removed.
CREATE FUNCTION count_live_contacts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO delta FROM new_rows WHERE NOT deleted;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT (SELECT count(*) FROM new_rows WHERE NOT deleted)
             - (SELECT count(*) FROM old_rows WHERE NOT deleted) INTO delta;
    ELSE
        SELECT -count(*) INTO delta FROM old_rows WHERE NOT deleted;
    END IF;
    IF delta <> 0 THEN
        INSERT INTO row_counts VALUES ('contacts', delta);
    END IF;
    RETURN NULL;
END $$;

-- TRUNCATE fires no row or statement trigger of DELETE: it zeroes the count itself.
CREATE FUNCTION reset_row_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM row_counts WHERE name = TG_ARGV[0];
    RETURN NULL;
END $$;

-- No write may slip between the triggers' creation and the first count.
LOCK TABLE contacts, call_logs IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER call_logs_count_insert AFTER INSERT ON call_logs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_calls();
CREATE TRIGGER call_logs_count_delete AFTER DELETE ON call_logs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_calls();
CREATE TRIGGER contacts_count_insert AFTER INSERT ON contacts
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_live_contacts();
CREATE TRIGGER contacts_count_update AFTER UPDATE ON contacts
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_live_contacts();
CREATE TRIGGER contacts_count_delete AFTER DELETE ON contacts
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_live_contacts();
CREATE TRIGGER call_logs_count_truncate AFTER TRUNCATE ON call_logs
    FOR EACH STATEMENT EXECUTE FUNCTION reset_row_count('calls');
CREATE TRIGGER contacts_count_truncate AFTER TRUNCATE ON contacts
    FOR EACH STATEMENT EXECUTE FUNCTION reset_row_count('contacts');

INSERT INTO row_counts SELECT 'contacts', count(*) FROM contacts WHERE NOT deleted;
INSERT INTO row_counts SELECT 'calls', count(*) FROM call_logs;
"""

DOWNGRADE = """
DROP TRIGGER call_logs_count_insert ON call_logs;
DROP TRIGGER call_logs_count_delete ON call_logs;
DROP TRIGGER contacts_count_insert ON contacts;
DROP TRIGGER contacts_count_update ON contacts;
DROP TRIGGER contacts_count_delete ON contacts;
DROP TRIGGER call_logs_count_truncate ON call_logs;
DROP TRIGGER contacts_count_truncate ON contacts;
DROP FUNCTION reset_row_count();
DROP FUNCTION count_calls();
DROP FUNCTION count_live_contacts();
DROP TABLE row_counts;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
