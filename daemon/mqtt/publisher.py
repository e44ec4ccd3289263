"""Publishing many messages with QoS 1 through the daemon's own link, as a fleet of devices
does: across a broker's restart and across the nodes of a cluster, nothing lost.

``chargeflow simulate`` and ``chargeflow bench`` publish with it (and the benchmarks). It is
the daemon's link (``daemon.mqtt.connection``) subscribing to nothing, on a clean session of a
client id of its own: whichever broker of the list it is on, a message counts as sent once
that broker has answered its PUBLISH with a PUBACK. A message whose connection is lost first
is published again when the link is back (on the next broker of the list, or the same one
once it returns): a duplicate for the daemon at worst, which it settles as one. A PUBACK that
refuses the message (MQTT v5: reason 0x80 or more, such as 0x87 when the broker's ACL does not
let this login write the topic) is counted as refused, not as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from daemon.config import ConfigError, Settings
from daemon.metrics import Metrics
from daemon.mqtt.connection import MqttLink, Refused
from daemon.mqtt.delivery import LinkDown

__all__ = ["BrokerUnreachable", "Published", "Publisher"]

_RECONNECT_PAUSE_S = 0.05


class BrokerUnreachable(ConfigError):
    """No broker of the list took a connection in time; the message says why (a start-up
    failure: the CLI answers it with exit code 2)."""


@dataclass(slots=True)
class Published:
    """What became of the messages handed to a ``Publisher``."""

    sent: int = 0
    refused: int = 0
    first_refusal: str | None = None
    republished: int = 0  # published again after their connection was lost
    nodes: list[str] = field(default_factory=list)  # the brokers it published through


class Publisher:
    """QoS 1 publishing with a window of PUBACKs outstanding, across reconnects."""

    def __init__(self, settings: Settings, *, window: int = 200, connect_timeout_s: float = 15):
        self.settings = settings.model_copy(
            update={"client_id": f"chargeflow-publisher-{uuid.uuid4().hex[:10]}"}
        )
        self.window = window
        self.connect_timeout_s = connect_timeout_s
        self.report = Published()
        self._link = MqttLink(self.settings, Metrics(), _no_inbound, subscribe=False, clean=True)
        self._task: asyncio.Task[None] | None = None
        self._last_node: object = None

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[Publisher]:
        """Connected to a broker of the list (BrokerUnreachable if none answers in time)."""
        self._task = asyncio.create_task(self._link.run())
        try:
            await self._until_connected()
            yield self
        finally:
            await self._link.disconnect()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _until_connected(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._link.connected.wait()
        except TimeoutError:
            raise BrokerUnreachable(
                f"cannot publish: no broker of {self._brokers()} took a connection within "
                f"{self.connect_timeout_s:.0f} s ({self._link.last_error or 'no answer'})"
            ) from None
        self._note_node()

    def _note_node(self) -> None:
        node = self._link.node
        if node is not None and node is not self._last_node:
            self._last_node = node
            self.report.nodes.append(node.display)

    def _brokers(self) -> str:
        return ", ".join(b.display for b in self._link.brokers)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish one message until a broker has taken it (or refused it)."""
        again = False
        while True:
            if not self._link.connected.is_set():
                await self._until_connected()
            try:
                await self._link.publish(topic, payload)
            except Refused as exc:
                self.report.refused += 1
                self.report.first_refusal = self.report.first_refusal or str(exc)
                return
            except LinkDown:
                again = True
                await asyncio.sleep(_RECONNECT_PAUSE_S)  # the link notices, then reconnects
                continue
            self.report.sent += 1
            self.report.republished += again
            if self._link.node is not self._last_node:
                self._note_node()
            return

    async def publish_all(
        self,
        messages: Iterable[tuple[str, bytes]],
        pace: Callable[[int], float] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Published:
        """Publish every (topic, payload) in order, ``window`` outstanding at most; ``pace``
        (messages handed over so far -> seconds to wait) sets a rate."""
        window = asyncio.Semaphore(self.window)
        failures: list[BaseException] = []

        async def one(topic: str, payload: bytes) -> None:
            try:
                await self.publish(topic, payload)
            except BaseException as exc:  # BrokerUnreachable: stop handing more over
                failures.append(exc)
            finally:
                window.release()

        tasks: list[asyncio.Task[None]] = []
        for handed, (topic, payload) in enumerate(messages, start=1):
            await window.acquire()
            if failures:
                break
            tasks.append(asyncio.create_task(one(topic, payload)))  # tasks start in order
            await self._paced(handed, pace, progress)
            if len(tasks) >= 10 * self.window:
                tasks = [t for t in tasks if not t.done()]
        await asyncio.gather(*tasks)
        if failures:
            raise failures[0]
        if progress is not None:
            progress(self.report.sent + self.report.refused)
        return self.report

    async def _paced(
        self,
        handed: int,
        pace: Callable[[int], float] | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        """After ``handed`` messages: wait as ``pace`` says, and say how far it is."""
        wait = pace(handed) if pace is not None else 0.0
        if wait > 0:
            await asyncio.sleep(wait)
        if progress is not None and handed % 200 == 0:
            progress(self.report.sent + self.report.refused)


def _no_inbound(_: object) -> None:
    """A publisher subscribes to nothing; nothing arrives."""
