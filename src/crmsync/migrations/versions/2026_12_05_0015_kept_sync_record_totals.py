"""Kept totals of sync records: page mode of GET /sync without counting them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from crmsync.db import run_script

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# GET /sync?page=N answers an exact total, which was a count of the matching records per
# request: 194-265 ms at 3M records, and every upload writes one, so at a hundred times
# today's team (a thousand phones syncing every few minutes) a year of them made the admin's
# page seconds long. The records' deltas are now appended to row_counts like the calls'
# (migration 0011), one row per user a statement wrote (an upload writes one record), and
# a total is a sum of a few rows. Nothing moves a record to another user; the update
# trigger counts that anyway, so that a later UPDATE cannot silently make a total wrong.
UPGRADE = r"""
ALTER TABLE row_counts DROP CONSTRAINT ck_row_counts_name,
    ADD CONSTRAINT ck_row_counts_name CHECK (name IN ('contacts', 'calls', 'sync'));

CREATE FUNCTION count_sync_records() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO row_counts (name, user_id, n)
        SELECT 'sync', user_id, count(*) FROM new_rows GROUP BY user_id;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO row_counts (name, user_id, n)
        SELECT 'sync', user_id, -count(*) FROM old_rows GROUP BY user_id;
    ELSE
        INSERT INTO row_counts (name, user_id, n)
        SELECT 'sync', user_id, sum(d)
        FROM (SELECT user_id, 1 AS d FROM new_rows
              UNION ALL SELECT user_id, -1 FROM old_rows) moved
        GROUP BY user_id HAVING sum(d) <> 0;
    END IF;
    RETURN NULL;
END $$;

-- No write may slip between the triggers' creation and the first count.
LOCK TABLE sync_audit IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER sync_audit_count_insert AFTER INSERT ON sync_audit
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION count_sync_records();
CREATE TRIGGER sync_audit_count_update AFTER UPDATE ON sync_audit
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_sync_records();
CREATE TRIGGER sync_audit_count_delete AFTER DELETE ON sync_audit
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION count_sync_records();
CREATE TRIGGER sync_audit_count_truncate AFTER TRUNCATE ON sync_audit
    FOR EACH STATEMENT EXECUTE FUNCTION reset_row_count('sync');

INSERT INTO row_counts (name, user_id, n)
SELECT 'sync', user_id, count(*) FROM sync_audit GROUP BY user_id;
"""

DOWNGRADE = r"""
DROP TRIGGER sync_audit_count_insert ON sync_audit;
DROP TRIGGER sync_audit_count_update ON sync_audit;
DROP TRIGGER sync_audit_count_delete ON sync_audit;
DROP TRIGGER sync_audit_count_truncate ON sync_audit;
DROP FUNCTION count_sync_records();
DELETE FROM row_counts WHERE name = 'sync';
ALTER TABLE row_counts DROP CONSTRAINT ck_row_counts_name,
    ADD CONSTRAINT ck_row_counts_name CHECK (name IN ('contacts', 'calls'));
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
