"""The cluster CA server (``trellis ca serve``) and its client.

Public surface:

* ``ca.entries`` — registration entries and selectors (pure values; the agent
  matches workloads against them): ``Selector``, ``parse_selector``, ``RegistrationEntry``,
  ``EntrySet``, ``EntrySource``, ``StaticEntrySource``, ``YamlFileEntrySource``,
  ``parse_entries``, ``parse_entries_yaml``, ``load_entries_file``, ``EntryError``.
* ``ca.server.client`` — ``CaClient`` (what the node agent uses), ``AgentIdentity``,
  ``BundleUpdate``, ``JwtSvidToken``, ``CaError``, ``build_csr``.
* ``ca.server.federation`` — the ``--federation`` document (``parse_federation``,
  ``load_federation_file``, ``FederationRelationship``) and fetching foreign bundles over
  https_spiffe (``fetch_bundle``, ``FederationFetcher``, ``FetchError``).
* ``ca.server.bans`` — the ``--banned-agents`` list (``parse_ban_list``, ``load_ban_list``,
  ``write_ban_list``, ``BanListFile``, ``BanListError``); ``trellis ca ban``/``unban``.
* ``ca.server.wire`` — conversions between these values and the ``trellis.ca.v1`` messages.
* ``ca.server.service`` / ``ca.server.app`` — the gRPC service and the process around it.

The wire API is ``trellis.ca.v1`` (``ca/proto/trellis/ca/v1/ca.proto``); the generated code
in ``ca.server._proto`` is rebuilt by ``scripts/gen-protos.sh``.
"""
