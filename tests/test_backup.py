"""Operations: `crmsync backup` and `crmsync restore` give back every row of every table."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from crmsync import backup, db
from crmsync.auth.service import authenticate, issue_token
from crmsync.contacts.service import Feed, contact_feed
from crmsync.errors import Unauthenticated
from tests.conftest import execute
from tests.test_cli import clean_env, run_cli

SEED = """
INSERT INTO users (id, name, email, password_hash, is_admin, deleted_at) VALUES
  ('00000000-0000-0000-0000-000000000001', 'Ann', 'ann@example.com', '$2b$04$hash', true, NULL),
  ('00000000-0000-0000-0000-000000000002', 'Bob', 'bob@example.com', '$2b$04$hash', false, NULL),
  ('00000000-0000-0000-0000-000000000003', 'Gone', 'gone@example.com', 'x', false, now());
INSERT INTO contacts (name, phone_raw, phone_normalized, created_by, created_at, deleted)
  SELECT 'Contact ' || i, '(415) 555-' || lpad(i::text, 4, '0'), '+1415555' || lpad(i::text, 4, '0'),
         '00000000-0000-0000-0000-000000000001', '2026-01-01T00:00:00.123456Z'::timestamptz + i * interval '1 minute',
         i % 7 = 0
  FROM generate_series(1, 50) i;
INSERT INTO call_logs (user_id, contact_id, phone_raw, phone_normalized, direction, duration_seconds, "timestamp")
  SELECT '00000000-0000-0000-0000-000000000002', c.id, c.phone_raw, c.phone_normalized,
         (ARRAY['incoming', 'outgoing', 'missed'])[1 + c.n % 3], c.n * 7, c.created_at + interval '1 day'
  FROM (SELECT *, row_number() OVER (ORDER BY phone_normalized) AS n FROM contacts) c;
INSERT INTO call_logs (user_id, phone_raw, direction, duration_seconds, "timestamp")
  VALUES ('00000000-0000-0000-0000-000000000001', '*123#', 'outgoing', 3, '2026-02-01T10:00:00Z'),
         ('00000000-0000-0000-0000-000000000001', NULL, 'missed', 0, '2026-02-01T11:00:00Z');
INSERT INTO sync_audit (user_id, synced_contacts, synced_calls, kind, details)
  VALUES ('00000000-0000-0000-0000-000000000001', 3, 0, 'contacts', '{"created": 2, "replaced": 1}'),
         ('00000000-0000-0000-0000-000000000002', 0, 9, 'calls', '{"inserted": 9, "duplicates": 0}'),
         ('00000000-0000-0000-0000-000000000002', 1, 2, 'sync', '{}');
INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, response)
  VALUES ('00000000-0000-0000-0000-000000000002', 'k1', '\\x00ff10', 200, '{"ok":true}'::bytea);
INSERT INTO login_throttle VALUES ('bob@example.com', 2, now(), NULL);
INSERT INTO revoked_tokens VALUES (gen_random_uuid(), now() + interval '1 day');
"""


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def snapshot(url: str) -> dict[str, list[str]]:
    """Every row of every table (and the sequences' positions), in a stable order; users
    without their token_generation, which a restore moves on (every user signed out:
    test_backup_restore_round_trip)."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1"
        )
        rows = {
            t["table_name"]: [
                r[0]
                for r in await conn.fetch(
                    f"SELECT (to_jsonb(t) - 'token_generation')::text"
                    f' FROM "{t["table_name"]}" t ORDER BY 1'
                )
            ]
            for t in tables
        }
        # contacts_change_seq aside: a restore moves it on (test_a_restore_in_place_...).
        rows["<sequences>"] = [
            f"{r['sequencename']}={r['last_value']}"
            for r in await conn.fetch(
                "SELECT sequencename, last_value FROM pg_sequences"
                " WHERE sequencename <> 'contacts_change_seq' ORDER BY 1"
            )
        ]
        return rows
    finally:
        await conn.close()


async def fetchval(url: str, query: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


OwnedDatabase = Callable[[str, str], str]


@pytest.fixture
def owned_database(server_url: str) -> Iterator[OwnedDatabase]:
    """make(name, schema): a new database set up as docs/operations.md §3 says, owned by a
    role that is no superuser, with pg_trgm created by the superuser in schema (public, or
    as managed PostgreSQL does, a schema of its own on the database's search_path); the URL
    of that role in it. The databases and the role are dropped afterwards."""
    role = f"crmsync_backup_owner_{os.getpid()}"
    made: list[str] = []
    asyncio.run(execute(server_url, f'DROP ROLE IF EXISTS "{role}"', f'CREATE ROLE "{role}" LOGIN'))

    def make(name: str, schema: str) -> str:
        made.append(name)
        asyncio.run(
            execute(
                server_url,
                f'DROP DATABASE IF EXISTS "{name}"',
                f'CREATE DATABASE "{name}" OWNER "{role}"',
            )
        )
        setup = ["CREATE EXTENSION pg_trgm"]
        if schema != "public":
            setup = [
                f"CREATE SCHEMA {schema}",
                f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC",
                f"CREATE EXTENSION pg_trgm SCHEMA {schema}",
                f'ALTER DATABASE "{name}" SET search_path = public, {schema}',
            ]
        asyncio.run(execute(db.with_database(server_url, name), *setup))
        parts = urlsplit(db.with_database(server_url, name))
        return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))

    try:
        yield make
    finally:
        drops = [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in made]
        asyncio.run(execute(server_url, *drops, f'DROP ROLE IF EXISTS "{role}"'))


@pytest.fixture
def source(make_database: Callable[[str], Awaitable[str]]) -> str:
    url = asyncio.run(make_database(f"crmsync_backup_src_{os.getpid()}"))
    db.migrate(url)

    async def seed() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SEED)
        finally:
            await conn.close()

    asyncio.run(seed())
    return url


def test_backup_restore_round_trip(
    source: str, make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    target = asyncio.run(make_database(f"crmsync_backup_dst_{os.getpid()}"))
    out = tmp_path / "backups"
    for _ in range(2):
        made = run_cli(
            "backup",
            "--out",
            str(out),
            "--keep",
            "1",
            env=clean_env(CRMSYNC_DATABASE_URL=source),
            cwd=tmp_path,
        )
        assert made.returncode == 0, made.stderr
        assert "backup written to" in made.stdout
    files = backup.backups(out)
    assert len(files) == 1  # pruned to --keep
    assert files[0].name.startswith("crmsync-") and files[0].read_bytes()[:5] == b"PGDMP"
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600  # it holds password hashes
    assert not list(out.glob(".*partial"))

    restore_env = clean_env(CRMSYNC_DATABASE_URL=target)
    restored = run_cli("restore", "--keep-sessions", str(files[0]), env=restore_env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "signed out" not in restored.stdout
    generations = "SELECT id::text, token_generation FROM users ORDER BY id"
    before = dict(asyncio.run(fetch(source, generations)))
    assert before and dict(asyncio.run(fetch(target, generations))) == before
    expected = asyncio.run(snapshot(source))
    assert expected["contacts"] and expected["call_logs"] and expected["sync_audit"]
    assert asyncio.run(snapshot(target)) == expected

    refused = run_cli("restore", str(files[0]), env=restore_env, cwd=tmp_path)
    assert refused.returncode == 1
    assert "not empty" in refused.stderr

    # Without --keep-sessions every user is signed out: each token names its user's
    # token_generation, now one further on. (A logout, a password change or a deletion
    # made after the backup is undone by the restore; the tokens they refused would pass.)
    forced = run_cli("restore", "--force", str(files[0]), env=restore_env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "every user is signed out" in forced.stdout
    assert dict(asyncio.run(fetch(target, generations))) == {
        user: generation + 1 for user, generation in before.items()
    }
    assert asyncio.run(snapshot(target)) == expected

    # A file that is not a whole backup fails before --force drops anything.
    garbage, cut = tmp_path / "garbage.dump", tmp_path / "cut.dump"
    garbage.write_bytes(os.urandom(2000))
    cut.write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    for bad in (garbage, cut):
        for force in (["--force"], []):  # the file is read first, with or without --force
            failed = run_cli("restore", *force, str(bad), env=restore_env, cwd=tmp_path)
            assert failed.returncode == 1 and "not a whole backup" in failed.stderr, failed.stderr
        assert asyncio.run(snapshot(target)) == expected


def test_restore_of_a_wrong_path_says_what_it_is_and_makes_no_database(tmp_path: Path) -> None:
    env = clean_env(CRMSYNC_DATA_DIR=str(tmp_path / "data"))  # the embedded database
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a backup")
    for path, said in (
        (tmp_path, "a directory, not a backup file"),
        (tmp_path / "missing.dump", "no such backup file"),
        (garbage, "is not a whole backup"),
    ):
        refused = run_cli("restore", str(path), env=env, cwd=tmp_path)
        assert refused.returncode == 1 and said in refused.stderr, refused.stderr
    assert not (tmp_path / "data").exists()


def test_restore_moves_transaction_ids_past_the_changes_feed(source: str) -> None:
    """A dump restored into a younger cluster: new contact writes must still sort last."""

    async def run() -> None:
        conn = await asyncpg.connect(source)
        try:
            await conn.execute("ALTER TABLE contacts DISABLE TRIGGER contacts_track_change")
            ahead = await conn.fetchval(
                "UPDATE contacts SET change_xid = pg_current_xact_id()::text::bigint + 3000"
                " WHERE name = 'Contact 1' RETURNING change_xid"
            )
            await conn.execute("ALTER TABLE contacts ENABLE TRIGGER contacts_track_change")
            assert await backup.advance_transaction_ids(source) > 0
            now = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
            assert now > ahead
            assert await backup.advance_transaction_ids(source) == 0
        finally:
            await conn.close()

    asyncio.run(run())


def test_backups_of_the_same_second_sort_by_their_number(tmp_path: Path) -> None:
    names = ["crmsync-20261203T073944Z.dump", "crmsync-20261203T073944Z-2.dump"]
    names += ["crmsync-20261203T073944Z-10.dump", "crmsync-20261203T073945Z.dump"]
    for name in reversed(names):
        (tmp_path / name).touch()
    (tmp_path / ".crmsync-20261203T073946Z.dump.partial").touch()
    # The operator's own copies: named otherwise than `backup` names its files, they are
    # neither counted nor pruned ("before-upgrade" sorted after every stamp: it passed
    # for the newest backup, and --keep 1 deleted the backup just written).
    strays = ["crmsync-before-upgrade.dump", "crmsync-20261203T073947Z-copy.dump"]
    for name in strays:
        (tmp_path / name).touch()
    assert [f.name for f in backup.backups(tmp_path)] == names
    assert backup.newest_backup(tmp_path) == tmp_path / names[-1]


def test_backups_of_one_second_are_all_kept_then_pruned_to_the_newest(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SameSecond(datetime):
        @classmethod
        def now(cls, tz: object = None) -> SameSecond:
            return cls(2026, 12, 3, 7, 39, 44, tzinfo=UTC)

    monkeypatch.setattr(backup, "datetime", SameSecond)
    major = asyncio.run(backup.server_major(source))
    tool = backup.pg_tool("pg_dump", server_major=major, embedded=False)
    kept_by_hand = tmp_path / "crmsync-before-upgrade.dump"
    kept_by_hand.write_bytes(b"PGDMP, the operator's")
    made = [backup.backup(source, tmp_path, keep=2, tool=tool) for _ in range(3)]
    stamp = "crmsync-20261203T073944Z"
    assert [f.name for f in made] == [f"{stamp}.dump", f"{stamp}-2.dump", f"{stamp}-3.dump"]
    assert backup.backups(tmp_path) == made[1:]
    assert kept_by_hand.read_bytes() == b"PGDMP, the operator's"  # not the tool's to prune
    assert all(f.read_bytes()[:5] == b"PGDMP" for f in made[1:])


def test_two_backups_at_once_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The nightly timer and a manual run in the same second: both whole, under two names
    (they shared one partial file, and one failed while the other reported a file still
    being written)."""

    class SameSecond(datetime):
        @classmethod
        def now(cls, tz: object = None) -> SameSecond:
            return cls(2026, 12, 5, 3, 0, 0, tzinfo=UTC)

    monkeypatch.setattr(backup, "datetime", SameSecond)
    tool = tmp_path / "pg_dump"
    tool.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "out = next(a for a in sys.argv if a.startswith('--file='))[7:]\n"
        "f = open(out, 'w'); f.write('PGDMP'); f.flush(); time.sleep(0.5); f.write(' whole')\n"
    )
    tool.chmod(0o755)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(backup.backup, "postgresql://u@h/db", tmp_path / "out", keep=5, tool=tool)
            for _ in range(2)
        ]
        made = sorted(run.result().name for run in runs)
    assert made == ["crmsync-20261205T030000Z-2.dump", "crmsync-20261205T030000Z.dump"]
    assert [f.read_text() for f in backup.backups(tmp_path / "out")] == ["PGDMP whole"] * 2


def test_the_database_password_reaches_pg_dump_by_environment_not_its_command_line(
    tmp_path: Path,
) -> None:
    """Anyone on the machine can read a process's arguments (ps); only it sees its
    environment."""
    seen = tmp_path / "seen"
    tool = tmp_path / "pg_dump"
    tool.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(seen)!r}, 'w')"
        ".write(json.dumps([sys.argv[1:], os.environ.get('PGPASSWORD')]))\n"
    )
    tool.chmod(0o755)
    url = "postgresql://crm:s3cr%40t%3Aword@db.example:5432/crmsync?sslmode=require"
    backup.backup(url, tmp_path / "out", keep=1, tool=tool)
    args, password = json.loads(seen.read_text())
    assert password == "s3cr@t:word"
    assert "postgresql://crm@db.example:5432/crmsync?sslmode=require" in args[-1]
    assert not any("s3cr" in arg for arg in args)


def test_restore_command_moves_transaction_ids_past_the_restored_changes_feed(
    source: str, make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    """`crmsync restore` itself, not only the helper: after it, a new contact write sorts
    after every restored one."""

    async def jump_ahead() -> int:
        conn = await asyncpg.connect(source)
        try:
            await conn.execute("ALTER TABLE contacts DISABLE TRIGGER contacts_track_change")
            ahead: int = await conn.fetchval(
                "UPDATE contacts SET change_xid = pg_current_xact_id()::text::bigint + 2000"
                " WHERE name = 'Contact 2' RETURNING change_xid"
            )
            await conn.execute("ALTER TABLE contacts ENABLE TRIGGER contacts_track_change")
            return ahead
        finally:
            await conn.close()

    async def current_xid(url: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
        finally:
            await conn.close()

    ahead = asyncio.run(jump_ahead())
    target = asyncio.run(make_database(f"crmsync_backup_xid_{os.getpid()}"))
    out = tmp_path / "backups"
    made = run_cli(
        "backup", "--out", str(out), env=clean_env(CRMSYNC_DATABASE_URL=source), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    restored = run_cli(
        "restore",
        str(backup.newest_backup(out)),
        env=clean_env(CRMSYNC_DATABASE_URL=target),
        cwd=tmp_path,
    )
    assert restored.returncode == 0, restored.stderr
    assert "advanced the transaction counter" in restored.stdout
    assert asyncio.run(current_xid(target)) > ahead


def test_backup_refuses_to_keep_no_backup(tmp_path: Path) -> None:
    env = clean_env(CRMSYNC_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = run_cli("backup", "--out", str(tmp_path), "--keep", "0", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--keep" in result.stderr


def test_forced_restore_beside_an_extensions_schema_is_all_or_nothing(
    owned_database: OwnedDatabase, tmp_path: Path
) -> None:
    """pg_trgm in a schema `extensions` on the search path, as on managed PostgreSQL: the
    backup holds schema public only, and `restore --force` drops the old contents and loads
    the dump in one transaction, so a load failing after the drop leaves the old data."""
    pid = os.getpid()
    source = owned_database(f"crmsync_backup_ext_src_{pid}", "extensions")
    target = owned_database(f"crmsync_backup_ext_dst_{pid}", "extensions")
    for url in (source, target):
        db.migrate(url)
    asyncio.run(execute(source, SEED))
    kept = "INSERT INTO users (name, email, password_hash) VALUES ('{0}', '{0}@example.com', 'x')"
    asyncio.run(execute(target, kept.format("old")))
    out, tmp = tmp_path / "backups", tmp_path / "tmp"
    tmp.mkdir()
    source_env = clean_env(CRMSYNC_DATABASE_URL=source)
    target_env = clean_env(CRMSYNC_DATABASE_URL=target, TMPDIR=str(tmp))

    made = run_cli("backup", "--out", str(out), env=source_env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    forced = run_cli(
        "restore", "--force", str(backup.newest_backup(out)), env=target_env, cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert asyncio.run(snapshot(target)) == asyncio.run(snapshot(source))
    trgm = "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"
    assert asyncio.run(fetchval(target, trgm)) == "extensions"
    assert asyncio.run(fetchval(target, "SELECT to_regclass('ix_contacts_name_trgm')::text"))

    # The source's contacts get a trigger calling a function of a schema only the source
    # has: the next dump holds the trigger (schema public), not the function, and its
    # load fails at the trigger, after the drop and every row.
    asyncio.run(execute(target, kept.format("kept")))
    before = asyncio.run(snapshot(target))
    asyncio.run(
        execute(
            source,
            "CREATE SCHEMA elsewhere",
            "CREATE FUNCTION elsewhere.noop() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN NULL; END $$",
            "CREATE TRIGGER zz_elsewhere AFTER INSERT ON contacts"
            " FOR EACH STATEMENT EXECUTE FUNCTION elsewhere.noop()",
        )
    )
    made = run_cli("backup", "--out", str(out), env=source_env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    failed = run_cli(
        "restore", "--force", str(backup.newest_backup(out)), env=target_env, cwd=tmp_path
    )
    assert failed.returncode == 1
    assert "changed nothing" in failed.stderr and "elsewhere" in failed.stderr, failed.stderr
    assert asyncio.run(snapshot(target)) == before
    assert not list(tmp.iterdir())  # the dump's SQL (password hashes) is not left behind


def test_restore_into_a_fresh_database_of_a_role_that_is_no_superuser(
    source: str, owned_database: OwnedDatabase, tmp_path: Path
) -> None:
    """The disaster-recovery path on your own PostgreSQL (docs/operations.md §3): a database
    owned by the crmsync role, pg_trgm created by a superuser. Restore into it, then
    `restore --force` over it, which leaves other schemas alone."""
    target = owned_database(f"crmsync_backup_owned_{os.getpid()}", "public")
    out = tmp_path / "backups"
    made = run_cli(
        "backup", "--out", str(out), env=clean_env(CRMSYNC_DATABASE_URL=source), cwd=tmp_path
    )
    assert made.returncode == 0, made.stderr
    file = str(backup.newest_backup(out))
    target_env = clean_env(CRMSYNC_DATABASE_URL=target)
    expected = asyncio.run(snapshot(source))

    restored = run_cli("restore", file, env=target_env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert asyncio.run(snapshot(target)) == expected

    # --force drops schema public, and pg_trgm (the superuser's) with it; the role makes it
    # again (a trusted extension), in the same transaction. Other schemas stay as they are.
    changed = "UPDATE contacts SET name = 'changed' WHERE name = 'Contact 3'"
    asyncio.run(
        execute(
            target, changed, "CREATE SCHEMA reports", "CREATE TABLE reports.daily AS SELECT 1 AS n"
        )
    )
    relations = asyncio.run(backup.public_relations(target))
    assert "public.contacts" in relations and "reports.daily" not in relations
    forced = run_cli("restore", "--force", file, env=target_env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert asyncio.run(snapshot(target)) == expected
    trgm = "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"
    assert asyncio.run(fetchval(target, trgm)) == "public"
    assert asyncio.run(fetchval(target, "SELECT n FROM reports.daily")) == 1
    public = "SELECT pg_get_userbyid(nspowner) || ' ' || has_schema_privilege('public',"
    public += " nspname, 'USAGE') FROM pg_namespace WHERE nspname = 'public'"
    assert asyncio.run(fetchval(target, public)) == "pg_database_owner true"  # as it was

    # A role that may not create pg_trgm: --force stops at once, saying what to do.
    name = urlsplit(target).path.lstrip("/")
    role = urlsplit(target).username
    asyncio.run(execute(source, f'REVOKE CREATE ON DATABASE "{name}" FROM "{role}"'))
    asyncio.run(execute(target, changed))
    before = asyncio.run(snapshot(target))
    refused = run_cli("restore", "--force", file, env=target_env, cwd=tmp_path)
    assert refused.returncode == 1
    message = [line for line in refused.stderr.splitlines() if "pg_trgm" in line]
    assert len(message) == 1 and f"GRANT CREATE ON DATABASE {name}" in message[0], refused.stderr
    assert asyncio.run(snapshot(target)) == before


def test_a_restore_in_place_gives_the_feed_a_new_origin_and_hands_out_no_etag_twice(
    source: str, tmp_path: Path
) -> None:
    """The same database, backed up, written on, then restored (`--force`): cursors and
    ETags handed out after the backup must not match the restored data. Cursors name the
    contacts table, which the restore makes anew; change_seq, the ETag, moves past every
    value it had."""

    async def state() -> tuple[Feed, int]:
        conn = await asyncpg.connect(source)
        try:
            return await contact_feed(conn, b"k" * 32), await conn.fetchval(
                "SELECT nextval('contacts_change_seq')"
            )
        finally:
            await conn.close()

    before, _ = asyncio.run(state())
    assert not before.restored
    out = tmp_path / "backups"
    env = clean_env(CRMSYNC_DATABASE_URL=source)
    made = run_cli("backup", "--out", str(out), env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    etag_after_backup = asyncio.run(
        fetchval(
            source,
            "UPDATE contacts SET name = 'Renamed' WHERE name = 'Contact 1' RETURNING change_seq",
        )
    )
    restored = run_cli("restore", "--force", str(backup.newest_backup(out)), env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert (
        asyncio.run(fetchval(source, "SELECT count(*) FROM contacts WHERE name = 'Renamed'")) == 0
    )
    after, next_seq = asyncio.run(state())
    assert after.origin != before.origin
    assert after.origin.split("/")[0] == before.origin.split("/")[0]  # the same cluster
    assert after.restored  # cursors that name no contacts table now restart too
    assert isinstance(etag_after_backup, int) and next_seq > etag_after_backup


def test_restore_loads_the_newest_pg_dumps_archive_into_any_supported_server(
    source: str, make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    """A backup written by the wheel's pg_dump 18 (what `crmsync backup` uses where no
    client of the server's version is installed) restores into this server: on 15 and
    16 without the transaction_timeout setting pg_restore 18 writes."""
    file = backup.backup(source, tmp_path, keep=1, tool=backup.newest_tool("pg_dump"))
    target = asyncio.run(make_database(f"crmsync_backup_newest_{os.getpid()}"))
    restored = run_cli(
        "restore", str(file), env=clean_env(CRMSYNC_DATABASE_URL=target), cwd=tmp_path
    )
    assert restored.returncode == 0, restored.stderr
    assert asyncio.run(snapshot(target)) == asyncio.run(snapshot(source))


def test_restore_refuses_another_databases_dump_and_one_from_a_newer_postgresql(
    source: str, make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    other = asyncio.run(make_database(f"crmsync_backup_other_{os.getpid()}"))
    asyncio.run(execute(other, "CREATE TABLE users (id int)", "INSERT INTO users VALUES (1)"))
    foreign = backup.backup(other, tmp_path / "other", keep=1, tool=backup.newest_tool("pg_dump"))
    env = clean_env(CRMSYNC_DATABASE_URL=source)
    before = asyncio.run(snapshot(source))
    refused = run_cli("restore", "--force", str(foreign), env=env, cwd=tmp_path)
    assert refused.returncode == 1
    assert "is no crmsync backup: it has no table alembic_version, call_logs, contacts" in (
        refused.stderr
    )
    assert asyncio.run(snapshot(source)) == before

    ours = backup.backup(source, tmp_path / "ours", keep=1, tool=backup.newest_tool("pg_dump"))
    major = asyncio.run(backup.server_major(source))
    tool = backup.newest_tool("pg_restore")
    assert backup.check_archive(ours, tool=tool) == major
    backup.check_server(ours, major, server_major=major)
    with pytest.raises(backup.BackupError, match=f"comes from PostgreSQL {major}; restore it"):
        backup.check_server(ours, major, server_major=major - 1)


def test_restore_refuses_while_a_server_is_connected_to_the_database(
    source: str, tmp_path: Path
) -> None:
    """A running server would go on with what it read at its start (the changes feed's
    origin) and its cached statements: the restore waits until it is stopped."""
    file = backup.backup(source, tmp_path, keep=1, tool=backup.newest_tool("pg_dump"))
    env = clean_env(CRMSYNC_DATABASE_URL=source)

    async def with_a_server_connection() -> subprocess.CompletedProcess[str]:
        pooled = await asyncpg.connect(source, server_settings={"application_name": "crmsync"})
        try:
            return await asyncio.to_thread(
                run_cli, "restore", "--force", str(file), env=env, cwd=tmp_path
            )
        finally:
            await pooled.close()

    refused = asyncio.run(with_a_server_connection())
    assert refused.returncode == 1
    assert "a crmsync server is running on this database (connections open: 1)" in refused.stderr
    restored = run_cli("restore", "--force", str(file), env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr


def test_a_backup_from_before_token_generations_restores_and_signs_everyone_out(
    make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    """A backup of a schema at migration 0006, without users.token_generation: it restores
    (the sign-out updated that column in the load's transaction, which failed it), and a
    token issued before the restore is refused afterwards (migrated, such a schema gives
    every user generation 0, which the token names)."""
    pid = os.getpid()
    old = asyncio.run(make_database(f"crmsync_backup_0006_{pid}"))
    db.migrate(old)
    db.migrate(old, "0006")
    ann = uuid.UUID("00000000-0000-0000-0000-0000000000a1")
    asyncio.run(
        execute(
            old,
            "INSERT INTO users (id, name, email, password_hash) VALUES"
            f" ('{ann}', 'Ann', 'ann@example.com', 'x')",
            "INSERT INTO contacts (name, phone_raw, phone_normalized, created_by)"
            f" VALUES ('Old friend', '+14155550100', '+14155550100', '{ann}')",
        )
    )
    file = backup.backup(old, tmp_path, keep=1, tool=backup.newest_tool("pg_dump"))
    assert backup.archive_revision(file, tool=backup.newest_tool("pg_restore")) == "0006"

    # The database replaced: this version's, where Ann holds a token of generation 0.
    target = asyncio.run(make_database(f"crmsync_backup_0006_dst_{pid}"))
    db.migrate(target)
    asyncio.run(
        execute(
            target,
            "INSERT INTO users (id, name, email, password_hash) VALUES"
            f" ('{ann}', 'Ann', 'ann@example.com', 'y')",
        )
    )
    secret = "s" * 32
    token, _ = issue_token(ann, 0, secret=secret, ttl_seconds=3600)

    async def signed_in() -> bool:
        conn = await asyncpg.connect(target)
        try:
            await authenticate(conn, token, secret=secret)
            return True
        except Unauthenticated:
            return False
        finally:
            await conn.close()

    assert asyncio.run(signed_in())
    env = clean_env(CRMSYNC_DATABASE_URL=target)
    restored = run_cli("restore", "--force", str(file), env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    assert "every user is signed out" in restored.stdout
    migrated = run_cli("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert not asyncio.run(signed_in())
    assert asyncio.run(fetchval(target, "SELECT password_hash FROM users")) == "x"
    assert asyncio.run(fetchval(target, "SELECT name FROM contacts")) == "Old friend"


def test_restore_refuses_a_backup_of_a_newer_crmsync_before_touching_anything(
    source: str, make_database: Callable[[str], Awaitable[str]], tmp_path: Path
) -> None:
    """Its alembic_version names a revision this version does not know: loaded, neither
    `serve` nor `migrate` could start on the database."""
    asyncio.run(execute(source, "UPDATE alembic_version SET version_num = '0999'"))
    file = backup.backup(source, tmp_path / "out", keep=1, tool=backup.newest_tool("pg_dump"))
    empty = asyncio.run(make_database(f"crmsync_backup_newer_{os.getpid()}"))
    kept = asyncio.run(make_database(f"crmsync_backup_newer_kept_{os.getpid()}"))
    db.migrate(kept)
    asyncio.run(execute(kept, SEED))
    before = asyncio.run(snapshot(kept))
    for url, force in ((empty, []), (kept, ["--force"])):
        env = clean_env(CRMSYNC_DATABASE_URL=url)
        refused = run_cli("restore", *force, str(file), env=env, cwd=tmp_path)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "comes from a newer crmsync (its schema is at revision 0999" in refused.stderr
    assert asyncio.run(backup.public_relations(empty)) == []
    assert asyncio.run(snapshot(kept)) == before


def test_a_password_in_the_urls_query_reaches_the_tools_by_environment_only() -> None:
    """libpq takes `?password=` too; on a tool's command line anyone could read it (ps)."""
    url = (
        "postgresql://crm@db.example:5432/crmsync?sslmode=require&password=s3cr%40t%26word+1"
        "&application_name=crm%20sync&sslrootcert=/etc/ssl/ca.pem"
    )
    libpq_url, env = backup._libpq(url)
    assert env["PGPASSWORD"] == "s3cr@t&word+1"
    assert libpq_url == (
        "postgresql://crm@db.example:5432/crmsync?sslmode=require"
        "&application_name=crm%20sync&sslrootcert=/etc/ssl/ca.pem"
    )
    # Both: libpq takes the query's; a URL without a host keeps its `//` (a Unix socket).
    libpq_url, env = backup._libpq("postgresql://crm:old@/crmsync?host=/run/pg&password=new")
    assert (libpq_url, env["PGPASSWORD"]) == ("postgresql://crm@/crmsync?host=/run/pg", "new")
    libpq_url, env = backup._libpq("postgresql:///crmsync?password=p&host=/run/pg")
    assert (libpq_url, env["PGPASSWORD"]) == ("postgresql:///crmsync?host=/run/pg", "p")
    assert backup._libpq("postgresql:///crmsync?host=/run/pg")[0] == (
        "postgresql:///crmsync?host=/run/pg"
    )
