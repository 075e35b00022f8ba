"""docs/mobile.md cannot drift: every documented request is replayed, in order, against the
real server, and each answer must have the documented status and shape (field names and
JSON types), and the documented values of the fields a client switches on (EXACT).
Documented ids and tokens stand for the real ones: once an answer is seen, the value the
doc shows at a place is mapped to the value the server gave there, and later requests
are rewritten with it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from crmsync.auth.service import hash_password

DOC = Path(__file__).parent.parent / "docs" / "mobile.md"
BLOCK = re.compile(r"```http\n(.*?)```", re.S)
DOC_ADMIN = ("admin@example.com", "admin-pass-123")


def _examples() -> list[tuple[str, str]]:
    """(request, response) text pairs, in the order the doc shows them."""
    blocks = BLOCK.findall(DOC.read_text())
    pairs = []
    for request, response in zip(blocks[::2], blocks[1::2], strict=True):
        assert not request.startswith("HTTP/"), f"a request block expected, got {request[:40]!r}"
        assert response.startswith("HTTP/1.1 "), f"a response block expected after {request[:60]!r}"
        pairs.append((request, response))
    return pairs


def _split(block: str) -> tuple[str, dict[str, str], str]:
    head, _, body = block.partition("\n\n")
    first, *header_lines = head.strip().splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines)
    return first, headers, body.strip()


# Fields whose documented value is the answer's, not an example of its type: what a client
# switches on (codes, results, kinds) and what an error says.
EXACT = {"code", "type", "title", "msg", "status", "result", "kind", "direction", "token_type"}


def _shape_errors(doc: Any, real: Any, where: str = "$") -> list[str]:
    if isinstance(doc, dict):
        if not isinstance(real, dict):
            return [f"{where}: object expected, got {real!r:.60}"]
        errors = []
        if set(doc) != set(real):
            errors.append(f"{where}: fields {sorted(doc)} documented, {sorted(real)} answered")
        for k in set(doc) & set(real):
            errors += _shape_errors(doc[k], real[k], f"{where}.{k}")
        return errors
    if isinstance(doc, list):
        if not isinstance(real, list):
            return [f"{where}: array expected"]
        errors = []
        for i, item in enumerate(real):
            if doc:
                errors += _shape_errors(doc[min(i, len(doc) - 1)], item, f"{where}[{i}]")
        return errors
    if doc is None or real is None:
        return []  # a nullable field; the doc's field tables say when
    if where.rpartition(".")[2] in EXACT and doc != real:
        return [f"{where}: {doc!r} documented, {real!r} answered"]
    kinds = {bool: "boolean", int: "number", float: "number", str: "string"}
    if kinds[type(doc)] != kinds[type(real)]:
        return [f"{where}: {kinds[type(doc)]} documented, {real!r:.40} answered"]
    return []


UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _learn(doc: Any, real: Any, aliases: dict[str, str], field: str = "") -> None:
    """Map every documented id, token and cursor to the real one at the same place."""
    if isinstance(doc, dict) and isinstance(real, dict):
        for k in set(doc) & set(real):
            _learn(doc[k], real[k], aliases, k)
    elif isinstance(doc, list) and isinstance(real, list):
        for d, r in zip(doc, real, strict=False):
            _learn(d, r, aliases, field)
    elif (
        isinstance(doc, str)
        and isinstance(real, str)
        and doc != real
        and (UUID.match(doc) or field in ("token", "etag") or "cursor" in field)
    ):
        aliases.setdefault(doc, real)


def _rewrite(text: str, aliases: dict[str, str]) -> str:
    for documented in sorted(aliases, key=len, reverse=True):
        text = text.replace(documented, aliases[documented])
    return text


async def test_every_documented_request_answers_as_documented(
    client: httpx.AsyncClient, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO users (name, email, password_hash, is_admin) VALUES ('Admin', $1, $2, true)",
            DOC_ADMIN[0],
            await hash_password(DOC_ADMIN[1], rounds=4),
        )
    finally:
        await conn.close()
    examples = _examples()
    assert len(examples) >= 20, "the doc should show every endpoint"
    aliases: dict[str, str] = {}
    failures = []
    for request, response in examples:
        request = _rewrite(request, aliases)
        first, headers, body = _split(request)
        method, target = first.split(" ")[:2]
        status_line, doc_headers, doc_body = _split(response)
        status = int(status_line.split()[1])
        real = await client.request(
            method, target, headers=headers, content=body.encode() if body else None
        )
        if real.status_code != status:
            failures.append(
                f"{first}: {status} documented, {real.status_code} answered: {real.text[:300]}"
            )
            continue
        if doc_body:
            documented = json.loads(doc_body)
            answered = real.json()
            failures += [f"{first}: {e}" for e in _shape_errors(documented, answered)]
            _learn(documented, answered, aliases)
        if "ETag" in doc_headers:
            if "etag" not in real.headers:
                failures.append(f"{first}: an ETag header is documented, none answered")
            else:
                aliases.setdefault(doc_headers["ETag"], real.headers["etag"])
    assert not failures, "\n".join(failures)


def test_doc_examples_are_valid_json() -> None:
    for request, response in _examples():
        for block in (request, response):
            _, _, body = _split(block)
            if body:
                try:
                    json.loads(body)
                except ValueError as exc:
                    pytest.fail(f"invalid JSON in doc block {block[:80]!r}: {exc}")
