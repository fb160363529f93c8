"""Trellis data plane: the sidecar (`trellis sidecar`).

`sidecar.tls` is Trellis's own sans-I/O TLS 1.3 engine (see its module docstring). The
rest terminates and originates mutual TLS for one workload: app connections become
HTTP/2 CONNECT streams (HBONE-style) pooled onto few TLS connections, and inbound
streams are authorised by the caller's SPIFFE ID before a byte reaches the app.

Command line (stable; the injector and `trellis up` depend on it)
----------------------------------------------------------------
::

    trellis sidecar [--config FILE] [--mode explicit|transparent]
                    [--inbound-port 15008] [--outbound-port 15001] [--admin-port 15000|off]
                    [--health-port 15020|off] [--listen-host 0.0.0.0] [--app-ports 8080,...]
                    [--policy policy.json] [--pod-labels FILE]
                    [--upstreams SERVICE:PORT=LOCAL,...] [--svid-dir DIR]
                    [--workload-api-socket unix:///path] [--spiffe-id ID]
                    [--drain-timeout SECONDS] [--log-level warning]
                    [--log-format auto|json|text] [--access-log on|off]
    trellis sidecar iptables --proxy-uid 1337 [--outbound-port 15001] [--inbound-port 15008]
                    [--exclude-inbound-ports 15000,...] [--exclude-outbound-ports ...]
                    [--exclude-outbound-ip-ranges CIDR,...]
                    [--include-outbound-ip-ranges CIDR,...|*] [--no-inbound-capture]
                    [--ipv6 auto|on|off] [--dry-run]

Flags override the YAML file (`sidecar.config` documents every key). Identity comes from
the Workload API (`$SPIFFE_ENDPOINT_SOCKET` or `--workload-api-socket`; `--spiffe-id`
picks one SVID when the agent offers several) or, for local tests, `--svid-dir` (svid.pem
leaf+intermediate, svid.key, bundle.pem). `--upstreams svc.ns:8080=9001` binds
127.0.0.1:9001 and sends each connection to svc.ns's sidecar (svc.ns:<inbound port>) as
`CONNECT svc.ns:8080`, accepting any peer of our own trust domain. Transparent mode
listens on 127.0.0.1:<outbound port> and [::1]:<outbound port> and reads SO_ORIGINAL_DST
(after `trellis sidecar iptables`, which installs the same rules with iptables and, when
it is installed, ip6tables: `--ipv6 auto|on|off`); the stream goes to <original
IP>:<inbound port> with `:authority` = the original destination. Its inbound listener
also takes the IPv6 twin of its address (`::` for 0.0.0.0, `::1` for 127.0.0.1); a host
without IPv6 gets a warning and IPv4 alone. Inbound forwards only to declared ports: a
CONNECT to host:PORT goes to 127.0.0.1:PORT when `--app-ports` lists PORT (the injector
passes the pod's TCP containerPorts), or to the YAML `inbound.targets.PORT.app`; any
other port is refused with 404, whoever the caller, so the sidecar is never a proxy to
the rest of the pod or node. A target on one of the sidecar's own ports (admin, health,
inbound, outbound, an upstream listener) is a configuration error. A bad flag or config
value exits 1 with one line naming the field. Start-up prints one JSON line
`{"event": "ready-to-serve", "inbound": ..., "admin": ..., "health": ..., "outbound": ...,
"upstreams": {name: addr}}` on stdout once listening.

Policy: YAML `inbound.targets.PORT.allow` ([{exact: ID} | {prefix: ID}]) plus the
operator's `--policy` document filtered by `--pod-labels` (reloaded when either file
changes). A declared port no rule covers admits any caller of our own trust domain; an
empty allow list refuses everyone. Refusal = HTTP/2 403 on that stream (never a silent
drop) with `trellis-policy-rule` naming what refused (`AccessPolicy NAME`, or
`inbound.targets.PORT.allow`); an undeclared port is 404 before any policy. The caller's
sidecar resets its app's connection, unless the refusing policy says `protocol: http`:
then the app gets an HTTP/1.1 `403 Forbidden` whose body names the rule.

Logs (`core.logs`): JSON lines on stderr unless it is a terminal (`--log-format`). The
access log (`sidecar.access`, `--access-log on` by default) is one line per stream:
direction, peer SPIFFE ID, port or authority, status, outcome, policy rule, reason, bytes
each way, duration. Allowed streams log at INFO, denials at WARNING, so they show at the
default `--log-level warning`; `--access-log off` keeps only the denials.

Permissive mode (`mtls: PERMISSIVE` on a selecting policy, transparent mode only): the
inbound listener reads the first bytes; a TLS record goes to mTLS and the policy as
above, anything else is forwarded to the declared target at the port the caller dialled
(SO_ORIGINAL_DST) and counted. A port is permissive only when no applicable policy says
`STRICT`; strict is the default. An explicit-mode sidecar logs a warning and stays strict.

Outbound passthrough (transparent mode): when the `--policy` document carries a `mesh`
section (`meshapi.registry`: the networks the operator knows to be in the mesh and
`outboundTrafficPolicy`), a destination outside those networks is not a CONNECT: under
`ALLOW_ANY` (the default) the sidecar dials the original destination itself and splices
the bytes unchanged, under `REGISTRY_ONLY` it resets the app's connection; both are
counted. A document without `mesh` keeps every destination in the mesh. Reloaded live
with the rest of the document. The iptables plan's `--exclude-outbound-ip-ranges` never
reach the sidecar at all; `--include-outbound-ip-ranges` redirects only those ranges.

Resumption and 0-RTT: pooled connections offer a session ticket the peer issued before
(one use each, per endpoint and expected SPIFFE ID, all dropped when the trust bundles
change); a server sends tickets only while it holds its service's STEK ring from the
agent. A fresh connection to a destination known to speak HTTP (an upstream's YAML
`protocol: http`, or a peer whose 200 said `trellis-app-protocol: http`) carries the
app's first request in 0-RTT when it is GET, HEAD or OPTIONS without a body
(`sidecar.earlydata`). The receiving sidecar forwards such requests at once with
`Early-Data: 1` and answers anything else in early data `425 Too Early` (RFC 8470), which
the calling sidecar retries once its handshake is complete; the app never sees a 425.

Admin (aiohttp, `--admin-port`, 127.0.0.1 only) and health (`--health-port`)
---------------------------------------------------------------------------
The admin listener binds a loopback address (a YAML `admin` elsewhere is refused): it
serves `/config` without authentication. The health listener, off unless configured
(the injector uses 15020 on the pod's address), serves `/metrics`, `/healthz` and
`/readyz` only; any other path there is 404.

* `GET /healthz` — 200 while the process runs.
* `GET /readyz` — 200 once an unexpired SVID and a bundle are held and listeners are
  bound; 503 with the reason otherwise, and while draining (SIGTERM).
* `GET /config` — JSON: identity (SPIFFE ID, SVID serial and notAfter, bundles by trust
  domain with root serials), listeners, upstreams, inbound targets + policy, pools (per
  endpoint: connections, streams, dials, last error), Workload API status; each pooled
  and inbound connection's `data_path` (`user-space` or `ktls`) and each direct
  connection's (`user-space` or `ktls+splice`).
* `GET /metrics` — Prometheus text, the sidecar's own registry:

  - the public metric contract: `tls_handshake_duration_seconds` (histogram),
    `tls_resumption_total{kind="psk|ticket|none"}`, `tls_version_total{version}`,
    `tls_cipher_suite_total{suite}`, `tls_group_total{group}`,
    `tls_early_data_total{outcome="accepted|rejected"}`,
    `tls_ech_total{outcome="accepted|rejected|grease"}` (accepted counted by the serving
    sidecar, rejected and grease by the caller), `tls_ocsp_staple_total{outcome="not_applicable"}`.
  - `trellis_sidecar_tls_handshakes_total{direction="inbound|outbound"}`,
    `trellis_sidecar_tls_handshake_failures_total{direction,reason}`,
    `trellis_sidecar_app_connections_total{direction}` (handshakes per app connection =
    the ratio of the two outbound counters),
    `trellis_sidecar_pool_connections`, `trellis_sidecar_inbound_connections`,
    `trellis_sidecar_streams_active{direction}`,
    `trellis_sidecar_streams_total{direction,outcome="ok|reset|refused|error|retried"}`,
    `trellis_sidecar_bytes_total{direction="in|out"}` (in: mesh → app),
    `trellis_sidecar_policy_decisions_total{decision="allow|deny"}`,
    `trellis_sidecar_connect_requests_rejected_total{status}` (CONNECTs refused before
    policy: 400/405 malformed, 404 for a port that is not a declared target),
    `trellis_sidecar_plaintext_accepted_total{port}` (callers without TLS forwarded to
    the app's port in permissive mode),
    `trellis_sidecar_passthrough_total{outcome="forwarded|refused|unreachable"}`
    (transparent outbound connections to destinations outside the mesh registry:
    spliced to the original destination, reset under REGISTRY_ONLY, or not answering),
    `trellis_sidecar_plaintext_refused_total{reason="strict|undeclared_port|
    no_original_destination|app_unreachable"}` (closed before any byte reached an app),
    `trellis_sidecar_early_data_requests_total{decision="served|too_early"}` (HTTP
    requests read from 0-RTT data on a port declared HTTP: `sidecar.earlydata`),
    `trellis_sidecar_connections_closed_by_us_total{reason="protocol_error|abuse|
    peer_not_reading|keepalive_timeout|peer_certificate_expired|
    local_certificate_expired|trust_bundle_changed|identity_withdrawn|record_limit"}`
    (the last five drain rather than cut: see Credentials below; record_limit is a kTLS
    connection retired before it could need a KeyUpdate the kernel cannot follow),
    `trellis_ktls_enabled{direction="inbound|outbound"}` (1 when that direction hands
    records to the kernel), `trellis_ktls_fallback_total{reason}` (connections kept in
    the user-space record layer), `trellis_ktls_key_update_closes_total`,
    `trellis_sidecar_svid_expiry_timestamp_seconds`, `trellis_sidecar_svid_updates_total`.

Pooling (YAML `pool`): one pool per (endpoint, expected SPIFFE IDs); at most
`max_streams_per_connection` (100) streams per TLS connection, a new connection only when
every live one is full and dials in flight cannot absorb the waiting streams; idle
connections close after `idle_timeout` (60 s); a PING after `keepalive_interval` (20 s) of
silence, dead if unanswered within `keepalive_timeout` (10 s); GOAWAY stops new streams
and lets open ones finish; a stream whose connection died before any of its bytes was sent
is retried (twice at most) on a fresh connection. Flow control: 1 MiB stream window,
16 MiB connection window, data acknowledged only while the app socket accepts writes.

Credentials: no TLS connection, pooled or inbound, takes new streams past the earliest
notAfter of the chains that authenticated it (the peer's and our own, leaf and
intermediate). At that time (outbound: 1 s before) it sends GOAWAY and takes no new
streams -- the pool dials a fresh connection with the current SVID, the inbound side
answers REFUSED_STREAM -- and its streams in flight get `--drain-timeout` to finish
before it closes. The same happens when a bundle update means the peer's chain no longer
verifies (its root was removed), and when our SVID is withdrawn (the Workload API answers
PERMISSION_DENIED or stops offering it); the sidecar is then not ready until it gets one.

SIGTERM/SIGINT: /readyz → 503, listeners close, every TLS connection gets GOAWAY, open
streams finish up to `--drain-timeout` (default 10 s), then exit 0.

Modules: `config` (YAML/flags → frozen values), `policy` (authorisation), `hbone`
(CONNECT parsing), `identity` (SVIDs, bundles, Workload API), `channel` (the TLS layer
under HTTP/2, swappable for kTLS), `h2tunnel` (HTTP/2 for CONNECT streams, sans-I/O),
`session` (one TLS + HTTP/2 connection), `bridge` (app socket ↔ stream), `direct`
(upstreams in `mode: direct`: one TLS connection per app connection), `ktls` and
`offload` (the kernel's record layer, and where the data paths switch to it), `permissive`
(the TLS sniff and the plaintext relay), `pool`
(outbound pools), `inbound`, `outbound`, `admin`, `metrics`, `runtime` (wiring, drain),
`iptables`, `cli`.
"""
