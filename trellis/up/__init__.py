"""``trellis up``: the whole mesh on one machine, as real processes, with a live status.

* ``mesh`` — ``Mesh`` / ``MeshConfig``: start the CA server, agent, demo services and
  their sidecars in a private run directory; stop them all and remove it.
* ``identity`` — the ephemeral authorities (root in memory only), per-workload
  executables, registration entries.
* ``processes`` — child processes that cannot outlive ``trellis up``.
* ``status`` — scrape the processes' ``/metrics`` and ``/config``; render the status.
* ``cli`` — the ``up`` subcommand.
"""

from trellis.up.mesh import Mesh, MeshConfig, StartupError

__all__ = ["Mesh", "MeshConfig", "StartupError"]
