"""The unit of work: one transaction, and the store's repositories through it.

Begin it, lock and read what a decision needs, write what was decided, then commit or roll
back; nothing else. What is cached, decided or rendered is not its business
(``fleet_cache``, ``ingestion``, ``events``). A unit of work may stay open across tasks: a
pipelined batch is decided with its transaction open and committed from the batch in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from types import TracebackType
from uuid import UUID

import structlog
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from daemon.db.store import BatchRows, Store, WaitingRow
from domain.session import Session
from domain.telemetry import TelemetrySample

__all__ = ["UnitOfWork"]

log = structlog.get_logger(__name__)


class UnitOfWork:
    """One transaction on one pooled connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._conn: PoolConnectionProxy | None = None
        self._transaction: Transaction | None = None

    async def begin(self) -> UnitOfWork:
        """Take a connection from the pool and start the transaction."""
        self._conn = await self.store.pool.acquire()
        self._transaction = self._conn.transaction()
        try:
            await self._transaction.start()
        except BaseException:
            await self.rollback()
            raise
        return self

    async def commit(self) -> None:
        """Commit and give the connection back (rolled back, and given back, if that fails)."""
        try:
            await self._open()[1].commit()
        except BaseException:
            await self.rollback()
            raise
        await self._release()

    async def rollback(self) -> None:
        """Roll back (when the connection still can) and give the connection back."""
        conn, transaction = self._conn, self._transaction
        if conn is None:
            return
        try:
            if transaction is not None and not conn.is_closed():
                await transaction.rollback()
        except Exception as exc:  # the connection is broken: the pool replaces it
            log.debug("rollback failed", error=repr(exc))
        finally:
            await self._release()

    async def __aenter__(self) -> UnitOfWork:
        return await self.begin()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            await self.commit()
        else:
            await self.rollback()

    # -- the repositories, through this transaction --------------------------------------

    async def lock_bikes(self, bike_ids: Iterable[str]) -> dict[str, int]:
        """Lock the bikes' rows in bike_id order (creating missing ones); their new versions."""
        return await self.store.lock_bikes(self._open()[0], bike_ids)

    async def bikes(self, bike_ids: Sequence[str]) -> tuple[dict[str, Session], list[WaitingRow]]:
        """The bikes' Active sessions and waiting messages."""
        return await self.store.load_bikes(self._open()[0], bike_ids)

    async def sessions(self, session_ids: Iterable[UUID]) -> list[Session]:
        return await self.store.load_sessions(self._open()[0], session_ids)

    async def samples(self, keys: Iterable[tuple[UUID, int]]) -> list[TelemetrySample]:
        return await self.store.load_samples(self._open()[0], keys)

    async def telemetry_owners(
        self, keys: Sequence[tuple[UUID, datetime]]
    ) -> list[tuple[UUID, datetime, UUID, int]]:
        return await self.store.telemetry_owners(self._open()[0], keys)

    async def write(self, rows: BatchRows) -> None:
        """Telemetry, summaries, waiting messages, rejections and outbox rows of a batch."""
        await self.store.write_rows(self._open()[0], rows)

    # -- inside ----------------------------------------------------------------------------

    def _open(self) -> tuple[PoolConnectionProxy, Transaction]:
        if self._conn is None or self._transaction is None:
            raise RuntimeError("the unit of work is not begun")
        return self._conn, self._transaction

    async def _release(self) -> None:
        conn, self._conn, self._transaction = self._conn, None, None
        if conn is not None:
            await self.store.pool.release(conn)
