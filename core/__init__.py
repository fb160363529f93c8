"""What every Trellis process shares, below everything else in the tree.

Nothing here knows about identities, TLS or Kubernetes objects; every other package may
import it, and it imports none of them (the import-linter contracts in ``pyproject.toml``
say so and ``make lint`` checks it).

* ``core.errors`` -- ``CliError`` (a reason a command line prints as one line) and
  ``FieldError`` (a value at a named place in a document is wrong).
* ``core.durations`` -- ``parse_duration`` / ``format_duration``: ``90s``, ``5m``, ``720h``.
* ``core.logs`` -- one log format for every long-running process (JSON lines, or text on a
  terminal) and the ``--log-format`` / ``--log-level`` flags that choose it.
* ``core.eventloop`` -- ``install_uvloop`` and ``settle_heap`` for long-running servers.
* ``core.labels`` -- the Kubernetes label grammar and label selectors as frozen values.
"""
