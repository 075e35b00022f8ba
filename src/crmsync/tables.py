"""Every table, in one place. The migrations build exactly this (a test compares them).

Services run SQL text through asyncpg; these definitions are the schema's single
description, for Alembic and for a reader.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TZ = TIMESTAMP(timezone=True)


def _id(default: str = "gen_random_uuid()") -> Column[object]:
    return Column("id", UUID(as_uuid=True), primary_key=True, server_default=text(default))


# The sync records' ids: time-ordered (UUID v7, migration 0003), so an insert writes the
# rightmost page of the primary key instead of a random one. (Calls' ids are time-ordered
# too, but their primary key is ("timestamp", id), migration 0010.)
def _ordered_id() -> Column[object]:
    return _id("time_ordered_uuid()")


def _now(name: str) -> Column[object]:
    return Column(name, TZ, nullable=False, server_default=text("now()"))


users = Table(
    "users",
    metadata,
    _id(),
    Column("name", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    Column("deleted_at", TZ),
    _now("created_at"),
    _now("updated_at"),
    # Every token carries the generation it was issued in; a new password moves it on.
    Column("token_generation", Integer, nullable=False, server_default=text("0")),
    # One live account per email, case-insensitive; a deleted user's email can be reused.
    Index(
        "uq_users_email_live",
        text("lower(email)"),
        unique=True,
        postgresql_where=text("deleted_at IS NULL"),
    ),
    Index("ix_users_live_created", "created_at", "id", postgresql_where=text("deleted_at IS NULL")),
)

# Logged-out tokens by JWT id, so that every server process rejects them; pruned after expiry.
revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("jti", UUID(as_uuid=True), primary_key=True),
    Column("expires_at", TZ, nullable=False),
    Index("ix_revoked_tokens_expires_at", "expires_at"),
)

# Failed logins per account (lower-cased email, known or not), shared by every process.
login_throttle = Table(
    "login_throttle",
    metadata,
    Column("email_key", Text, primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_started_at", TZ, nullable=False),
    Column("locked_until", TZ),
    # What the hourly prune bounds (auth.service.auth_prune), read oldest first (migration 0016).
    Index("ix_login_throttle_idle_since", text("coalesce(locked_until, window_started_at)")),
)

contacts = Table(
    "contacts",
    metadata,
    _id(),
    Column("name", Text, nullable=False),
    Column("phone_raw", Text, nullable=False),
    Column("phone_normalized", Text, nullable=False),
    Column("created_by", UUID(as_uuid=True), ForeignKey("users.id")),
    _now("created_at"),
    _now("updated_at"),
    Column("deleted", Boolean, nullable=False, server_default=text("false")),
    # Position in the changes feed, set by the contacts_track_change trigger on every
    # write: the writing transaction's id, then a sequence number (see contacts/service.py).
    Column("change_xid", BigInteger, nullable=False, server_default=text("0")),
    Column("change_seq", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="name_length"),
    Index("uq_contacts_phone_normalized", "phone_normalized", unique=True),
    Index(
        "ix_contacts_name_trgm",
        "name",
        postgresql_using="gin",
        postgresql_ops={"name": "gin_trgm_ops"},
        postgresql_with={"gin_pending_list_limit": 256},  # migration 0005
    ),
    Index(
        "ix_contacts_phone_trgm",
        "phone_normalized",
        postgresql_using="gin",
        postgresql_ops={"phone_normalized": "gin_trgm_ops"},
        postgresql_with={"gin_pending_list_limit": 256},
    ),
    Index("ix_contacts_live_name", "name", "id", postgresql_where=text("NOT deleted")),
    Index("ix_contacts_change", "change_xid", "change_seq"),
)

call_logs = Table(
    "call_logs",
    metadata,
    # Time-ordered ids (see _ordered_id), but the primary key is the call list's order,
    # ("timestamp", id), read backwards for newest first: nothing looks a call up by its id
    # alone, and one index fewer is written per call (migration 0010).
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("time_ordered_uuid()")),
    # References users and contacts without foreign keys, which lock the referenced row
    # per inserted call: statement triggers check them instead (migration 0006).
    Column("user_id", UUID(as_uuid=True), nullable=False),
    Column("contact_id", UUID(as_uuid=True)),
    Column("phone_raw", Text),
    Column("phone_normalized", Text),
    Column("direction", Text, nullable=False),
    Column("duration_seconds", Integer, nullable=False),
    Column("timestamp", TZ, nullable=False),
    _now("created_at"),
    CheckConstraint("direction IN ('incoming', 'outgoing', 'missed')", name="direction"),
    CheckConstraint("duration_seconds BETWEEN 0 AND 86400", name="duration"),
    # The contract's duplicate key: same user, number, time and direction is one call.
    # User and time first: it also serves a user's calls newest first.
    Index(
        "uq_call_logs_dedupe",
        "user_id",
        "timestamp",
        text("coalesce(phone_normalized, phone_raw, '')"),
        "direction",
        unique=True,
    ),
    PrimaryKeyConstraint("timestamp", "id", name="pk_call_logs"),
    Index(
        "ix_call_logs_contact",
        "contact_id",
        text('"timestamp" DESC'),
        text("id DESC"),
        postgresql_where=text("contact_id IS NOT NULL"),
    ),
    # Calls waiting for a contact of their number (linked when it is created).
    Index(
        "ix_call_logs_unlinked_phone",
        "phone_normalized",
        postgresql_where=text("contact_id IS NULL AND phone_normalized IS NOT NULL"),
    ),
)

# Exact totals of live contacts, of calls and of sync records, as deltas appended by
# statement triggers (see migration 0002); a total is the sum of a name's rows. The calls'
# rows say whose calls and which direction they count (migration 0011), the sync records'
# whose records (migration 0015).
row_counts = Table(
    "row_counts",
    metadata,
    Column("name", Text, nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("user_id", UUID(as_uuid=True)),
    Column("direction", Text),
    CheckConstraint("name IN ('contacts', 'calls', 'sync')", name="name"),
)

# The relink rounds' marks (migration 0008, crmsync.calls.service.call_relink).
relink_marks = Table(
    "relink_marks",
    metadata,
    Column("taken_at", TZ, primary_key=True),
    Column("snapshot_xmin", BigInteger, nullable=False),
)

sync_audit = Table(
    "sync_audit",
    metadata,
    _ordered_id(),
    Column("user_id", UUID(as_uuid=True), ForeignKey("users.id"), nullable=False),
    Column("synced_contacts", Integer, nullable=False, server_default=text("0")),
    Column("synced_calls", Integer, nullable=False, server_default=text("0")),
    Column("kind", Text, nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),  # counts
    _now("created_at"),
    Column("device_id", Text),  # X-Device-Id, first 200 characters (migration 0009)
    Column("elapsed_ms", Double),
    CheckConstraint("kind IN ('contacts', 'calls', 'sync')", name="kind"),
    Index("ix_sync_audit_created", text("created_at DESC"), text("id DESC")),
    Index("ix_sync_audit_user", "user_id", text("created_at DESC"), text("id DESC")),
)

# Answers of uploads sent with an Idempotency-Key, kept at least 7 days, written in the
# same transaction as the data they describe.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", UUID(as_uuid=True), ForeignKey("users.id"), nullable=False),
    Column("key", Text, nullable=False),
    Column("request_hash", LargeBinary, nullable=False),
    Column("status_code", Integer),
    Column("response", LargeBinary),
    _now("created_at"),
    PrimaryKeyConstraint("user_id", "key", name="pk_idempotency_keys"),
    Index("ix_idempotency_keys_created_at", "created_at"),
)
