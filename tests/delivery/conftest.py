"""A serve with its queue manager running, a loopback DNS server, for delivery tests."""

from __future__ import annotations

import pytest

from tests.conftest import write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.server import serve


@pytest.fixture
def start_mta(tmp_path, nursery):
    async def start(zone: dict | None = None, **params):
        dns_port = await nursery.start(run_dns_server, zone or {})
        settings = {"master_service_disable": "", "dns_nameservers": f"127.0.0.1:{dns_port}",
                    "smtp_connect_timeout": "5s", "mydestination": "mx.test.example"}
        settings.update(params)
        path = write_main_cf(tmp_path, **settings)
        return await nursery.start(serve, configuration.load(path))

    return start
