"""``trellis ech config`` against a real ``trellis ca serve`` (admin socket) and its agent:
the printed ECHConfigList is a valid RFC 9849 list, byte for byte the config the service's
sidecars build from the key pair the agent hands them, and the HTTPS record carries it in
``ech=``. Refusals are one line and exit 1."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from sidecar.echkeys import ech_key
from sidecar.stek import EchKeyParts
from sidecar.tls.ech import pull_config_list
from tests.sidecar.dataplane.harness import REPO, Procs
from tests.sidecar.test_ech_key_distribution import ADMIN_SOCKET, response, start_mesh
from tests.sidecar.test_stek_ring_distribution import DB, WEB
from tests.sidecar.test_stek_ring_distribution import procs as procs  # the fixture

TIMEOUT = 60


def trellis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_the_printed_config_list_is_the_one_the_services_sidecars_decrypt_with(
    procs: Procs,
) -> None:
    mesh = start_mesh(procs)
    socket = procs.workdir / ADMIN_SOCKET
    # The agent's ring for this process (web) first, then the CA's list: a rotation in
    # between would make them differ, so both are read within one rotation and compared
    # by config id.
    (ring,) = response(mesh.socket).rings
    done = trellis("ech", "config", "--ca", str(socket), "--spiffe-id", WEB, "-o", "json")
    assert done.returncode == 0, done.stderr
    (printed,) = json.loads(done.stdout)
    assert printed["spiffe_id"] == WEB and printed["public_name"] == "example.org"
    config_list = base64.b64decode(printed["ech_config_list"])
    configs = pull_config_list(config_list)
    assert configs and all(c.usable() and c.public_name == "example.org" for c in configs)
    server_keys = {
        k.config_id: ech_key(
            EchKeyParts(
                k.config_id, k.public_key, k.private_key, k.public_name, k.not_before,
                k.not_after,
            )
        )
        for k in ring.ech_keys
    }  # fmt: skip
    shared = [c for c in configs if c.config_id in server_keys]
    assert shared, (printed["config_ids"], list(server_keys))
    for config in shared:
        assert server_keys[config.config_id].config.raw == config.raw
    record = printed["https_record"]
    assert record == (f'example.org. 300 IN HTTPS 1 . alpn="h2" ech="{printed["ech_config_list"]}"')
    text = trellis("ech", "config", "--ca", str(socket), "--name", "shop.example.com")
    assert text.returncode == 0, text.stderr
    assert WEB in text.stdout and DB in text.stdout  # every service without --spiffe-id
    assert "shop.example.com. 300 IN HTTPS 1 . " in text.stdout


def test_an_unknown_service_and_a_missing_socket_are_one_line_errors(
    procs: Procs, tmp_path: Path
) -> None:
    start_mesh(procs)
    socket = procs.workdir / ADMIN_SOCKET
    unknown = "spiffe://example.org/ns/default/sa/nobody"
    done = trellis("ech", "config", "--ca", str(socket), "--spiffe-id", unknown)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"trellis: error: the CA has no ECH keys for {unknown} (no entry names it)\n"
    )
    done = trellis("ech", "config", "--dir", str(tmp_path))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("trellis: error: no CA admin socket at ")
    done = trellis("ech", "config", "--ca", str(socket), "--ttl", "-5")
    assert done.returncode == 2 and "a TTL is 0 to 2147483647 seconds" in done.stderr
