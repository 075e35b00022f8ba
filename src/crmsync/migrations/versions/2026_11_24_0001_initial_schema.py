"""Initial schema: users, auth state, contacts with change tracking, call logs, sync records.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from crmsync.db import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- How the API writes a time: UTC, microseconds, "Z". STABLE, as to_char is: a function
-- declared more strictly than its body is never inlined, and runs ~3x slower per row.
CREATE FUNCTION api_time(t timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;

CREATE TABLE users (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    email text NOT NULL,
    password_hash text NOT NULL,
    is_admin boolean NOT NULL DEFAULT false,
    deleted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_users PRIMARY KEY (id)
);
CREATE UNIQUE INDEX uq_users_email_live ON users (lower(email)) WHERE deleted_at IS NULL;
CREATE INDEX ix_users_live_created ON users (created_at, id) WHERE deleted_at IS NULL;

CREATE TABLE revoked_tokens (
    jti uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT pk_revoked_tokens PRIMARY KEY (jti)
);
CREATE INDEX ix_revoked_tokens_expires_at ON revoked_tokens (expires_at);

CREATE TABLE login_throttle (
    email_key text NOT NULL,
    failures integer NOT NULL,
    window_started_at timestamptz NOT NULL,
    locked_until timestamptz,
    CONSTRAINT pk_login_throttle PRIMARY KEY (email_key)
);

CREATE TABLE contacts (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    name text NOT NULL,
    phone_raw text NOT NULL,
    phone_normalized text NOT NULL,
    created_by uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted boolean NOT NULL DEFAULT false,
    change_xid bigint NOT NULL DEFAULT 0,
    change_seq bigint NOT NULL DEFAULT 0,
    CONSTRAINT pk_contacts PRIMARY KEY (id),
    CONSTRAINT fk_contacts_created_by_users FOREIGN KEY (created_by) REFERENCES users (id),
    CONSTRAINT ck_contacts_name_length CHECK (char_length(name) BETWEEN 1 AND 200)
);
CREATE UNIQUE INDEX uq_contacts_phone_normalized ON contacts (phone_normalized);
CREATE INDEX ix_contacts_name_trgm ON contacts USING gin (name gin_trgm_ops);
-- Search by digits: phone_normalized LIKE '%4155%'.
CREATE INDEX ix_contacts_phone_trgm ON contacts USING gin (phone_normalized gin_trgm_ops);
CREATE INDEX ix_contacts_live_name ON contacts (name, id) WHERE NOT deleted;
CREATE INDEX ix_contacts_change ON contacts (change_xid, change_seq);

-- Every write to a contact moves it to the end of the changes feed: the writing
-- transaction's id, then a sequence number within it (see contacts/service.py).
CREATE SEQUENCE contacts_change_seq;
CREATE FUNCTION contacts_track_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_xid := pg_current_xact_id()::text::bigint;
    NEW.change_seq := nextval('contacts_change_seq');
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER contacts_track_change BEFORE INSERT OR UPDATE ON contacts
    FOR EACH ROW EXECUTE FUNCTION contacts_track_change();

CREATE TABLE call_logs (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL,
    contact_id uuid,
    phone_raw text,
    phone_normalized text,
    direction text NOT NULL,
    duration_seconds integer NOT NULL,
    "timestamp" timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_call_logs PRIMARY KEY (id),
    CONSTRAINT fk_call_logs_user_id_users FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT fk_call_logs_contact_id_contacts FOREIGN KEY (contact_id) REFERENCES contacts (id),
    CONSTRAINT ck_call_logs_direction CHECK (direction IN ('incoming', 'outgoing', 'missed')),
    CONSTRAINT ck_call_logs_duration CHECK (duration_seconds BETWEEN 0 AND 86400)
);
CREATE UNIQUE INDEX uq_call_logs_dedupe
    ON call_logs (user_id, coalesce(phone_normalized, phone_raw, ''), "timestamp", direction);
CREATE INDEX ix_call_logs_timestamp ON call_logs ("timestamp" DESC, id DESC);
CREATE INDEX ix_call_logs_contact ON call_logs (contact_id, "timestamp" DESC, id DESC);
CREATE INDEX ix_call_logs_user ON call_logs (user_id, "timestamp" DESC, id DESC);
CREATE INDEX ix_call_logs_unlinked_phone ON call_logs (phone_normalized)
    WHERE contact_id IS NULL AND phone_normalized IS NOT NULL;

CREATE TABLE sync_audit (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL,
    synced_contacts integer NOT NULL DEFAULT 0,
    synced_calls integer NOT NULL DEFAULT 0,
    kind text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_sync_audit PRIMARY KEY (id),
    CONSTRAINT fk_sync_audit_user_id_users FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT ck_sync_audit_kind CHECK (kind IN ('contacts', 'calls', 'sync'))
);
CREATE INDEX ix_sync_audit_created ON sync_audit (created_at DESC, id DESC);
CREATE INDEX ix_sync_audit_user ON sync_audit (user_id, created_at DESC, id DESC);

CREATE TABLE idempotency_keys (
    user_id uuid NOT NULL,
    key text NOT NULL,
    request_hash bytea NOT NULL,
    status_code integer,
    response bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_idempotency_keys PRIMARY KEY (user_id, key),
    CONSTRAINT fk_idempotency_keys_user_id_users FOREIGN KEY (user_id) REFERENCES users (id)
);
CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at);
"""

DOWNGRADE = """
DROP TABLE idempotency_keys, sync_audit, call_logs, contacts, login_throttle,
    revoked_tokens, users;
DROP FUNCTION contacts_track_change();
DROP FUNCTION api_time(timestamptz);
DROP SEQUENCE contacts_change_seq;
"""


def upgrade() -> None:
    run_script(UPGRADE)


def downgrade() -> None:
    run_script(DOWNGRADE)
