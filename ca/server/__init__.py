"""The cluster CA server (``trellis ca serve``).

Public surface:

* ``ca.server.app`` — ``CaServer``, ``ServerConfig``: the process (listeners, reloads,
  join-token purge, graceful stop); ``ca.server.cli`` — ``trellis ca serve``/``token``/``ban``.
* ``ca.server.service`` — ``CaService``: the decisions, on Trellis values (``ca.api.values``),
  refusing with ``Refusal``; ``ca.server.grpc_shell`` — the gRPC boundary around it.
* ``ca.server.federation`` — the ``--federation`` document (``parse_federation``,
  ``load_federation_file``, ``FederationRelationship``) and fetching foreign bundles over
  https_spiffe (``fetch_bundle``, ``FederationFetcher``, ``FetchError``).
* ``ca.server.bans`` — the ``--banned-agents`` list (``parse_ban_list``, ``load_ban_list``,
  ``write_ban_list``, ``BanListFile``, ``BanListError``); ``trellis ca ban``/``unban``.
* ``ca.server.attestation``, ``ca.server.tokens`` — node attestation and join-token files.

The wire API (``trellis.ca.v1``), its generated code and the agent's client live in
``ca.api``; registration entries in ``ca.entries``. Nothing here imports ``ca.agent``.
"""
