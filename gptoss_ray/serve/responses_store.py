"""Where stored responses live: one small interface, three backends (`--responses-store URL`).

- `sqlite:///PATH` (default: a file under the cache directory): zero set-up, survives
  restarts, one machine. SQLite serialises writers itself; WAL lets readers run beside them.
- `postgresql://...` (psycopg 3): shared by every ingress replica and pod.
- `none`: nothing is stored; `store: true` is refused and previous_response_id is a 404.

A record is one response: its JSON, its input items, the prompt and output token ids
it was generated from (so a continuation can check it renders the same prefix, which
the engine's prefix cache then reuses), the conversation's start date (harmony's system
message carries a date; the whole chain keeps the first one so its prefix never
changes), and the SHA-256 of the API key that made it (another key gets 404). Rows
expire after the TTL; expired rows are deleted by `purge_expired`, called at most once
a minute from `put`, and never returned before then.

The drivers are synchronous and run in a worker thread (`asyncio.to_thread`) behind one
lock per store: a response store sees a few queries per request, not a hot loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 30 * 24 * 3600.0
STORE_ENV = "GPTOSS_RAY_RESPONSES_STORE"  # where a Kubernetes Secret puts a Postgres URL (helm chart)
PURGE_EVERY_S = 60.0


class StoreError(Exception):
    """The store could not be reached or answered with an error (HTTP 503)."""


@dataclass
class StoredResponse:
    id: str
    key_hash: str  # SHA-256 hex of the API key that created it ("" hashed when none was sent)
    created_at: float
    expires_at: float
    response: dict[str, Any]  # the response object as last returned
    input_items: list[dict[str, Any]] = field(default_factory=list)  # this request's input, with ids
    previous_response_id: str | None = None
    start_date: str | None = None  # the date in the chain's harmony system message
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StoredResponse:
        return cls(**json.loads(text))


def key_hash(api_key: str | None) -> str:
    return hashlib.sha256((api_key or "").encode()).hexdigest()


class ResponseStore(Protocol):
    """What the Responses API needs from a store. Every method may raise StoreError."""

    enabled: bool

    async def put(self, record: StoredResponse) -> None: ...  # insert or replace by id

    async def get(self, response_id: str, key_hash: str) -> StoredResponse | None: ...  # None: absent, expired, other key

    async def delete(self, response_id: str, key_hash: str) -> bool: ...

    async def purge_expired(self) -> int: ...

    async def count(self) -> int: ...


class NoStore:
    """`--responses-store none`."""

    enabled = False

    async def put(self, record: StoredResponse) -> None:
        return None

    async def get(self, response_id: str, key_hash: str) -> StoredResponse | None:
        return None

    async def delete(self, response_id: str, key_hash: str) -> bool:
        return False

    async def purge_expired(self) -> int:
        return 0

    async def count(self) -> int:
        return 0


class _SqlStore:
    """The SQL both backends share; subclasses supply `_connect` and the placeholder."""

    enabled = True
    PH = "?"
    SCHEMA = ("CREATE TABLE IF NOT EXISTS gptoss_responses (id TEXT PRIMARY KEY, key_hash TEXT NOT NULL, "
              "expires_at DOUBLE PRECISION NOT NULL, record TEXT NOT NULL)")
    INDEX = "CREATE INDEX IF NOT EXISTS gptoss_responses_expiry ON gptoss_responses (expires_at)"

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        self._last_purge = 0.0

    # --- driver plumbing -----------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _run(self, sql: str, args: tuple = (), fetch: bool = False) -> Any:
        with self._lock:
            for attempt in (0, 1):  # one reconnect: a database restart must not need ours
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                        self._conn.execute(self.SCHEMA)
                        self._conn.execute(self.INDEX)
                        self._commit()
                    cur = self._conn.execute(sql.replace("?", self.PH), args)
                    rows = cur.fetchall() if fetch else cur.rowcount
                    self._commit()
                    return rows
                except Exception as e:
                    self._close()
                    if attempt:
                        raise StoreError(f"{type(e).__name__}: {e}".splitlines()[0]) from e
                    logger.warning("response store error, reconnecting: %s", type(e).__name__)

    def _commit(self) -> None:
        self._conn.commit()

    def _close(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            pass
        self._conn = None

    async def _call(self, sql: str, args: tuple = (), fetch: bool = False) -> Any:
        return await asyncio.to_thread(self._run, sql, args, fetch)

    # --- the interface ---------------------------------------------------------------

    async def put(self, record: StoredResponse) -> None:
        await self._call(self.UPSERT, (record.id, record.key_hash, record.expires_at, record.to_json()))
        if time.time() - self._last_purge > PURGE_EVERY_S:
            await self.purge_expired()

    UPSERT = ("INSERT INTO gptoss_responses (id, key_hash, expires_at, record) VALUES (?, ?, ?, ?) "
              "ON CONFLICT (id) DO UPDATE SET key_hash = excluded.key_hash, expires_at = excluded.expires_at, "
              "record = excluded.record")

    async def get(self, response_id: str, key_hash: str) -> StoredResponse | None:
        rows = await self._call("SELECT record FROM gptoss_responses WHERE id = ? AND key_hash = ? AND expires_at > ?",
                                (response_id, key_hash, time.time()), fetch=True)
        return StoredResponse.from_json(rows[0][0]) if rows else None

    async def delete(self, response_id: str, key_hash: str) -> bool:
        return await self._call("DELETE FROM gptoss_responses WHERE id = ? AND key_hash = ?",
                                (response_id, key_hash)) > 0

    async def purge_expired(self) -> int:
        self._last_purge = time.time()
        deleted = await self._call("DELETE FROM gptoss_responses WHERE expires_at <= ?", (time.time(),))
        if deleted:
            logger.info("response store: deleted %d expired responses", deleted)
        return deleted

    async def count(self) -> int:
        rows = await self._call("SELECT COUNT(*) FROM gptoss_responses", fetch=True)
        return int(rows[0][0])


class SQLiteStore(_SqlStore):
    def __init__(self, url: str, path: Path):
        super().__init__(url)
        self.path = path

    def _connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn


class PostgresStore(_SqlStore):
    PH = "%s"

    def _connect(self) -> Any:
        import psycopg  # imported here: only deployments that use Postgres need the driver

        return psycopg.connect(self.url, connect_timeout=10)


def default_store_url() -> str:
    cache = Path(os.environ.get("GPTOSS_RAY_CACHE", Path.home() / ".cache" / "gptoss-ray"))
    return f"sqlite:///{cache / 'responses.sqlite3'}"


def open_store(url: str | None) -> ResponseStore:
    """The store for a `--responses-store` URL (None: $GPTOSS_RAY_RESPONSES_STORE, read here in
    the ingress replica so a password never travels in the Serve config; else the default
    SQLite file). Nothing connects until the first query, so a down database never blocks startup."""
    url = url or os.environ.get(STORE_ENV) or default_store_url()
    if url == "none":
        return NoStore()
    if url.startswith("sqlite:///"):
        return SQLiteStore(url, Path(url.removeprefix("sqlite:///")).expanduser())
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"responses store {url!r}: expected sqlite:///PATH, postgresql://... or none")
