"""Call logs' references to users and contacts checked once per statement, not per row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from crmsync.db import run_script

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# A foreign key checks each inserted call on its own, with SELECT ... FOR KEY SHARE of the
# referenced row: every call of an upload locks its user's row and its contact's row, and
# locking a row writes it (its xmax) and WAL-logs it. A 100-call upload dirtied up to 100
# pages of `contacts` and queued 32 concurrent uploads on one `users` row. Without the two
# foreign keys PostgreSQL inserted 100-call batches 15-18% faster (pgbench, 16 clients,
# interleaved A/B on PostgreSQL 15 with 20k contacts; bench/NOTES.md).
#
# The guarantee stays in the database, checked per statement instead of per row:
# - every INSERT or UPDATE of call_logs ends with one anti-join of its new rows against
#   users and contacts, an error (SQLSTATE 23503, as from a foreign key) if one refers to
#   no row;
# - users and contacts are only ever soft-deleted (deleted_at, deleted): a DELETE of them,
#   or a change of their id, is refused. That is what makes a check without row locks
#   enough: a row that was there when the check ran is there for good.
# The other tables' foreign keys to users stay: one row per request, not per call.
UPGRADE = r"""
CREATE FUNCTION check_call_refs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows n
               WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = n.user_id))
       OR EXISTS (SELECT 1 FROM new_rows n
                  WHERE n.contact_id IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM contacts c WHERE c.id = n.contact_id)) THEN
        RAISE foreign_key_violation USING
            MESSAGE = 'call_logs: a user_id or contact_id refers to no row',
            TABLE = 'call_logs';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE foreign_key_violation USING MESSAGE = TG_ARGV[0], TABLE = TG_TABLE_NAME;
END $$;

-- No call may slip in between the foreign keys' drop and the checks' creation.
LOCK TABLE call_logs, users, contacts IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER call_logs_refs_insert AFTER INSERT ON call_logs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION check_call_refs();
CREATE TRIGGER call_logs_refs_update AFTER UPDATE ON call_logs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION check_call_refs();

CREATE TRIGGER users_never_deleted BEFORE DELETE ON users FOR EACH STATEMENT
    EXECUTE FUNCTION refuse('users are soft-deleted (deleted_at): call logs refer to them');
CREATE TRIGGER contacts_never_deleted BEFORE DELETE ON contacts FOR EACH STATEMENT
    EXECUTE FUNCTION refuse('contacts are soft-deleted (deleted): call logs refer to them');
CREATE TRIGGER users_id_fixed BEFORE UPDATE OF id ON users FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION refuse('a user''s id never changes: call logs refer to it');
CREATE TRIGGER contacts_id_fixed BEFORE UPDATE OF id ON contacts FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION refuse('a contact''s id never changes: call logs refer to it');

ALTER TABLE call_logs DROP CONSTRAINT fk_call_logs_user_id_users;
ALTER TABLE call_logs DROP CONSTRAINT fk_call_logs_contact_id_contacts;
"""

DOWNGRADE = r"""
ALTER TABLE call_logs ADD CONSTRAINT fk_call_logs_user_id_users
    FOREIGN KEY (user_id) REFERENCES users (id);
ALTER TABLE call_logs ADD CONSTRAINT fk_call_logs_contact_id_contacts
    FOREIGN KEY (contact_id) REFERENCES contacts (id);
DROP TRIGGER call_logs_refs_insert ON call_logs;
DROP TRIGGER call_logs_refs_update ON call_logs;
DROP TRIGGER users_never_deleted ON users;
DROP TRIGGER contacts_never_deleted ON contacts;
DROP TRIGGER users_id_fixed ON users;
DROP TRIGGER contacts_id_fixed ON contacts;
DROP FUNCTION refuse();
DROP FUNCTION check_call_refs();
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
