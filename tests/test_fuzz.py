"""Every operation of the OpenAPI document, fuzzed (schemathesis): whatever a client sends,
the answer is never a 500 and always one the document describes (status, content type,
schema, headers). It has found: offsets beyond +-16 h failing every upload, the item errors
described as problem+json, undocumented 409s, is_admin taking 0 and 1.

The server runs in a process of its own, as in production, on the tests' database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crmsync import openapi
from crmsync.main import create_app
from tests.conftest import TEST_SECRET, Account, make_settings

SPEC = openapi.build(create_app(make_settings("postgresql://unused/unused"), maintenance=False))
# Logging out would revoke the token the rest of a test's cases sign in with.
schema = schemathesis.openapi.from_dict(SPEC).exclude(path="/auth/logout")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def served_app() -> FastAPI:
    """What the server process runs: settings from its environment, and no maintenance
    rounds (a round racing the TRUNCATE before each test deadlocks)."""
    return create_app(maintenance=False)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "CRMSYNC_DATABASE_URL": database_url,
        "CRMSYNC_JWT_SECRET": TEST_SECRET,
        "CRMSYNC_BCRYPT_ROUNDS": "4",
        "CRMSYNC_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "tests.test_fuzz:served_app"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/healthz"):
            assert process.poll() is None, "the server process exited"
            assert time.monotonic() < deadline, "the server did not come up in 30 s"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@schema.parametrize()
# The same cases on every run, so that a red CI names a bug of the change it ran on.
@settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_gets_a_500_or_an_undocumented_answer(
    case: schemathesis.Case, server: str, admin: Account
) -> None:
    case.call_and_validate(base_url=server, headers=admin.headers, checks=CHECKS)
