"""One way to page every list: page mode (OFFSET, exact total) or keyset cursor mode.

A listing is SQL the caller writes: FROM/WHERE, the sort keys (ending in a unique one),
and the Shape of one row: its JSON keys and the SQL of each value.

Lists get their JSON from orjson, not PostgreSQL: json_build_object costs PostgreSQL
~2 us a row (0.43 ms of a 200-row page) and plain columns arrive in Python no slower than
JSON text does (measured in bench/NOTES.md). Single rows still use Shape.object_sql, compact
like orjson's, so a listed item and the same row alone are the same bytes.

Cursors are the sort-key values of the last row, bound to the listing's scope (endpoint
and filters) and signed, so a client can neither forge nor mix them up: anything else
is a 400 `bad_request`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeAlias, TypeVar

import asyncpg
import orjson
from pydantic import BaseModel, Field

from crmsync.errors import BadRequest

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
MAX_PAGE = 1_000_000_000  # keeps (page - 1) * limit, the OFFSET, a bigint


@dataclass(frozen=True)
class SortKey:
    expr: str  # SQL expression, e.g. "c.name"
    pg_type: str  # how the cursor's text value is cast back, e.g. "text", "uuid"
    # The shape's field that shows this key exactly (its text casts back to pg_type to the
    # same value), e.g. "id" for c.id shown as c.id::text: the cursor takes the last row's
    # value from there. Otherwise the key is selected as a column of its own.
    field: str | None = None


def json_object_sql(fields: Iterable[tuple[str, str]]) -> str:
    """SQL of one JSON object from (key, SQL expression) pairs, as compact as orjson's:
    row_to_json of a one-row subquery (json_build_object puts spaces around every colon
    and comma, and costs PostgreSQL ~20% more)."""
    columns = ", ".join(f'{expr} AS "{key}"' for key, expr in fields)
    return f"(SELECT row_to_json(obj) FROM (SELECT {columns}) obj)"


@dataclass(frozen=True)
class Shape:
    """The JSON object of one row: (key, SQL expression) pairs, each expression already the
    value the API shows (uuids as text, times through api_time). Keys in `nested` hold JSON
    text (a jsonb column) that is embedded as is."""

    fields: tuple[tuple[str, str], ...]
    nested: frozenset[str] = frozenset()

    @property
    def object_sql(self) -> str:
        """The row's JSON object: for statements that return single rows."""
        return json_object_sql(self.fields)

    @property
    def columns_sql(self) -> str:
        """The row's values as the first columns of a select list; `dumps` reads them."""
        return ", ".join(f'{expr} AS "{key}"' for key, expr in self.fields)

    def dumps(self, rows: Sequence[asyncpg.Record]) -> bytes:
        """The JSON array of rows selected with columns_sql first (later columns ignored)."""
        keys = [key for key, _ in self.fields]
        objects = [dict(zip(keys, row, strict=False)) for row in rows]
        for key in self.nested:
            for obj in objects:
                if obj[key] is not None:
                    obj[key] = orjson.Fragment(obj[key])
        return orjson.dumps(objects)


Item = TypeVar("Item", bound=BaseModel)


class PageOut(BaseModel, Generic[Item]):
    """The answer of every list, as paginate writes it; for the OpenAPI document (each list
    names it with its item, e.g. `class CallPage(PageOut[CallOut])`)."""

    items: list[Item]
    page: int | None = Field(description="The page asked for; null in cursor mode")
    limit: int
    total: int | None = Field(description="Exact number of matching rows; null in cursor mode")
    next_cursor: str | None = Field(
        description="Set whenever more rows follow, in both modes; null on the last page"
    )


@dataclass(frozen=True)
class PageRequest:
    limit: int
    page: int | None
    cursor: str | None
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Listing:
    scope: str  # endpoint and filters; a cursor made for another scope is refused
    from_sql: str  # "FROM contacts c LEFT JOIN ..."
    shape: Shape  # the JSON of one row
    keys: Sequence[SortKey]
    where: Sequence[str] = ()
    params: Sequence[object] = ()  # referenced from `where` as $1, $2, ...
    descending: bool = False
    # SQL of the exact total when something cheaper than count(*) knows it (kept_total).
    # It must count exactly the rows of from_sql/where, in the statement's snapshot: page
    # mode also uses it to walk to a page in the second half from the far end. It takes
    # the listing's params, every one of them.
    total_sql: str | None = None
    # True when no index yields the rows in key order (a search): all matches are found,
    # then sorted. PostgreSQL computes the select list before a sort, so the page's rows
    # are picked by key first and their JSON built alone, not the JSON of every match.
    sorted_after_match: bool = False
    # The columns of a unique index that finds one row, in its order: page mode and
    # sorted_after_match pick the page's rows by them first. By default the last sort key
    # (an id with its own primary key); calls name their primary key, ("timestamp", id).
    row_key: Sequence[str] = ()
    # from_sql without the joins that only add shown values (calls: "FROM call_logs l"):
    # page mode counts and picks rows from it, so `where` may only name its tables.
    # PostgreSQL removes an unused LEFT JOIN from the plan but still reads the join's column
    # from every row, so neither a count nor a pick could be an index-only scan (4.8M calls:
    # page 9,000 150 -> 38 ms, one user's total 230 -> 45 ms).
    pick_from_sql: str | None = None

    @property
    def pick_from(self) -> str:
        """What page mode counts and picks rows from."""
        return self.pick_from_sql or self.from_sql


def kept_total(name: str, where: Sequence[str] = ()) -> str:
    """The total the row_counts triggers keep: live contacts or calls (migration 0002), the
    calls narrowed by `where` on row_counts' user_id and direction (migration 0011), sync
    records (on user_id: migration 0015)."""
    conditions = "".join(f" AND {condition}" for condition in where)
    return f"SELECT coalesce(sum(n), 0)::bigint FROM row_counts WHERE name = '{name}'{conditions}"


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:16]


def encode_cursor(key: bytes, scope: str, values: Sequence[str]) -> str:
    payload = orjson.dumps([hashlib.sha256(scope.encode()).hexdigest()[:16], list(values)])
    raw = _sign(key, payload) + payload
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# Longer than any cursor made here: refused before decoding (400, as every bad cursor, so
# that the app starts the listing over; a 422 would say its request was built wrong).
MAX_CURSOR_CHARS = 2000


def decode_cursor(key: bytes, scope: str, cursor: str, size: int | tuple[int, ...]) -> list[str]:
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadRequest("Invalid cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        signature, payload = raw[:16], raw[16:]
        if not hmac.compare_digest(signature, _sign(key, payload)):
            raise ValueError("signature")
        scope_hash, values = orjson.loads(payload)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadRequest("Invalid cursor") from None
    if scope_hash != hashlib.sha256(scope.encode()).hexdigest()[:16]:
        raise BadRequest("This cursor was made for another listing or other filters")
    if not isinstance(values, list) or len(values) not in (
        (size,) if isinstance(size, int) else size
    ):
        raise BadRequest("Invalid cursor")
    return [str(v) for v in values]


def _order_sql(listing: Listing, *, reverse: bool = False) -> str:
    direction = " DESC" if listing.descending != reverse else ""
    return ", ".join(f"{k.expr}{direction}" for k in listing.keys)


def _cursor_values(listing: Listing, row: asyncpg.Record) -> list[str]:
    """The sort keys of a row selected by paginate, as the cursor's text values."""
    fields = [key for key, _ in listing.shape.fields]
    own = iter(row[len(fields) : -1])  # the keys without a field, in order
    return [str(row[fields.index(k.field)] if k.field else next(own)) for k in listing.keys]


async def paginate(conn: Connection, listing: Listing, page: PageRequest) -> bytes:
    """The JSON answer `{items, page, limit, total, next_cursor}` for one page of a listing."""
    sql, args = _page_sql(listing, page)
    rows = await conn.fetch(sql, *args)
    total: int | None = None
    if page.page is not None:
        if rows:
            total = rows[0][-1]
        else:  # past the end: no row carried the count
            total = await conn.fetchval(_count_sql(listing), *listing.params)
    more = len(rows) > page.limit
    items = rows[: page.limit]
    next_cursor = (
        encode_cursor(page.key, listing.scope, _cursor_values(listing, items[-1])) if more else None
    )
    head = orjson.dumps(
        {"page": page.page, "limit": page.limit, "total": total, "next_cursor": next_cursor}
    )
    return b'{"items":' + listing.shape.dumps(items) + b"," + head[1:]


def _where_sql(where: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(where)}" if where else ""


def _count_sql(listing: Listing) -> str:
    """The exact number of the listing's rows: the kept total, else a count."""
    return listing.total_sql or f"SELECT count(*) {listing.pick_from} {_where_sql(listing.where)}"


def _page_sql(listing: Listing, page: PageRequest) -> tuple[str, list[object]]:
    """The statement of one page, limit + 1 rows (the last one says more follow), and its
    arguments. Each row: the shape's columns, the sort keys the shape does not show, and
    the exact total in page mode (run once, as an InitPlan; NULL in cursor mode)."""
    where = list(listing.where)
    args: list[object] = list(listing.params)
    if page.cursor is not None:
        values = decode_cursor(page.key, listing.scope, page.cursor, len(listing.keys))
        lhs = ", ".join(k.expr for k in listing.keys)
        placeholders = []
        for key, value in zip(listing.keys, values, strict=True):
            args.append(value)
            placeholders.append(f"${len(args)}::text::{key.pg_type}")
        op = "<" if listing.descending else ">"
        where.append(f"({lhs}) {op} ({', '.join(placeholders)})")
    # Only the last row's sort keys make the cursor: those the shape shows are read from
    # its fields; the others are selected in their own types, after the shape's columns
    # (PostgreSQL's text output of a timestamptz costs it more than its binary form costs
    # asyncpg, bench/NOTES.md). str() of either value casts back exactly.
    own_keys = [k.expr for k in listing.keys if k.field is None]
    total_column = f"({_count_sql(listing)})" if page.page is not None else "NULL::bigint"
    args.append(page.limit + 1)
    with_sql, where_sql = "", _where_sql(where)
    limit_sql = f"ORDER BY {_order_sql(listing)} LIMIT ${len(args)}"
    offset = (page.page - 1) * page.limit if page.page is not None else 0
    if offset or listing.sorted_after_match:
        with_sql, where_sql, total_column = _picked_first(
            listing, where_sql, args, offset, total_column
        )
        limit_sql = f"ORDER BY {_order_sql(listing)}"
    sql = (
        f"{with_sql}SELECT {', '.join([listing.shape.columns_sql, *own_keys, total_column])} "
        f"{listing.from_sql} {where_sql} {limit_sql}"
    )
    return sql, args


def _picked_first(
    listing: Listing, where_sql: str, args: list[object], offset: int, total_column: str
) -> tuple[str, str, str]:
    """A page whose rows are picked by their unique key first (from the index alone where
    it can), so that only the page's rows have their values computed: OFFSET would compute
    those of every row it skips, a sort those of every row it sorts. The statement's WITH,
    its WHERE, and its total column. `args` ends with the limit; the offset is added."""
    order_sql = _order_sql(listing)
    pick_from = listing.pick_from
    unique = ", ".join(listing.row_key or [listing.keys[-1].expr])
    lim = f"${len(args)}"
    pick_sql = f"SELECT {unique} {pick_from} {where_sql} ORDER BY {order_sql} LIMIT {lim}"
    with_sql = ""
    if offset:
        args.append(offset)
        off = f"${len(args)}::bigint"
        pick_sql += f" OFFSET {off}"
    if offset and listing.total_sql:
        # The kept total counts exactly the listing's rows, in the same snapshot: a page
        # in the second half is walked to from the far end, in reverse order, so no OFFSET
        # skips more than half the rows (PostgreSQL, generic plans: page 350 of 20,000
        # contacts 2.1-2.8 -> 0.6 ms, page 80,000 of 4.6M calls 0.82-0.96 s -> 0.10-0.12
        # s). The branch not taken has LIMIT 0 and reads nothing; a WHERE condition
        # instead would keep PostgreSQL from dropping the calls' unused LEFT JOIN of
        # contacts.
        with_sql = f"WITH t(n) AS MATERIALIZED ({listing.total_sql}) "
        total_column = "(SELECT n FROM t)"
        back = f"(SELECT n FROM t) - {off}"  # rows from the page's first to the end
        pick_sql = (
            f"(SELECT {unique} {pick_from} {where_sql} ORDER BY {order_sql} "
            f"LIMIT CASE WHEN {off} * 2 <= (SELECT n FROM t) THEN {lim} ELSE 0 END "
            f"OFFSET {off}) UNION ALL "
            f"(SELECT {unique} {pick_from} {where_sql} "
            f"ORDER BY {_order_sql(listing, reverse=True)} "
            f"LIMIT CASE WHEN {off} * 2 > (SELECT n FROM t) "
            f"THEN greatest(least({lim}, {back}), 0) ELSE 0 END "
            f"OFFSET greatest({back} - {lim}, 0))"
        )
    if listing.row_key:
        # Rows are found by several columns with a semi-join (an array holds one); the
        # constant LIMIT, which cuts nothing, caps the planner's estimate of the pick (a
        # tenth of the table for a parameter's), so the rows are looked up by index.
        picked = f"SELECT * FROM ({pick_sql}) picked LIMIT {MAX_LIMIT + 1}"
        return with_sql, f"WHERE ({unique}) IN ({picked})", total_column
    return with_sql, f"WHERE {unique} = ANY(ARRAY({pick_sql}))", total_column


def is_empty_page(answer: bytes) -> bool:
    """Whether a page paginate answered holds no item (its items come first)."""
    return answer.startswith(b'{"items":[]')
