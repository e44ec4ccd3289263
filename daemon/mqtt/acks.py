"""The one place that reaches into aiomqtt and paho (both pinned in pyproject.toml).

- Manual acks: aiomqtt 2.5 has no public manual acknowledgement (its issue #345; its
  development branch has ``Client.puback()``); paho, underneath, does (``manual_ack_set(True)``
  and ``ack(mid, qos)``), reached as ``client._client``. Inbound QoS 1 messages are
  acknowledged only after what they caused is committed.
- Pausing the reader (``PausableClient``): aiomqtt cannot stop reading its socket; the daemon
  needs that to bound what it holds.
- Receiving (``receive_directly``): aiomqtt turns each of paho's messages into its own
  ``Message`` (validating the topic again) and queues it for ``async for``. The daemon sets
  paho's public ``on_message`` callback instead and hands paho's message straight to the
  pipeline: no second message object, no queue, no task wake-up per message.
- Leaving (``disconnect``): paho's ``disconnect()`` ends aiomqtt's message iterator at once.

``tests/integration/test_manual_acks.py`` fails loudly (naming what moved) when an upgrade
changes any of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import aiomqtt
import paho.mqtt.client as paho

__all__ = ["Ackable", "ManualAcks", "PausableClient", "disconnect", "receive_directly"]


class Ackable(Protocol):
    """What an acknowledgement needs of a message: its packet id and QoS."""

    @property
    def mid(self) -> int: ...
    @property
    def qos(self) -> int: ...


def receive_directly(client: aiomqtt.Client, receive: Callable[[paho.MQTTMessage], None]) -> None:
    """Hand every inbound message to ``receive`` from paho's read callback, bypassing aiomqtt's
    queue (its ``messages`` iterator then only ends, with MqttError, when the connection does).
    """

    def on_message(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        receive(message)

    client._client.on_message = on_message


def disconnect(client: aiomqtt.Client) -> None:
    """Send DISCONNECT now (the broker keeps the session); aiomqtt's iterator then ends."""
    client._client.disconnect()


class ManualAcks:
    """The acknowledgements of one connection: once it is gone, its acks are not sent.

    The broker redelivers what a lost connection left unacknowledged, and redelivery is a
    duplicate the pipeline settles as a no-op, so skipping a stale ack is always safe.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)
        self._open = True
        self.sent = 0
        self.skipped = 0

    @property
    def open(self) -> bool:
        return self._open

    def close(self) -> None:
        """The connection is gone: later acks would name packet ids of a dead session."""
        self._open = False

    def ack(self, message: Ackable) -> bool:
        """Send the PUBACK of a settled message; False when its connection is gone."""
        if message.qos == 0:
            return True
        if not self._open:
            self.skipped += 1
            return False
        rc = self._paho.ack(message.mid, message.qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            self.skipped += 1
            return False
        self.sent += 1
        return True


class PausableClient(aiomqtt.Client):
    """aiomqtt's client, able to stop reading its socket while the daemon catches up.

    The broker should send no more than Receive Maximum unacknowledged messages, but Mosquitto
    2.0 was measured sending several thousand to a daemon draining a backlog; the daemon bounds
    its own intake instead. While reading is paused, TCP's window pushes back on the broker,
    which keeps the messages queued. ``_on_socket_open`` is aiomqtt 2.5's own (its reader
    callback is a local function), with the callback kept so that it can be removed and added
    again; ``tests/integration/test_manual_acks.py`` fails loudly if aiomqtt moves it.
    """

    _reader: Callable[[], None] | None = None
    _fileno: int = -1
    paused: bool = False

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def callback() -> None:
            try:  # as aiomqtt: a read error is a broken connection
                while True:
                    client.loop_read()
                    pending = getattr(client._sock, "pending", None)  # TLS: decoded bytes left
                    if pending is not None and pending() > 0:
                        continue
                    break
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def create_misc_task() -> None:
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._reader, self._fileno, self.paused = callback, sock.fileno(), False
        self._loop.call_soon_threadsafe(self._loop.add_reader, sock.fileno(), callback)
        self._loop.call_soon_threadsafe(create_misc_task)

    def pause_reading(self) -> None:
        """Read nothing more from the broker until ``resume_reading``."""
        if not self.paused and self._reader is not None and self._fileno > -1:
            self._loop.remove_reader(self._fileno)
            self.paused = True

    def resume_reading(self) -> None:
        if self.paused and self._reader is not None and self._fileno > -1:
            self._loop.add_reader(self._fileno, self._reader)
            self.paused = False
