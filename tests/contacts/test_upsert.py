"""Contract: Contacts, POST /contacts (the older-wins rule) and Phone numbers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from crmsync.contacts import upsert
from tests.conftest import Account, MakeUser, assert_problem, make_app

T0 = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)


def at(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def contact(name: str = "Bruno", phone: str = "(415) 555-0123", **fields: Any) -> dict[str, Any]:
    return {"name": name, "phone_raw": phone, **fields}


async def post(client: httpx.AsyncClient, account: Account, body: Any) -> httpx.Response:
    return await client.post("/contacts", json=body, headers=account.headers)


async def test_new_number_is_created_with_201_and_server_normalized_phone(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    r = await post(client, user, contact(created_at=at(0), phone_normalized="+19999999999"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["result"] == "created"
    c = body["contact"]
    assert set(c) == {
        "id",
        "name",
        "phone_raw",
        "phone_normalized",
        "created_by",
        "created_at",
        "updated_at",
        "deleted",
        "etag",
    }
    assert c["phone_normalized"] == "+14155550123"  # the hint is not trusted over phone_raw
    assert (c["name"], c["phone_raw"], c["created_by"], c["deleted"]) == (
        "Bruno",
        "(415) 555-0123",
        user.id,
        False,
    )
    assert c["created_at"] == "2026-10-01T08:00:00.000000Z"
    row = await conn.fetchrow("SELECT * FROM contacts")
    assert str(row["id"]) == c["id"] and row["phone_normalized"] == "+14155550123"


async def test_two_spellings_of_one_number_are_one_contact(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    first = await post(client, user, contact(phone="(415) 555-0123", created_at=at(0)))
    second = await post(client, user, contact(phone="+1 415-555-0123", created_at=at(5)))
    assert second.status_code == 200
    assert second.json()["result"] == "existing"
    assert second.json()["contact"]["id"] == first.json()["contact"]["id"]
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 1


async def test_strictly_older_created_at_replaces_and_keeps_the_id(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    first = (await post(client, user, contact("Bruno", created_at=at(10)))).json()["contact"]
    other = await make_user(name="Other")
    r = await post(client, other, contact("Bruno C.", "+1 415-555-0123", created_at=at(0)))
    assert r.status_code == 200
    body = r.json()
    assert body["result"] == "replaced"
    c = body["contact"]
    assert c["id"] == first["id"]
    assert (c["name"], c["phone_raw"], c["created_by"], c["created_at"]) == (
        "Bruno C.",
        "+1 415-555-0123",
        other.id,
        "2026-10-01T08:00:00.000000Z",
    )


async def test_created_at_keeps_its_microseconds_in_the_comparison_and_the_answer(
    client: httpx.AsyncClient, user: Account
) -> None:
    """Contract: answers in UTC, microsecond precision kept; strictly older replaces."""
    first = await post(client, user, contact("Bruno", created_at="2026-10-01T08:00:00.500001Z"))
    assert first.json()["contact"]["created_at"] == "2026-10-01T08:00:00.500001Z"
    r = await post(client, user, contact("Bruno C.", created_at="2026-10-01T10:00:00.4+02:00"))
    assert r.json()["result"] == "replaced"
    assert r.json()["contact"]["created_at"] == "2026-10-01T08:00:00.400000Z"
    r = await post(client, user, contact("Bruno D.", created_at="2026-10-01T08:00:00.400001Z"))
    assert r.json()["result"] == "existing"  # a microsecond newer
    # Nanoseconds (Instant.toString() writes them) are cut to the microsecond, not rounded.
    r = await post(client, user, contact("Bruno E.", created_at="2026-10-01T08:00:00.3999999Z"))
    assert r.json()["contact"]["created_at"] == "2026-10-01T08:00:00.399999Z"


async def test_equal_newer_or_missing_created_at_answers_the_server_version(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser
) -> None:
    stored = (await post(client, user, contact("Bruno", created_at=at(10)))).json()["contact"]
    other = await make_user()
    for created_at in (at(10), at(11), None):
        body = contact("Someone else", created_at=created_at)
        r = await post(client, other, body)
        assert r.status_code == 200, r.text
        assert r.json() == {"result": "existing", "contact": stored}


async def test_contact_without_created_at_is_stored_with_the_server_time(
    client: httpx.AsyncClient, user: Account
) -> None:
    before = datetime.now(UTC)
    c = (await post(client, user, contact())).json()["contact"]
    created = datetime.fromisoformat(c["created_at"])
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC)


async def test_number_of_a_deleted_contact_revives_the_same_row_as_created(
    client: httpx.AsyncClient, user: Account, make_user: MakeUser, conn: asyncpg.Connection
) -> None:
    first = (await post(client, user, contact("Old", created_at=at(0)))).json()["contact"]
    assert (
        await client.delete(f"/contacts/{first['id']}", headers=user.headers)
    ).status_code == 204
    other = await make_user()
    r = await post(client, other, contact("New", created_at=at(30)))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["result"] == "created"
    assert body["contact"]["id"] == first["id"]
    assert (body["contact"]["name"], body["contact"]["created_by"]) == ("New", other.id)
    assert body["contact"]["deleted"] is False
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 1


async def test_creating_a_contact_links_its_numbers_earlier_unlinked_calls(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    calls = [
        {"direction": "incoming", "duration_seconds": 5, "timestamp": at(i), "phone_raw": phone}
        for i, phone in enumerate(["(415) 555-0123", "+14155550123", "(415) 555-0199"])
    ]
    assert (await client.post("/calls", json=calls, headers=user.headers)).status_code == 200
    c = (await post(client, user, contact())).json()["contact"]
    rows = await conn.fetch("SELECT phone_normalized, contact_id::text FROM call_logs")
    linked = {(r["phone_normalized"], r["contact_id"]) for r in rows}
    assert linked == {("+14155550123", c["id"]), ("+14155550199", None)}


async def test_reviving_a_contact_links_calls_stored_while_it_was_deleted(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    c = (await post(client, user, contact())).json()["contact"]
    await client.delete(f"/contacts/{c['id']}", headers=user.headers)
    call = {
        "direction": "missed",
        "duration_seconds": 0,
        "timestamp": at(1),
        "phone_raw": "4155550123",
    }
    await client.post("/calls", json=[call], headers=user.headers)
    assert await conn.fetchval("SELECT contact_id FROM call_logs") is None
    await post(client, user, contact())
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == c["id"]


async def test_fifty_concurrent_creates_of_one_number_leave_one_contact_with_the_oldest_time(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    offsets = list(range(50))
    offsets.reverse()  # the oldest is sent last
    answers = await asyncio.gather(
        *(post(client, user, contact(f"Name {m}", created_at=at(m))) for m in offsets)
    )
    assert all(r.status_code in (200, 201) for r in answers), [r.text for r in answers]
    assert sum(r.status_code == 201 for r in answers) == 1
    assert len({r.json()["contact"]["id"] for r in answers}) == 1
    rows = await conn.fetch("SELECT name, created_at, deleted FROM contacts")
    assert len(rows) == 1
    assert (rows[0]["name"], rows[0]["created_at"], rows[0]["deleted"]) == ("Name 0", T0, False)


async def test_impossible_number_is_422_and_nothing_is_written(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # 555-0150 is dialable only inside its area: as +15550150 it would be no E.164 number,
    # and one contact for every area's 555-0150.
    for phone in ("abc", "12345", "", "555-0150", "5550150", "+1 555 0150"):
        r = await post(client, user, contact(phone=phone))
        body = assert_problem(r, 422, "validation_error")
        assert body["errors"][0]["loc"] == ["body", "phone_raw"], body
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0


async def test_phone_hint_does_not_make_a_number_of_what_phone_raw_is_not(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    for raw in ("call me", "abc", "12345"):
        r = await post(client, user, contact(phone=raw, phone_normalized="+1 415 555 0177"))
        body = assert_problem(r, 422, "validation_error")
        assert body["errors"][0]["loc"] == ["body", "phone_raw"], body
    r = await client.post(
        "/contacts/batch",
        json=[contact(phone="abc", phone_normalized="+14155550177")],
        headers=user.headers,
    )
    assert r.json()["results"][0]["result"] == "rejected", r.text
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("abc", "no number in it"),
        ("*123#", "no number in it"),
        ("911", "too few digits"),
        ("12345", "too few digits"),
        ("555-0150", "dialable only locally, add its area code"),
        ("+999 123456", "unknown country code"),
        ("+1 415 555 01234567", "too many digits"),
        (
            "001 212 208 0059",
            "written for calling out of another country, give it with its +country code",
        ),
    ],
)
async def test_a_number_that_is_none_says_why(
    client: httpx.AsyncClient, user: Account, raw: str, why: str
) -> None:
    """The msg a phone can show its user (one for every number, until a walkthrough found
    "a local one needs its area code" answered for "abc" and "911" alike), at each place a
    number is read: a create, a batch item, an edit, a caller-ID lookup."""
    msg = "Not a possible phone number: " + why
    r = await post(client, user, contact(phone=raw))
    assert assert_problem(r, 422, "validation_error")["errors"][0]["msg"] == msg
    r = await client.post("/contacts/batch", json=[contact(phone=raw)], headers=user.headers)
    assert r.json()["results"][0]["errors"][0]["msg"] == msg
    r = await post(client, user, contact(phone="+1 415 555 0123"))
    path = f"/contacts/{r.json()['contact']['id']}"
    r = await client.put(path, json={"phone_raw": raw}, headers=user.headers)
    assert assert_problem(r, 422, "validation_error")["errors"][0]["msg"] == msg
    r = await client.get("/contacts/lookup", params={"phone": raw}, headers=user.headers)
    assert assert_problem(r, 422, "validation_error")["errors"][0]["msg"] == msg


@pytest.mark.parametrize(
    ("phone", "why"),
    [
        ("   ", "empty"),
        ("+1" + " " * 53 + "4155550123", "longer than 64 characters"),
        ("+1" + " " * 53 + "415555012", "too few digits"),  # 64: its digits decide
    ],
)
async def test_a_caller_id_lookup_of_a_blank_or_overlong_spelling_says_why(
    client: httpx.AsyncClient, user: Account, phone: str, why: str
) -> None:
    # A lookup takes up to 200 characters (a create or an edit, 64): past 64 the spelling
    # is no number, and the msg says so, not what its digits would be.
    r = await client.get("/contacts/lookup", params={"phone": phone}, headers=user.headers)
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["msg"] == "Not a possible phone number: " + why
    assert (body["errors"][0]["loc"], body["errors"][0]["type"]) == (["query", "phone"], "phone")


async def test_a_lookup_with_its_plus_sent_unencoded_says_how_to_send_it(
    client: httpx.AsyncClient, user: Account
) -> None:
    """`?phone=+442079460958` written into a URL by hand: the '+' arrives as a space."""
    url = "/contacts/lookup?phone=+442079460958"
    body = assert_problem(await client.get(url, headers=user.headers), 422, "validation_error")
    assert body["errors"][0]["msg"].endswith("a '+' in a URL reads as a space: send it as %2B")
    r = await client.get("/contacts/lookup?phone=%2B442079460958", headers=user.headers)
    assert_problem(r, 404, "not_found")  # read, and no contact has it
    r = await client.get("/contacts/lookup?phone=12345", headers=user.headers)
    assert "%2B" not in r.json()["errors"][0]["msg"]  # nothing was lost there


async def test_a_blank_phone_raw_without_a_hint_says_the_number_is_empty(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    msg = "Not a possible phone number: empty"
    r = await post(client, user, contact(phone=" \t"))
    assert assert_problem(r, 422, "validation_error")["errors"][0]["msg"] == msg
    r = await client.post("/contacts/batch", json=[contact(phone=" ")], headers=user.headers)
    assert r.json()["results"][0]["errors"][0]["msg"] == msg, r.text
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0


async def test_a_number_dialled_from_abroad_is_read_with_its_hint_up_to_64_characters(
    client: httpx.AsyncClient, user: Account
) -> None:
    raw = "001" + " " * 49 + "212 208 0057"
    assert len(raw) == 64
    r = await post(client, user, contact(phone=raw, phone_normalized="+12122080057"))
    assert r.status_code == 201, r.text
    assert r.json()["contact"]["phone_normalized"] == "+12122080057"


async def test_a_blank_phone_raw_leaves_the_number_and_the_spelling_to_the_hint(
    client: httpx.AsyncClient, user: Account
) -> None:
    r = await post(client, user, contact(phone=" ", phone_normalized="+1 415 555 0123"))
    assert r.status_code == 201, r.text
    got = r.json()["contact"]
    assert (got["phone_raw"], got["phone_normalized"]) == ("+1 415 555 0123", "+14155550123")
    r = await post(client, user, contact(phone="", phone_normalized=None))
    assert_problem(r, 422, "validation_error")


async def test_numbers_without_a_country_code_are_read_in_the_default_region(
    database_url: str, user: Account
) -> None:
    """CRMSYNC_DEFAULT_REGION=GB: a national spelling is a UK number, and a US one needs
    its +1."""
    app = make_app(database_url, default_region="GB")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as gb:
            r = await post(gb, user, contact(name="Lena", phone="020 7946 0958"))
            assert r.json()["contact"]["phone_normalized"] == "+442079460958", r.text
            r = await post(gb, user, contact(name="Bruno", phone="+1 (415) 555-0123"))
            assert r.json()["contact"]["phone_normalized"] == "+14155550123", r.text
            r = await gb.get(
                "/contacts/lookup", params={"phone": "02079460958"}, headers=user.headers
            )
            assert r.json()["name"] == "Lena", r.text
            r = await post(gb, user, contact(name="Nine", phone="(415) 555-0199"))  # no +1
            assert r.json()["contact"]["phone_normalized"] == "+444155550199", r.text


async def test_phone_hint_reads_a_national_spelling_in_the_hints_country(
    client: httpx.AsyncClient, user: Account
) -> None:
    london = contact(name="Lena", phone="020 7946 0958", phone_normalized="+442079460958")
    r = await post(client, user, london)
    assert r.status_code == 201, r.text
    assert r.json()["contact"]["phone_normalized"] == "+442079460958"
    # A hint that is another number than phone_raw in its own country is ignored.
    r = await post(client, user, contact(phone="(415) 555-0123", phone_normalized="+442079460958"))
    assert r.json()["contact"]["phone_normalized"] == "+14155550123", r.text


async def test_phone_hint_reads_a_number_dialled_out_of_another_country(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    """A phone in Europe keeps a US number as "001 ...": the US server (whose own prefix is
    011) cannot read that alone, but it is the hint's digits behind a country's dialling-out
    prefix. Found by a mobile developer's walkthrough: the item was rejected."""
    abroad = [
        ("001 212 208 0059", "+12122080059"),  # "00": most of the world
        ("0011 44 20 7946 0958", "+442079460958"),  # Australia
        ("810 49 30 1234 5678", "+493012345678"),  # Russia
        # Arabic-Indic digits, which phonenumbers reads as everywhere else
        (
            "\u0660\u0660\u0661 \u0662\u0661\u0662 \u0662\u0660\u0668 \u0660\u0660\u0665\u0668",
            "+12122080058",
        ),
    ]
    for raw, hint in abroad:
        r = await post(client, user, contact(name=raw, phone=raw, phone_normalized=hint))
        assert r.status_code == 201, r.text
        assert r.json()["contact"]["phone_normalized"] == hint, r.text
        assert r.json()["contact"]["phone_raw"] == raw
    # No such number without the hint, or with one whose digits are not the ones dialled,
    # or behind a single "0" (a trunk prefix, no way of dialling out of a country), or one
    # no country has given out: "003" is a prefix too, but +49 1234 5678 is no number, and
    # the spelling is the Madrid number +34 912 345 678 dialled with "00".
    for raw, hint in (
        ("001 415 555 0191", None),
        ("001 415 555 0191", "+14155550192"),
        ("0 1 415 555 0191", "+14155550191"),
        ("call 001 415 555 0191", "+14155550191"),
        ("0034 912 345 678", "+4912345678"),
        ("0091 22 1234 5678", "+12212345678"),
    ):
        r = await post(client, user, contact(phone=raw, phone_normalized=hint))
        assert_problem(r, 422, "validation_error")
    assert await conn.fetchval("SELECT count(*) FROM contacts") == len(abroad)


async def test_bad_names_and_times_are_422_and_nothing_is_written(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    future = (datetime.now(UTC) + timedelta(minutes=6)).isoformat()
    bad = [
        (contact(name=""), "name"),
        (contact(name="   "), "name"),
        # Nothing that shows: zero-width space, direction marks, a byte order mark, a line
        # separator, a Hangul filler.
        (contact(name="\u200b"), "name"),
        (contact(name=" \u200e\u200f "), "name"),
        (contact(name="\ufeff\u2028"), "name"),
        (contact(name="\u3164\u3164"), "name"),
        (contact(name="x" * 201), "name"),
        (contact(name="a\x00b"), "name"),
        (contact(created_at=future), "created_at"),
        (contact(created_at="2026-10-01T08:00:00"), "created_at"),  # no offset
        (contact(created_at="2026-02-30T08:00:00Z"), "created_at"),  # no such day
        (contact(created_at="0001-01-01T00:00:00+01:00"), "created_at"),  # year 0 in UTC
        (contact(phone="1" * 65), "phone_raw"),
        # Read as a number by libphonenumber, but PostgreSQL text cannot hold a NUL.
        (contact(phone="(415) 555-0123\x00"), "phone_raw"),
        ({"name": "Bruno"}, "phone_raw"),
        (contact(created_at=0), "created_at"),  # not 1970: it would win every older-wins
        (contact(created_at=1762264800), "created_at"),
        (contact(name=123), "name"),
        (contact(phone=4155550123), "phone_raw"),
        (contact(phone=None), "phone_raw"),
    ]
    for body, field in bad:
        r = await post(client, user, body)
        problem = assert_problem(r, 422, "validation_error")
        assert problem["errors"][0]["loc"][:2] == ["body", field], (body, problem)
    assert await conn.fetchval("SELECT count(*) FROM contacts") == 0


async def test_created_at_with_an_offset_beyond_16_hours_is_stored_as_its_instant(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    # RFC 3339 allows offsets up to +-23:59; PostgreSQL's text input stops at +-15:59.
    r = await post(client, user, contact(created_at="2026-10-02T07:59:00+23:59"))
    assert r.status_code == 201, r.text
    assert r.json()["contact"]["created_at"] == "2026-10-01T08:00:00.000000Z"
    assert await conn.fetchval("SELECT created_at FROM contacts") == T0


async def test_created_at_up_to_five_minutes_ahead_and_200_char_names_are_accepted(
    client: httpx.AsyncClient, user: Account
) -> None:
    soon = (datetime.now(UTC) + timedelta(minutes=4)).isoformat()
    r = await post(client, user, contact(name="x" * 200, created_at=soon))
    assert r.status_code == 201, r.text


async def test_names_are_stored_trimmed_and_counted_without_the_spaces_around_them(
    client: httpx.AsyncClient, user: Account
) -> None:
    """docs/mobile.md: a name is "stored trimmed", and its 1..200 are counted once trimmed,
    in POST /contacts and in a batch alike."""
    r = await post(client, user, contact(name="  Bruno Costa \t", phone="(415) 555-0123"))
    assert (r.status_code, r.json()["contact"]["name"]) == (201, "Bruno Costa"), r.text
    r = await post(client, user, contact(name=" " + "x" * 200 + " ", phone="(415) 555-0124"))
    assert (r.status_code, r.json()["contact"]["name"]) == (201, "x" * 200), r.text
    batch = [contact(name="\u00a0Carla Dias  ", phone="(415) 555-0125")]
    r = await client.post("/contacts/batch", json=batch, headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["contact"]["name"] == "Carla Dias"


async def test_malformed_json_is_400(client: httpx.AsyncClient, user: Account) -> None:
    r = await client.post(
        "/contacts",
        content=b'{"name": ',
        headers={**user.headers, "Content-Type": "application/json"},
    )
    assert_problem(r, 400, "bad_request")


async def test_reviving_a_deleted_contact_takes_the_incoming_created_at_and_phone_raw(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    old = (await post(client, user, contact("Old", "(415) 555-0123", created_at=at(0)))).json()
    await client.delete(f"/contacts/{old['contact']['id']}", headers=user.headers)
    r = await post(client, user, contact("New", "+1 415-555-0123", created_at=at(30)))
    assert r.status_code == 201, r.text
    c = r.json()["contact"]
    assert (c["id"], c["phone_raw"], c["created_at"]) == (
        old["contact"]["id"],
        "+1 415-555-0123",
        "2026-10-01T08:30:00.000000Z",
    )
    row = await conn.fetchrow("SELECT phone_raw, created_at FROM contacts")
    assert (row["phone_raw"], row["created_at"]) == ("+1 415-555-0123", T0 + timedelta(minutes=30))


async def test_creating_a_contact_leaves_calls_already_linked_to_another_contact_alone(
    client: httpx.AsyncClient, user: Account, conn: asyncpg.Connection
) -> None:
    office = (await post(client, user, contact("Office", "(415) 555-0150"))).json()["contact"]
    call = {
        "direction": "outgoing",
        "duration_seconds": 9,
        "timestamp": at(0),
        "phone_raw": "(415) 555-0123",
        "contact_id": office["id"],
    }
    r = await client.post("/calls", json=[call], headers=user.headers)
    assert r.json()["inserted"] == 1, r.text
    assert (await post(client, user, contact("Bruno", "(415) 555-0123"))).status_code == 201
    assert str(await conn.fetchval("SELECT contact_id FROM call_logs")) == office["id"]


async def test_an_upsert_finds_each_number_by_index_not_by_scanning_contacts(
    conn: asyncpg.Connection, user: Account
) -> None:
    """Both statements of the older-wins rule look each number up in
    uq_contacts_phone_normalized: a plain join let the planner hash all of contacts for a
    batch it guesses at 100 rows, a sequential scan on every POST /contacts (1.4 ms of
    PostgreSQL per request at 20,000 contacts, and growing with the table)."""
    await conn.execute(
        """INSERT INTO contacts (name, phone_raw, phone_normalized)
           SELECT 'c' || g, '+1415' || lpad(g::text, 7, '0'), '+1415' || lpad(g::text, 7, '0')
           FROM generate_series(1, 20000) g"""
    )
    await conn.execute("ANALYZE contacts")
    for phone in ("+14150000007", "+16505550100"):  # a stored number, a new one
        row = upsert._row(0, name="N", raw=phone, hint=None, created_at=None, region="US")
        rows_json = orjson.dumps([row]).decode()
        async with conn.transaction():
            plan = await conn.fetch("EXPLAIN " + upsert.UPSERT_SQL, rows_json, user.id, True)
            created = await conn.fetchval(upsert.UPSERT_SQL, rows_json, user.id, False)
            args = (rows_json, user.id, created, "[]", False)
            plan += await conn.fetch("EXPLAIN " + upsert.RESULTS_SQL, *args)
            text = "\n".join(r[0] for r in plan)
            assert "Seq Scan on contacts" not in text, (phone, text)
            assert "uq_contacts_phone_normalized on contacts" in text, (phone, text)


async def test_a_created_or_revived_contact_is_answered_as_it_is_stored(
    client: httpx.AsyncClient, user: Account
) -> None:
    """POST /contacts answers a contact it created (or revived) from the INSERT's own
    RETURNING: the same object GET reads afterwards, `etag` and times included."""
    first = (await post(client, user, contact("Old"))).json()["contact"]
    assert (
        await client.delete(f"/contacts/{first['id']}", headers=user.headers)
    ).status_code == 204
    for body in (contact("Revived"), contact("New", "+14155550177")):
        r = await post(client, user, body)
        assert (r.status_code, r.json()["result"]) == (201, "created"), r.text
        answered = r.json()["contact"]
        read = await client.get(f"/contacts/{answered['id']}", headers=user.headers)
        assert read.json() == answered
        assert read.headers["etag"] == answered["etag"]
