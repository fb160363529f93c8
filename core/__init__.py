"""What every Trellis process shares, below everything else in the tree.

Nothing here knows about identities, TLS or Kubernetes objects; every other package may
import it, and it imports none of them (the import-linter contracts in ``pyproject.toml``
say so and ``make lint`` checks it).

* ``core.errors`` -- ``CliError`` (a reason a command line prints as one line),
  ``FieldError`` (a value at a named place in a document is wrong), and ``yaml_problem`` /
  ``one_line`` to keep a library's multi-line message on one line.
* ``core.durations`` -- ``parse_duration`` / ``format_duration``: the one duration syntax
  (a bare number is seconds; ``500ms``, ``90s``, ``1h30m``, ``48h``), printed as it is typed.
* ``core.endpoints`` -- ``parse_unix_socket``: ``unix:///path`` (as ``SPIFFE_ENDPOINT_SOCKET``
  writes it) or a bare path, for every socket flag.
* ``core.cliargs`` -- ``argument_type``: a value parser as an argparse ``type=`` whose
  refusal is argparse's one-line error; ``duration``, ``seconds``, ``unix_socket``.
* ``core.listeners`` -- ``ensure_bindable``: a busy port refused in one line before start-up.
* ``core.buildinfo`` -- the version and source revision (``trellis --version``) and the
  ``trellis_build_info`` gauge every metrics registry carries.
* ``core.logs`` -- one log format for every long-running process (JSON lines, or text on a
  terminal) and the ``--log-format`` / ``--log-level`` flags that choose it.
* ``core.eventloop`` -- ``install_uvloop`` and ``settle_heap`` for long-running servers.
* ``core.labels`` -- the Kubernetes label grammar and label selectors as frozen values.
"""
