"""The ``trellis`` command line: one console script whose subcommands live with their packages."""
