"""What the MQTT edge hands the pipeline: one inbound message and how to acknowledge it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

__all__ = ["Acks", "Delivery", "Link", "LinkDown", "ReadGate"]


class LinkDown(Exception):
    """The broker connection is not there (or just went): publish later, connect again."""


class Acks(Protocol):
    """The acknowledgements of one connection: once it is gone, its acks are not sent."""

    def ack(self, message: Delivery) -> bool: ...


@dataclass(slots=True)  # not frozen: built per message, and frozen init costs 4x (~0.6 us)
class Delivery:
    """An inbound message, the connection that will acknowledge it, and when it arrived."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    acks: Acks
    received_at: datetime

    def ack(self) -> bool:
        """Send its PUBACK (after its batch is committed); False if its connection is gone."""
        return self.acks.ack(self)


class _Reader(Protocol):
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class ReadGate:
    """Flow control between the pipeline and the link: the pipeline closes the gate when it
    holds enough and opens it once half is taken; the link follows it (stops and restarts
    reading the broker, across reconnects too). Made first, given to both."""

    def __init__(self) -> None:
        self.closed = False
        self._readers: list[_Reader] = []

    def follow(self, reader: _Reader) -> None:
        """``reader`` reads only while the gate is open (a link, as it is built)."""
        self._readers.append(reader)
        if self.closed:
            reader.pause_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for reader in self._readers:
                reader.pause_reading()

    def open(self) -> None:
        if self.closed:
            self.closed = False
            for reader in self._readers:
                reader.resume_reading()


class _Node(Protocol):
    @property
    def display(self) -> str: ...


class Link(Protocol):
    """The daemon's broker connection as the rest of the daemon sees it (MQTT v5 or 3.1.1)."""

    connected: asyncio.Event
    connected_since: float
    stopping: bool

    @property
    def node(self) -> _Node | None:
        """The broker (of the list) the link is on while connected."""
        ...

    async def run(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    async def disconnect(self) -> None: ...
    async def publish(self, topic: str, payload: bytes) -> None: ...
