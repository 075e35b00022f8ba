"""Every setting, read once from CRMSYNC_* environment variables (documented in the README)."""

from __future__ import annotations

import ipaddress
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Set by `crmsync serve --workers N` for its workers: the supervisor's pid (not a setting).
SUPERVISOR_ENV = "CRMSYNC_SERVE_SUPERVISOR_PID"
# ... and the directory its workers share (metrics files, connection counts: balance.py).
WORKERS_DIR_ENV = "CRMSYNC_SERVE_WORKERS_DIR"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRMSYNC_", extra="ignore", frozen=True)

    database_url: str | None = None
    data_dir: Path = Path("data")
    # Upper bounds too, at what a team could want (a token for a year, a lockout of a
    # week): far past them lie values the code or PostgreSQL cannot hold (a token expiry
    # past year 9999, an interval out of range), with which the server started and then
    # failed every login with a 500. Refused at start instead.
    pool_min_size: int = Field(default=2, ge=1, le=1000)
    pool_max_size: int = Field(default=10, ge=1, le=1000)
    statement_timeout_ms: int = Field(default=30_000, ge=0, le=2_147_483_647)

    jwt_secret: SecretStr | None = None
    token_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60, le=366 * 24 * 3600)
    bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    login_max_failures: int = Field(default=5, ge=1, le=1000)
    login_window_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    login_lockout_seconds: int = Field(default=300, ge=1, le=7 * 24 * 3600)

    default_region: str = "US"
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # The contract keeps an Idempotency-Key at least 7 days; a day more by default.
    idempotency_ttl_days: int = Field(default=8, ge=7, le=3650)
    # Sync records are kept forever unless this is set. At least as long as an
    # Idempotency-Key: a replayed answer names its sync record.
    sync_record_retention_days: int | None = Field(default=None, ge=7, le=36500)

    require_https: bool = True
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = ()
    metrics_token: SecretStr | None = None
    backup_dir: Path = Path("backups")
    log_level: str = "INFO"

    @field_validator("database_url", "metrics_token", "sync_record_retention_days", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`CRMSYNC_METRICS_TOKEN=` must not be a token an empty Bearer matches, nor
        `CRMSYNC_DATABASE_URL=` a database."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("must be at least 32 characters (secrets.token_urlsafe(32) makes one)")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql://user:password@host:port/database URL")
        # Each host of a multi-host URL (db1:5432,db2:5432, for a failover pair) may name a
        # port; urlsplit raises ValueError for one that is no number in range. Its message
        # quotes the "port", which for a password holding an unencoded /, # or ? (ending
        # the URL's authority early) is the start of the password: it is not passed on.
        # A password of digits up to such a character leaves a "port" that reads: an "@"
        # after the authority, not in a query's key=value (?user=me@server), tells it.
        after = value[len(f"{parts.scheme}://{parts.netloc}") :]
        cut_short = "@" not in parts.netloc and "=" not in after.partition("@")[0]
        try:
            for host in parts.netloc.rpartition("@")[2].split(","):
                urlsplit(f"//{host}").port  # noqa: B018
            if cut_short and "@" in after:
                raise ValueError
        except ValueError:
            raise ValueError(
                "the host or port of CRMSYNC_DATABASE_URL cannot be read (a port must be a"
                " number up to 65535; percent-encode special characters in the password)"
            ) from None
        return value

    @model_validator(mode="after")
    def _pool_sizes(self) -> Settings:
        """A minimum given above the maximum is a mistake; the default one follows a small
        maximum down (CRMSYNC_POOL_MAX_SIZE=1 alone is fine; see db.create_pool)."""
        if "pool_min_size" in self.model_fields_set and self.pool_min_size > self.pool_max_size:
            raise ValueError("CRMSYNC_POOL_MIN_SIZE must not exceed CRMSYNC_POOL_MAX_SIZE")
        return self

    @model_validator(mode="after")
    def _records_outlive_their_keys(self) -> Settings:
        """A replayed upload answers the sync_id of its first run: that record must still
        be there for as long as the answer is."""
        kept = self.sync_record_retention_days
        if kept is not None and kept < self.idempotency_ttl_days:
            raise ValueError(
                "CRMSYNC_SYNC_RECORD_RETENTION_DAYS must not be under"
                f" CRMSYNC_IDEMPOTENCY_TTL_DAYS ({self.idempotency_ttl_days})"
            )
        return self

    @field_validator("statement_timeout_ms")
    @classmethod
    def _no_or_a_real_limit(cls, value: int) -> int:
        """A few milliseconds would cancel start-up's own first queries (the catalog read
        cold): the service could not start at all."""
        if 0 < value < 100:
            raise ValueError("must be 0 (no limit) or at least 100")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in value.split(",")
                if part.strip()
            )
        return value

    @field_validator("default_region")
    @classmethod
    def _upper_region(cls, value: str) -> str:
        import phonenumbers

        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown ISO 3166 region {value!r}")
        return region

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @cached_property
    def secret(self) -> str:
        """The JWT signing key: the configured one, or in embedded mode one kept in the data dir.

        A server on an external database has to be given a secret: a generated one would
        differ between machines behind a load balancer.
        """
        if self.jwt_secret is not None:
            value = self.jwt_secret.get_secret_value()
            if len(value.strip()) < 32:  # 32 spaces are no secret
                raise ValueError("CRMSYNC_JWT_SECRET must be at least 32 characters")
            return value
        if not self.embedded:
            raise ValueError("CRMSYNC_JWT_SECRET is required when CRMSYNC_DATABASE_URL is set")
        path = self.data_dir / "jwt_secret"
        if path.exists() and len(value := path.read_text().strip()) >= 32:
            return value
        # Missing, or too short to have signed anything (left empty by a crash, say): a new
        # one, written under another name and renamed, so no crash leaves a part of it.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        partial = path.with_name(".jwt_secret.partial")
        partial.unlink(missing_ok=True)
        partial.touch(mode=0o600)
        partial.write_text(value)
        partial.replace(path)
        return value
