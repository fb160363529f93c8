"""Banned agents: the file, its reloads, and what a banned node's agent gets over gRPC.

The server runs in-process on the test's loop with a real ``--banned-agents`` file; the
agents are real ``CaClient``s over mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ca import KeyAlgorithm, generate_private_key
from ca.api import CaClient, CaError, build_csr
from ca.server.app import CaServer
from ca.server.attestation import is_node_name
from ca.server.bans import (
    MAX_BAN_FILE_BYTES,
    BanListError,
    BanListFile,
    load_ban_list,
    parse_ban_list,
    write_ban_list,
)
from trellis.cli import main

from .conftest import attested, client_for, eventually, run, server_config, serving

REJECTED = "trellis_ca_requests_rejected_total"


def banned_count(server: CaServer) -> float:
    return server.metrics.value(REJECTED, reason="agent-banned")


# -- the file ---------------------------------------------------------------------------------


def test_a_list_of_node_names_parses_and_an_empty_file_bans_nobody() -> None:
    assert parse_ban_list("- node-a\n- worker-1.example\n") == {"node-a", "worker-1.example"}
    assert parse_ban_list("") == frozenset()
    assert parse_ban_list("[]") == frozenset()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- [unclosed\n", "not YAML (line"),
        ("node-a\n", "must be a YAML list of node names"),
        ("{banned: [node-a]}\n", "must be a YAML list of node names"),
        ("- node-a\n- 17\n", "[1]: 17 is not a node name"),
        ("- ../etc\n", "[0]: '../etc' is not a node name"),
        ("- 'node a'\n", "[0]: 'node a' is not a node name"),
        ("- " + "a" * 300 + "\n", "[0]: 'aaaa"),
        ("- null\n", "[0]: None is not a node name"),
    ],
)
def test_a_bad_ban_list_is_one_error_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(BanListError) as info:
        parse_ban_list(text, "bans.yaml")
    message = str(info.value)
    assert message.startswith("bans.yaml: ") and problem in message
    assert "\n" not in message


def test_an_oversized_or_binary_or_missing_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("- node-a\n" * (MAX_BAN_FILE_BYTES // 9 + 1))
    with pytest.raises(BanListError, match="larger than"):
        load_ban_list(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"- \xff\xfe\n")
    with pytest.raises(BanListError, match="not UTF-8"):
        load_ban_list(binary)
    with pytest.raises(BanListError, match="cannot read"):
        load_ban_list(tmp_path / "absent.yaml")


def test_a_bad_reload_keeps_the_previous_list_and_a_good_one_replaces_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bans.yaml"
    write_ban_list(path, frozenset({"node-a"}))
    bans = BanListFile(path)
    assert bans.current() == {"node-a"}
    path.write_text("- node-a\n- bad/name\n")
    error = bans.refresh()
    assert isinstance(error, BanListError) and "bad/name" in str(error)
    assert bans.current() == {"node-a"}
    path.unlink()
    assert isinstance(bans.refresh(), BanListError)
    assert bans.current() == {"node-a"}
    write_ban_list(path, frozenset({"node-b"}))
    assert bans.refresh() is None and bans.current() == {"node-b"}


# Node names the YAML reader takes for something else when written bare: ints in every base
# YAML 1.1 knows, floats, bools, nulls and dates.
MISREAD_BARE = [
    "123", "017", "0x10", "0b101", "1_000", "1.5", "10.0", "0.25",
    "null", "Null", "NULL", "true", "True", "FALSE", "yes", "No", "on", "OFF",
    "2024-01-01",
]  # fmt: skip
# Numbers or bools to other YAML versions (1.2, or 1.1's y/n), strings to this reader.
ODD_BUT_READ_AS_STRINGS = ["1e3", "0o17", "y", "n"]
YAML_LOOKALIKES = MISREAD_BARE + ODD_BUT_READ_AS_STRINGS


def test_the_lookalikes_are_node_names_and_the_reader_misreads_them_bare() -> None:
    # Without this the round-trip tests below could pass with every name written bare.
    assert all(is_node_name(node) for node in YAML_LOOKALIKES)
    for node in MISREAD_BARE:
        assert yaml.safe_load(f"- {node}\n") != [node], node
        with pytest.raises(BanListError, match="is not a node name"):
            parse_ban_list(f"- {node}\n")


@pytest.mark.parametrize("node", YAML_LOOKALIKES)
def test_a_number_bool_null_or_date_shaped_node_name_reads_back_as_itself(
    tmp_path: Path, node: str
) -> None:
    path = tmp_path / "bans.yaml"
    write_ban_list(path, frozenset({node, "node-a"}))
    assert load_ban_list(path) == {node, "node-a"}
    assert BanListFile(path).current() == {node, "node-a"}


def test_every_lookalike_at_once_round_trips_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "bans.yaml"
    write_ban_list(path, frozenset({"node-a"}))
    bans = BanListFile(path)
    write_ban_list(path, frozenset(YAML_LOOKALIKES))
    assert bans.refresh() is None
    assert bans.current() == frozenset(YAML_LOOKALIKES)


_NODE_NAMES = st.one_of(
    st.sampled_from(YAML_LOOKALIKES),
    # Number-, date- and bool-shaped names are where YAML's implicit types live.
    st.from_regex(r"[0-9][-0-9_.eExXoObB]{0,10}[0-9a-fA-F]", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,30}[A-Za-z0-9])?", fullmatch=True),
).filter(is_node_name)


@settings(max_examples=300, deadline=None)
@given(st.frozensets(_NODE_NAMES, max_size=8))
def test_any_set_of_node_names_round_trips_through_the_file(nodes: frozenset[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:  # a fixture's would span the examples
        path = Path(directory) / "bans.yaml"
        write_ban_list(path, nodes)
        assert load_ban_list(path) == nodes


def test_ban_and_unban_on_the_command_line_keep_lookalike_names_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "banned.yaml"
    for node in YAML_LOOKALIKES:
        assert main(["ca", "ban", node, "--file", str(path)]) == 0
    assert load_ban_list(path) == frozenset(YAML_LOOKALIKES)
    # The CLI reads the file back before each edit: an unban must find the name it wrote.
    assert main(["ca", "unban", "123", "--file", str(path)]) == 0
    assert main(["ca", "ban", "node-a", "--file", str(path)]) == 0
    assert load_ban_list(path) == (frozenset(YAML_LOOKALIKES) - {"123"}) | {"node-a"}
    for node in YAML_LOOKALIKES:
        assert main(["ca", "unban", node, "--file", str(path)]) == 0
    assert load_ban_list(path) == {"node-a"}
    out = capsys.readouterr()
    assert out.err == ""
    assert "123: not banned; " in out.out


# -- over gRPC --------------------------------------------------------------------------------


def _bans(tmp_path: Path, *nodes: str) -> Path:
    path = tmp_path / "banned.yaml"
    write_ban_list(path, frozenset(nodes))
    return path


async def _every_call_fails(client: CaClient, code: str) -> None:
    csr = build_csr(generate_private_key(KeyAlgorithm.P256))
    calls = [
        client.renew(),
        client.batch_sign_csrs([("web", csr)]),
        client.new_jwt_svid("web", ["db"]),
        client.fetch_entries(),
    ]
    for call in calls:
        with pytest.raises(CaError) as info:
            await call
        assert info.value.code == code and not info.value.retryable
    with pytest.raises(CaError) as info:
        async for _ in client.watch_bundle():
            pass
    assert info.value.code == code


def test_a_banned_agent_is_refused_every_call_counted_and_logged_without_secrets(
    ca_dir: Path, entries_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bans = _bans(tmp_path)

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            banned = await attested(server, "node-a")
            other = await attested(server, "node-b")
            await banned.fetch_entries()  # cached authentication must not outlive a ban
            write_ban_list(bans, frozenset({"node-a"}))
            await eventually(lambda: server.service.is_banned("node-a"))
            with caplog.at_level(logging.INFO, logger="trellis"):
                await _every_call_fails(banned, "PERMISSION_DENIED")
            assert banned_count(server) == 5
            assert len((await other.fetch_entries()).entries) == 2  # node-b is untouched
            await banned.close()
            await other.close()

    run(scenario())
    refusals = [r for r in caplog.records if r.getMessage() == "request-refused"]
    assert len(refusals) == 5
    assert {r.fields["reason"] for r in refusals} == {"agent-banned"}  # type: ignore[attr-defined]
    text = "\n".join(str(r.__dict__) for r in caplog.records)
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text


def test_a_ban_ends_a_running_bundle_watch_and_an_unban_restores_service(
    ca_dir: Path, entries_file: Path, tmp_path: Path
) -> None:
    bans = _bans(tmp_path)

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            client = await attested(server, "node-a")
            other = await attested(server, "node-b")
            first = asyncio.Event()

            async def watch(c: CaClient) -> None:
                async for _ in c.watch_bundle():
                    first.set()

            watcher = asyncio.create_task(watch(client))
            bystander = asyncio.create_task(watch(other))
            await first.wait()
            write_ban_list(bans, frozenset({"node-a"}))
            with pytest.raises(CaError) as info:
                await asyncio.wait_for(watcher, 10)
            assert info.value.code == "PERMISSION_DENIED"
            assert not bystander.done()  # the poke does not end other agents' streams
            write_ban_list(bans, frozenset())
            await eventually(lambda: not server.service.is_banned("node-a"))
            # Same agent SVID, same process: no restart, no new attestation.
            assert len((await client.fetch_entries()).entries) == 2
            await client.renew()
            bystander.cancel()
            await client.close()
            await other.close()

    run(scenario())


def test_a_banned_node_cannot_attest_with_a_join_token(
    ca_dir: Path, entries_file: Path, tmp_path: Path
) -> None:
    bans = _bans(tmp_path, "node-a")

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            token = server.join_tokens.issue("node-a", now=time.time(), ttl=600)
            with pytest.raises(CaError) as info:
                await client_for(server).attest_with_join_token(token)
            assert info.value.code == "PERMISSION_DENIED"
            assert banned_count(server) == 1
            # A forged token still reads as forged: the ban is told only after the proof.
            with pytest.raises(CaError) as info:
                await client_for(server).attest_with_join_token("forged-token")
            assert info.value.code == "UNAUTHENTICATED"
            assert banned_count(server) == 1

    run(scenario())


def test_a_broken_ban_list_on_reload_keeps_the_bans_in_force(
    ca_dir: Path, entries_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bans = _bans(tmp_path, "node-a")

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            client = await attested(server, "node-b")
            bans.write_text("- node-a\n- not a node\n")
            with caplog.at_level(logging.ERROR, logger="trellis"):
                await eventually(
                    lambda: any(
                        r.getMessage() == "banned-agents-reload-failed" for r in caplog.records
                    )
                )
            assert server.service.is_banned("node-a")
            await client.fetch_entries()
            await client.close()

    run(scenario())


def test_the_server_does_not_start_on_a_bad_ban_list(ca_dir: Path, tmp_path: Path) -> None:
    bans = tmp_path / "banned.yaml"
    bans.write_text("banned: node-a\n")
    with pytest.raises(BanListError, match="must be a YAML list"):
        CaServer(replace(server_config(ca_dir), banned_agents_path=bans))
