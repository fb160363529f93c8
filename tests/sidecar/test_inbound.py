"""The inbound side in this process, for what the configuration check cannot cover: a
`SidecarConfig` built in code (here by `load_yaml` alone, skipping `check_consistency`)
that names the sidecar's own ports as targets still never gets a stream into them."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from sidecar.config import load_yaml
from sidecar.dataplane import Sidecar

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki, RawClient, free_port


def _statuses(port: int, svid_dir: Path, authorities: list[str]) -> list[int]:
    client = RawClient(port, svid_dir)
    try:
        return [client.request([(":method", "CONNECT"), (":authority", a)]) for a in authorities]
    finally:
        client.close()


def test_inbound_never_dials_the_sidecars_own_listeners_even_when_a_target_names_them() -> None:
    pki = Pki()
    workdir = Path(tempfile.mkdtemp())
    admin, inbound, upstream = free_port(), free_port(), free_port()
    config = load_yaml(
        f"""
svid_dir: {pki.write(workdir / "server", ECHO)}
admin: 127.0.0.1:{admin}
inbound:
  listen: 127.0.0.1:{inbound}
  targets: {{{admin}: {{}}, {upstream}: {{}}}}
upstreams:
  - {{name: loop, listen: "127.0.0.1:{upstream}", target: "echo:8080",
      endpoints: ["127.0.0.1:{free_port()}"]}}
"""
    )
    client_dir = pki.write(workdir / "client", CLIENT)

    async def scenario() -> tuple[list[int], Sidecar]:
        sidecar = Sidecar(config)
        await sidecar.start()
        try:
            statuses = await asyncio.to_thread(
                _statuses, inbound, client_dir, [f"x:{admin}", f"x:{upstream}"]
            )
        finally:
            await sidecar.drain()
        return statuses, sidecar

    statuses, sidecar = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert statuses == [404, 404]
    metrics = sidecar.metrics
    # Neither the admin port nor the upstream listener saw a connection from the sidecar.
    for direction in ("inbound", "outbound"):
        assert metrics.app_connections.labels(direction=direction)._value.get() == 0
    assert metrics.connect_errors.labels(status="404")._value.get() == 2
