"""Contract: Contacts, GET /contacts, /contacts/search, /contacts/lookup, /contacts/{id};
Pagination."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx

from crmsync.contacts.service import contact_search, phone_digits
from crmsync.pagination import PageRequest
from tests.conftest import Account, MakeUser, assert_problem
from tests.contacts.test_upsert import contact, post


async def walk(client: httpx.AsyncClient, account: Account, path: str, **params: Any) -> list[Any]:
    """Every item, following next_cursor from the first page."""
    body = (await client.get(path, params=params, headers=account.headers)).json()
    items = list(body["items"])
    while body["next_cursor"]:
        params = {**params, "cursor": body["next_cursor"]}
        body = (await client.get(path, params=params, headers=account.headers)).json()
        items += body["items"]
    return items


async def add(conn: asyncpg.Connection, *names_and_phones: tuple[str, str]) -> None:
    await conn.executemany(
        "INSERT INTO contacts (name, phone_raw, phone_normalized) VALUES ($1, $2, $2)",
        names_and_phones,
    )


async def test_list_is_live_contacts_by_name_then_id(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, ("Bruno", "+14155550001"), ("Alice", "+14155550002"), ("Bruno", "+14155550003"))
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized, deleted)"
        " VALUES ('Aaron', '+14155550004', '+14155550004', true)"
    )
    body = (await client.get("/contacts", headers=user.headers)).json()
    assert (body["page"], body["total"], body["next_cursor"], body["limit"]) == (
        None,
        None,
        None,
        50,
    )
    names = [(c["name"], c["id"]) for c in body["items"]]
    brunos = sorted(i for n, i in names if n == "Bruno")
    assert names == [("Alice", names[0][1]), ("Bruno", brunos[0]), ("Bruno", brunos[1])]


async def test_following_next_cursor_walks_every_contact_once(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, *[(f"Name {i % 7}", f"+1415555{i:04d}") for i in range(23)])
    items = await walk(client, user, "/contacts", limit=5)
    assert len(items) == 23 and len({c["id"] for c in items}) == 23
    assert items == sorted(items, key=lambda c: (c["name"], c["id"]))


async def test_page_mode_counts_and_page_with_cursor_is_400(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, *[(f"N{i:02d}", f"+1415555{i:04d}") for i in range(12)])
    body = (await client.get("/contacts?page=3&limit=5", headers=user.headers)).json()
    assert (body["page"], body["total"], [c["name"] for c in body["items"]]) == (
        3,
        12,
        ["N10", "N11"],
    )
    assert body["next_cursor"] is None
    past = (await client.get("/contacts?page=9&limit=5", headers=user.headers)).json()
    assert (past["items"], past["total"]) == ([], 12)
    first = (await client.get("/contacts?limit=5", headers=user.headers)).json()
    r = await client.get(f"/contacts?page=2&cursor={first['next_cursor']}", headers=user.headers)
    assert_problem(r, 400, "bad_request")


async def test_garbage_or_foreign_cursor_is_400(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, *[(f"N{i}", f"+1415555{i:04d}") for i in range(3)])
    assert_problem(
        await client.get("/contacts?cursor=garbage", headers=user.headers), 400, "bad_request"
    )
    search = (await client.get("/contacts/search?q=N&limit=1", headers=user.headers)).json()
    r = await client.get(f"/contacts?cursor={search['next_cursor']}", headers=user.headers)
    assert_problem(r, 400, "bad_request")
    r = await client.get(
        f"/contacts/search?q=M&cursor={search['next_cursor']}", headers=user.headers
    )
    assert_problem(r, 400, "bad_request")
    # A digits search's cursor holds its digits too: q=555 cannot follow q=415's.
    digits = (await client.get("/contacts/search?q=415&limit=1", headers=user.headers)).json()
    for q, status in (("415", 200), ("555", 400), ("N", 400)):
        r = await client.get(
            f"/contacts/search?q={q}&limit=1&cursor={digits['next_cursor']}", headers=user.headers
        )
        assert r.status_code == status, (q, r.text)


async def test_limit_outside_1_to_200_is_422(client: httpx.AsyncClient, user: Account) -> None:
    for limit in (0, 201):
        r = await client.get(f"/contacts?limit={limit}", headers=user.headers)
        assert_problem(r, 422, "validation_error")


async def test_search_ranks_name_prefix_before_inner_substring_then_name(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(
        conn,
        ("Natalia", "+14155550001"),
        ("alina", "+14155550002"),
        ("Bali Tours", "+14155550003"),
        ("Alicia", "+14155550004"),
        ("Bob", "+14155550005"),
    )
    items = await walk(client, user, "/contacts/search", q="ALI", limit=2)
    assert [c["name"] for c in items] == ["Alicia", "alina", "Bali Tours", "Natalia"]


async def test_search_folds_case_beyond_ascii(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(
        conn,
        ("Élodie Durand", "+14155550001"),
        ("HÉLOÏSE", "+14155550002"),
        ("Дмитрий Орлов", "+14155550003"),
        ("Σωκράτης", "+14155550004"),
        ("Elodie", "+14155550005"),
    )
    for q, expected in (
        ("élo", ["Élodie Durand", "HÉLOÏSE"]),  # the prefix first
        ("ÉLOÏ", ["HÉLOÏSE"]),
        ("дмит", ["Дмитрий Орлов"]),
        ("ОРЛ", ["Дмитрий Орлов"]),
        ("ΣΩΚ", ["Σωκράτης"]),
    ):
        items = await walk(client, user, "/contacts/search", q=q)
        assert [c["name"] for c in items] == expected, q


async def test_names_are_stored_and_searched_in_nfc(
    client: httpx.AsyncClient, user: Account
) -> None:
    """ "Élodie" sent with a combining accent is stored composed, and either form of q finds
    either form of the name; its length is counted once composed."""
    decomposed, composed = "E\u0301lodie Martin", "\u00c9lodie Martin"
    r = await client.post(
        "/contacts", json={"name": decomposed, "phone_raw": "+14155550001"}, headers=user.headers
    )
    assert (r.status_code, r.json()["contact"]["name"]) == (201, composed), r.text
    long = {"name": "e\u0301" * 200, "phone_raw": "+14155550002"}  # 400 code points, 200 composed
    r = await client.post("/contacts", json=long, headers=user.headers)
    assert (r.status_code, r.json()["contact"]["name"]) == (201, "\u00e9" * 200), r.text
    for q in ("E\u0301lo", "\u00c9lo", "e\u0301lodie m"):
        items = await walk(client, user, "/contacts/search", q=q)
        assert [c["name"] for c in items] == [composed], q


async def test_a_name_with_invisible_characters_among_visible_ones_is_kept_as_sent(
    client: httpx.AsyncClient, user: Account
) -> None:
    """Only a name that shows nothing is refused (test_upsert); a family emoji joined by
    zero-width joiners, or a Hebrew name behind a direction mark, is a name."""
    for i, name in enumerate(
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467", "\u200f\u05d3\u05e0\u05d4")
    ):
        body = {"name": name, "phone_raw": f"+1415555000{i}"}
        r = await client.post("/contacts", json=body, headers=user.headers)
        assert (r.status_code, r.json()["contact"]["name"]) == (201, name), r.text


async def test_search_pages_count_and_walk_every_match(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, *[(f"Ana {i:02d}", f"+1415555{i:04d}") for i in range(7)])
    await add(conn, ("Bob", "+14155559999"))
    for q in ("ana", "4155550"):
        body = (
            await client.get(f"/contacts/search?q={q}&page=2&limit=5", headers=user.headers)
        ).json()
        assert (body["total"], [c["name"] for c in body["items"]]) == (7, ["Ana 05", "Ana 06"])
        past = (
            await client.get(f"/contacts/search?q={q}&page=5&limit=5", headers=user.headers)
        ).json()
        assert (past["items"], past["total"]) == ([], 7)
        items = await walk(client, user, "/contacts/search", q=q, limit=3)
        assert [c["name"] for c in items] == [f"Ana {i:02d}" for i in range(7)]


async def test_search_escapes_like_wildcards(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(
        conn, ("100% Bruno", "+14155550001"), ("Bruno", "+14155550002"), ("A_B", "+14155550003")
    )
    for q, expected in (("%", ["100% Bruno"]), ("_", ["A_B"]), ("\\", [])):
        items = await walk(client, user, "/contacts/search", q=q)
        assert [c["name"] for c in items] == expected, q


FULL_WIDTH = {ord(d): 0xFF10 + int(d) for d in "0123456789"}


async def test_search_by_mostly_digits_matches_e164_digits_ordered_by_name(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(
        conn,
        ("Zed", "+14155550123"),
        ("Amy", "+14155550124"),
        ("Room 555", "+12125559999"),
        ("Other", "+14085550000"),
    )
    # Stored spellings that are not E.164: the digits searched are the E.164 ones.
    await conn.execute(
        "UPDATE contacts SET phone_raw = '(' || substr(phone_normalized, 3, 3) || ') '"
        " || substr(phone_normalized, 6, 3) || '-' || substr(phone_normalized, 9)"
    )
    items = await walk(client, user, "/contacts/search", q="(415) 555-012")
    assert [c["name"] for c in items] == ["Amy", "Zed"]
    items = await walk(client, user, "/contacts/search", q="+1 415 555 0124")  # country code too
    assert [c["name"] for c in items] == ["Amy"]
    items = await walk(client, user, "/contacts/search", q="555")
    assert [c["name"] for c in items] == ["Amy", "Other", "Room 555", "Zed"]
    # Digits of other scripts, as lookup and POST /contacts read them: full-width, Arabic-Indic.
    items = await walk(client, user, "/contacts/search", q="415 555 012".translate(FULL_WIDTH))
    assert [c["name"] for c in items] == ["Amy", "Zed"]
    items = await walk(client, user, "/contacts/search", q="\u0664\u0660\u0668")  # Arabic-Indic 408
    assert [c["name"] for c in items] == ["Other"]
    # Not mostly digits: a name search.
    items = await walk(client, user, "/contacts/search", q="Room 555")
    assert [c["name"] for c in items] == ["Room 555"]


def test_mostly_digits_means_three_digits_and_sixty_percent_of_non_space_characters() -> None:
    assert phone_digits("415") == "415"
    assert phone_digits("41") is None
    assert phone_digits("+1 (415)") is None  # 4 of 7 non-space characters: 57%
    assert phone_digits("(415) 555") == "415555"  # 6 of 9
    assert phone_digits("4 1 5 a b") == "415"  # spaces do not count
    assert phone_digits("41a5b") == "415"  # 60%
    assert phone_digits("41ab5c") is None  # 50%


async def test_search_q_must_be_1_to_100_characters(
    client: httpx.AsyncClient, user: Account
) -> None:
    assert_problem(
        await client.get("/contacts/search?q=", headers=user.headers), 422, "validation_error"
    )
    r = await client.get("/contacts/search", params={"q": "x" * 101}, headers=user.headers)
    assert_problem(r, 422, "validation_error")
    r = await client.get("/contacts/search", params={"q": "x" * 100}, headers=user.headers)
    assert r.status_code == 200
    r = await client.get("/contacts/search", params={"q": "a\x00"}, headers=user.headers)
    assert_problem(r, 422, "validation_error")


async def test_search_excludes_deleted_contacts(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "INSERT INTO contacts (name, phone_raw, phone_normalized, deleted)"
        " VALUES ('Alice', '+14155550004', '+14155550004', true)"
    )
    assert await walk(client, user, "/contacts/search", q="Ali") == []
    assert await walk(client, user, "/contacts/search", q="4155550004") == []


async def test_lookup_finds_the_live_contact_in_any_spelling(
    client: httpx.AsyncClient, user: Account
) -> None:
    created = (await post(client, user, contact("Carla", "(415) 555-0150"))).json()["contact"]
    for spelling in ("+14155550150", "415.555.0150", "+1 (415) 555-0150"):
        r = await client.get("/contacts/lookup", params={"phone": spelling}, headers=user.headers)
        assert r.status_code == 200 and r.json() == created, spelling
    r = await client.get("/contacts/lookup", params={"phone": "4155550151"}, headers=user.headers)
    assert_problem(r, 404, "not_found")
    for impossible in ("12345", "555-0150"):  # the second lacks its area code
        r = await client.get("/contacts/lookup", params={"phone": impossible}, headers=user.headers)
        assert_problem(r, 422, "validation_error")
    await client.delete(f"/contacts/{created['id']}", headers=user.headers)
    r = await client.get("/contacts/lookup", params={"phone": "4155550150"}, headers=user.headers)
    assert_problem(r, 404, "not_found")


async def test_every_member_reads_every_contact_by_id_and_by_number(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    """Contract: every signed-in user reads all (not only the contacts they own)."""
    created = (await post(client, user, contact("Carla", "(415) 555-0150"))).json()["contact"]
    colleague = await make_user(name="Colleague")
    r = await client.get(f"/contacts/{created['id']}", headers=colleague.headers)
    assert r.status_code == 200 and r.json() == created
    r = await client.get(
        "/contacts/lookup", params={"phone": "+14155550150"}, headers=colleague.headers
    )
    assert r.status_code == 200 and r.json() == created
    assert await walk(client, colleague, "/contacts") == [created]
    assert await walk(client, colleague, "/contacts/search", q="Carl") == [created]


async def test_get_answers_the_contact_with_an_etag_and_404_for_deleted_unknown_malformed(
    client: httpx.AsyncClient, user: Account
) -> None:
    created = (await post(client, user, contact())).json()["contact"]
    r = await client.get(f"/contacts/{created['id']}", headers=user.headers)
    assert r.status_code == 200 and r.json() == created
    assert r.headers["etag"].startswith('"') and r.headers["etag"].endswith('"')
    assert_problem(
        await client.get("/contacts/7d1c4a52-8f7e-4b0a-9a43-1f0f4b7f2d11", headers=user.headers),
        404,
        "not_found",
    )
    assert_problem(await client.get("/contacts/not-a-uuid", headers=user.headers), 404, "not_found")
    await client.delete(f"/contacts/{created['id']}", headers=user.headers)
    r = await client.get(f"/contacts/{created['id']}", headers=user.headers)
    assert_problem(r, 404, "not_found")


async def test_if_none_match_with_the_current_etag_is_304_with_no_body(
    client: httpx.AsyncClient, user: Account
) -> None:
    created = (await post(client, user, contact())).json()["contact"]
    path = f"/contacts/{created['id']}"
    tag = (await client.get(path, headers=user.headers)).headers["etag"]
    for current in (tag, f"W/{tag}", f'"0", {tag}', "*"):
        r = await client.get(path, headers={**user.headers, "If-None-Match": current})
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", tag), current
    for stale in ('"0"', "junk", '""'):
        r = await client.get(path, headers={**user.headers, "If-None-Match": stale})
        assert r.status_code == 200 and r.json() == created, stale
    await client.put(path, json={"name": "Renamed"}, headers=user.headers)
    r = await client.get(path, headers={**user.headers, "If-None-Match": tag})
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    assert r.headers["etag"] != tag
    await client.delete(path, headers=user.headers)
    r = await client.get(path, headers={**user.headers, "If-None-Match": "*"})
    assert_problem(r, 404, "not_found")


async def test_a_304_says_what_its_answer_varies_by_as_the_200_does(
    client: httpx.AsyncClient, user: Account
) -> None:
    # A contact whose JSON passes 1 KiB is gzipped for a client that asks, with Vary:
    # Accept-Encoding; the 304 that confirms a cached copy of it must carry that Vary too.
    created = (await post(client, user, contact(name="😀" * 200))).json()["contact"]
    path = f"/contacts/{created['id']}"
    asks = {**user.headers, "Accept-Encoding": "gzip"}
    full = await client.get(path, headers=asks)
    assert (full.headers["content-encoding"], full.headers["vary"]) == ("gzip", "Accept-Encoding")
    r = await client.get(path, headers={**asks, "If-None-Match": full.headers["etag"]})
    assert (r.status_code, r.headers["vary"]) == (304, "Accept-Encoding")


async def test_contacts_need_a_token(client: httpx.AsyncClient) -> None:
    for path in ("/contacts", "/contacts/search?q=a", "/contacts/changes"):
        assert_problem(await client.get(path), 401, "unauthenticated")


class Recorder:
    """A connection that remembers the statements it ran."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.statements.append((sql, args))
        return await self.conn.fetch(sql, *args)


async def test_name_search_uses_the_trigram_index_at_100k_contacts(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized)
           SELECT 'Contact ' || i, '+1' || (2000000000 + i), '+1' || (2000000000 + i)
           FROM generate_series(1, 100000) i"""
    )
    await add(conn, ("Alice Moreira", "+14155550001"), ("Natalia", "+14155550002"))
    await conn.execute("ANALYZE contacts")
    for q in ("ali", "ice mo"):
        recorder = Recorder(conn)
        page = PageRequest(limit=50, page=None, cursor=None, key=b"k" * 32)
        answer = await contact_search(recorder, page, q=q)  # type: ignore[arg-type]
        assert b"Alice Moreira" in answer
        sql, args = recorder.statements[0]
        plan = [r[0] for r in await conn.fetch("EXPLAIN (VERBOSE) " + sql, *args)]
        assert "ix_contacts_name_trgm" in "\n".join(plan), plan
        # The scan that matches names yields keys to sort, not the items' values: only
        # the page's rows get theirs computed (to_char is api_time's body).
        nodes = "\n".join(plan).split("->")
        matching = [node for node in nodes if "~~* '%" in node and "Scan" in node]
        assert matching, plan
        for node in matching:
            assert "phone_raw" not in node and "to_char" not in node, node


async def test_a_bulk_upload_leaves_a_short_gin_pending_list(conn: asyncpg.Connection) -> None:
    """Every search reads the trigram indexes' whole pending list; migration 0005 caps it at
    256 kB, where PostgreSQL's default lets 7,500 new contacts pile up ~236 pages of it."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized)
           SELECT 'Name ' || md5(i::text), '+1' || (3000000000 + i), '+1' || (3000000000 + i)
           FROM generate_series(1, 7500) i"""
    )
    for index in ("ix_contacts_name_trgm", "ix_contacts_phone_trgm"):
        pending = await conn.fetchval("SELECT pending_pages FROM pgstatginindex($1)", index)
        assert pending <= 256 // 8 + 1, (index, pending)
    await add(conn, ("Zebediah Quartermaine", "+14155550003"))
    page = PageRequest(limit=50, page=None, cursor=None, key=b"k" * 32)
    assert b"Zebediah" in await contact_search(conn, page, q="ebedi")


async def test_search_for_a_backslash_matches_it_literally(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    await add(conn, ("C:\\Users", "+14155550001"), ("50%", "+14155550002"))
    items = await walk(client, user, "/contacts/search", q="\\")
    assert [c["name"] for c in items] == ["C:\\Users"]


async def test_lookup_phone_over_200_characters_is_422(
    client: httpx.AsyncClient, user: Account
) -> None:
    await post(client, user, contact("Carla", "(415) 555-0150"))
    padded = "(415) 555-0150" + " " * 187  # 201 characters, still one number
    r = await client.get("/contacts/lookup", params={"phone": padded}, headers=user.headers)
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["loc"] == ["query", "phone"]


async def test_lookup_and_search_without_their_query_are_422(
    client: httpx.AsyncClient, user: Account
) -> None:
    for path, params in (
        ("/contacts/lookup", {}),
        ("/contacts/lookup", {"phone": ""}),
        ("/contacts/lookup", {"phone": "abc"}),
        ("/contacts/search", {}),
    ):
        r = await client.get(path, params=params, headers=user.headers)
        body = assert_problem(r, 422, "validation_error")
        assert body["errors"][0]["loc"][0] == "query", body
