"""Contract: Operations (HTTPS is enforced; trusted proxies; Strict-Transport-Security)."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trustme
import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from crmsync.config import Settings
from crmsync.middleware import HttpsGuard, Peers, ProblemHttpProtocol
from tests.conftest import api_routes, assert_problem, free_port, make_app, serving

TRUSTED = "10.0.0.0/8, 192.168.1.7, fd00::/8"


@pytest.fixture(scope="module")
async def guarded(database_url: str) -> AsyncIterator[FastAPI]:
    app = make_app(database_url, trusted_proxies=TRUSTED)
    async with app.router.lifespan_context(app):
        yield app


async def call(
    app: FastAPI, path: str, peer: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example") as client:
        return await client.get(path, headers=headers or {})


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        ("203.0.113.9", {}),  # plain HTTP from the internet
        ("203.0.113.9", {"X-Forwarded-Proto": "https"}),  # an untrusted client cannot claim it
        ("127.0.0.1", {"X-Forwarded-Proto": "https"}),  # loopback, but through a proxy not trusted
        ("127.0.0.1", {"X-Forwarded-For": "198.51.100.1"}),
        ("127.0.0.1", {"Forwarded": "for=198.51.100.1;proto=https"}),  # RFC 7239's header
        ("127.0.0.1", {"X-Real-IP": "198.51.100.1"}),  # nginx's
        ("127.0.0.1", {"X-Forwarded-Host": "api.example"}),
        ("10.1.2.3", {"X-Forwarded-Proto": "http"}),  # trusted proxy says the client used http
        ("10.1.2.3", {}),  # trusted proxy's own plain request
        ("192.168.1.8", {"X-Forwarded-Proto": "https"}),  # next to, not in, the trusted list
    ],
)
async def test_plain_http_is_refused(guarded: FastAPI, peer: str, headers: dict[str, str]) -> None:
    r = await call(guarded, "/auth/me", peer, headers)
    assert_problem(r, 403, "https_required")
    assert "strict-transport-security" not in r.headers


async def test_plain_http_is_refused_on_every_route_but_healthz(guarded: FastAPI) -> None:
    """Every route the app has, the sign-in (a password sent in the clear) and the uploads
    included, and whatever the body: 403 before anything is read or checked."""
    transport = httpx.ASGITransport(app=guarded, client=("203.0.113.9", 4321))
    routes = [
        (
            method,
            route.path_format.replace("{user_id}", str(uuid.uuid4())).replace(
                "{contact_id}", str(uuid.uuid4())
            ),
        )
        for route in api_routes(guarded)
        for method in route.methods - {"HEAD"}
    ]
    routes += [("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json")]
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example") as client:
        for method, path in routes:
            body = '{"email": "admin@example.com", "password": "secret-password"}'
            r = await client.request(method, path, content=body)
            if path == "/healthz":
                assert r.status_code == 200, path
            else:
                assert_problem(r, 403, "https_required")
    assert ("POST", "/auth/login") in routes and ("POST", "/calls") in routes


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        ("10.1.2.3", {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.1"}),
        ("192.168.1.7", {"X-Forwarded-Proto": "https"}),
        ("fd00::5", {"X-Forwarded-Proto": "HTTPS"}),
        ("10.1.2.3", {"X-Forwarded-Proto": "http, https"}),  # the last hop is the trusted one
    ],
)
async def test_https_through_a_trusted_proxy_passes_with_hsts(
    guarded: FastAPI, peer: str, headers: dict[str, str]
) -> None:
    r = await call(guarded, "/auth/me", peer, headers)
    assert_problem(r, 401, "unauthenticated")  # past the guard, stopped by auth
    assert r.headers["strict-transport-security"] == "max-age=31536000"


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1"])
async def test_direct_loopback_without_forwarding_headers_passes(
    guarded: FastAPI, peer: str
) -> None:
    r = await call(guarded, "/auth/me", peer)
    assert_problem(r, 401, "unauthenticated")
    assert "strict-transport-security" not in r.headers


async def test_healthz_answers_plain_http_from_anywhere_readyz_does_not(
    guarded: FastAPI,
) -> None:
    assert (await call(guarded, "/healthz", "203.0.113.9")).json() == {"status": "ok"}
    assert_problem(await call(guarded, "/readyz", "203.0.113.9"), 403, "https_required")


async def test_https_not_required_when_switched_off(database_url: str) -> None:
    app = make_app(database_url, require_https=False)
    async with app.router.lifespan_context(app):
        r = await call(app, "/auth/me", "203.0.113.9")
    assert_problem(r, 401, "unauthenticated")


# A real TLS handshake: uvicorn serving the app with a certificate made for the test.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(
    database_url: str, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    port = free_port()
    config = uvicorn.Config(
        make_app(database_url),
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(directory / "cert.pem"),
        ssl_keyfile=str(directory / "key.pem"),
        http=ProblemHttpProtocol,  # as `crmsync serve` runs it
        log_config=None,
        lifespan="on",
    )
    with serving(config):
        yield f"127.0.0.1:{port}"


def test_tls_handshake_with_a_test_certificate(tls_server: str, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with httpx.Client(base_url=f"https://{tls_server}", verify=context) as client:
        r = client.get("/auth/me")
        assert_problem(r, 401, "unauthenticated")
        assert r.headers["strict-transport-security"] == "max-age=31536000"
        assert client.get("/readyz").status_code == 200
        assert r.extensions["http_version"] == b"HTTP/1.1"
        # Refused before the app (a method uvicorn cannot parse): still an HTTPS answer.
        r = client.request("BREW", "/healthz")
        assert_problem(r, 400, "bad_request")
        assert r.headers["strict-transport-security"] == "max-age=31536000"


def test_tls_server_rejects_an_untrusted_certificate_and_plain_http(tls_server: str) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{tls_server}/healthz")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{tls_server}/healthz", timeout=5)


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        ("::ffff:10.1.2.3", {"X-Forwarded-Proto": "https"}),  # trusted proxy, dual-stack socket
        ("::ffff:127.0.0.1", {}),  # loopback on a dual-stack socket
    ],
)
async def test_ipv4_mapped_ipv6_peers_count_as_their_ipv4_address(
    guarded: FastAPI, peer: str, headers: dict[str, str]
) -> None:
    r = await call(guarded, "/auth/me", peer, headers)
    assert_problem(r, 401, "unauthenticated")  # past the guard, stopped by auth


async def test_a_request_without_a_client_address_counts_as_local(guarded: FastAPI) -> None:
    # A Unix socket has no peer address; only this machine can reach it.
    transport = httpx.ASGITransport(app=guarded, client=None)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example") as client:
        r = await client.get("/auth/me")
    assert_problem(r, 401, "unauthenticated")


def test_serve_refuses_tls_files_that_cannot_serve(tmp_path: Path, ca: trustme.CA) -> None:
    """One line and exit 2 before anything starts: a missing file, a certificate without
    its key, a key that is not the certificate's."""
    from tests.test_cli import clean_env, run_cli

    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other = ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    for args in (
        ["--ssl-certfile", str(tmp_path / "missing.pem"), "--ssl-keyfile", str(tmp_path / "k")],
        ["--ssl-certfile", str(tmp_path / "cert.pem")],
        [
            "--ssl-certfile",
            str(tmp_path / "cert.pem"),
            "--ssl-keyfile",
            str(tmp_path / "other-key.pem"),
        ],
    ):
        result = run_cli("serve", "--port", "1", *args, env=clean_env(), cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # refused before the database started


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("198.51.100.1, 10.9.9.9", "198.51.100.1"),  # a second trusted proxy on the way
        ("forged, 198.51.100.1", "198.51.100.1"),  # the left of the list is anyone's
        ("10.9.9.9, 192.168.1.7", "10.9.9.9"),  # only trusted hops: the first of them
    ],
)
async def test_a_trusted_proxy_names_the_client_the_rightmost_hop_it_cannot_vouch_for(
    forwarded_for: str, client: str
) -> None:
    """Behind a trusted proxy the app sees the original client (as X-Forwarded-For names it)
    and scheme, not the proxy's."""
    seen: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(client=scope["client"], scheme=scope["scheme"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    peers = Peers(Settings(trusted_proxies=TRUSTED).trusted_proxies)
    guard = HttpsGuard(app, peers, require_https=True)
    transport = httpx.ASGITransport(app=guard, client=("10.1.2.3", 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.example") as c:
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": forwarded_for}
        r = await c.get("/auth/me", headers=headers)
    assert r.status_code == 204
    assert seen == {"client": (client, 0), "scheme": "https"}


def test_the_peers_remembered_are_bounded_whatever_the_hops_a_proxy_forwards() -> None:
    """X-Forwarded-For hops are anyone's text, each classified and remembered: a stream of
    new ones must not grow the process without end."""
    peers = Peers(Settings(trusted_proxies=TRUSTED).trusted_proxies)
    for i in range(Peers._CACHE_LIMIT * 2 + 10):
        assert peers.classify(f"198.51.{i // 256 % 256}.{i % 256}-{i}") == (False, False)
        assert len(peers._known) <= Peers._CACHE_LIMIT
    assert peers.classify("10.1.2.3") == (False, True)  # still answered right after clearing
    assert peers.classify("127.0.0.1") == (True, False)
