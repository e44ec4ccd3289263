from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from daemon.app import Daemon
from tests.conftest import Broker
from tests.e2e.helpers import Bike, Outbound, running_daemon, settings_for
from tests.peers import mqtt_client

pytestmark = pytest.mark.e2e


@pytest.fixture
async def daemon(database_url: str, broker: Broker) -> AsyncIterator[Daemon]:
    async with running_daemon(settings_for(database_url, broker.daemon_url)) as d:
        yield d


@pytest.fixture
async def outbound(broker: Broker) -> AsyncIterator[Outbound]:
    async with Outbound(broker.fleet_url) as listener:
        yield listener


@pytest.fixture
async def bike(broker: Broker) -> AsyncIterator[Bike]:
    async with mqtt_client(broker.fleet_url) as client:
        yield Bike(client)
