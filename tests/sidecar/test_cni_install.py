"""``trellis-cni install``: what the CNI DaemonSet runs to chain the plugin on a node.

Run as a process against a configuration directory laid out as a node's
``/etc/cni/net.d`` (the runtime loads the first ``*.conflist`` by name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENTRY = {"redirectAll": False, "kubeconfig": "/etc/cni/net.d/trellis-cni.kubeconfig"}


def _bridge() -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _install(conf_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cni", "install", f"--cni-conf-dir={conf_dir}",
         f"--entry={json.dumps(ENTRY)}"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_install_chains_the_plugin_last_in_the_first_conflist_once(tmp_path: Path) -> None:
    (tmp_path / "10-bridge.conflist").write_text(json.dumps(_bridge()))
    other = json.dumps({**_bridge(), "name": "other"})
    (tmp_path / "20-other.conflist").write_text(other)
    for _ in range(2):  # a restarted DaemonSet pod installs again
        done = _install(tmp_path)
        assert done.returncode == 0, done.stderr
    chained = json.loads((tmp_path / "10-bridge.conflist").read_text())
    assert [p["type"] for p in chained["plugins"]] == ["bridge", "portmap", "trellis-cni"]
    assert chained["plugins"][-1] == {**ENTRY, "type": "trellis-cni"}
    assert chained["plugins"][:2] == _bridge()["plugins"]
    assert (tmp_path / "20-other.conflist").read_text() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-bridge.conflist", "20-other.conflist"]


def test_install_without_a_main_plugin_is_a_one_line_error(tmp_path: Path) -> None:
    done = _install(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no *.conflist" in done.stderr
    assert "Traceback" not in done.stderr


def test_install_refuses_a_conflist_without_plugins(tmp_path: Path) -> None:
    (tmp_path / "10-broken.conflist").write_text(json.dumps({"cniVersion": "1.0.0"}))
    done = _install(tmp_path)
    assert done.returncode == 1 and "no plugins list" in done.stderr
    assert "Traceback" not in done.stderr
