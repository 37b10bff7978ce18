"""The DICOM peer policy as pure decisions (issue 13.1): settings parsed from TOML, decisions without sockets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from xdsi.config import ConfigError, DimsePolicySettings, Peer, PeerRights, load_settings
from xdsi.dimse.policy import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    REJECTED_PERMANENT,
    SOURCE_SERVICE_USER,
    Caller,
    DimsePolicy,
    caller_of,
)

POLICY = """
[server]
host = "0.0.0.0"
ae_title = "ARCHIVE"
dicom_tls_port = 2762

[tls]
certificate = "node.crt"
private_key = "node.key"

[dimse]
accept_unknown_peers = false

[peers.CT1]
hosts = ["10.0.0.0/24", "192.168.7.7"]
find = false
move = false

[peers.WS1]
host = "10.0.1.5"
port = 11112
store = false
get = false
commit = false
tls_subject = "CN=ws1.example.org, O=Radiology"

[peers.RESEARCH]

[partitions.STUDYX]
ae_title = "STUDYX"
peers = ["RESEARCH"]
"""


def settings(tmp_path: Path, text: str = POLICY, **overrides: object):
    p = tmp_path / "xdsi.toml"
    p.write_text(text)
    return load_settings(p, env={}, overrides=overrides)


def policy(tmp_path: Path, text: str = POLICY) -> DimsePolicy:
    s = settings(tmp_path, text)
    partitions = {s.for_partition(n).ae_title: SimpleNamespace(settings=s.for_partition(n)) for n in s.partitions}
    return DimsePolicy.for_archives(s, partitions)


def caller(calling: str, address: str = "10.0.0.9", called: str = "ARCHIVE", subject: str | None = None) -> Caller:
    return Caller(called, calling, address, subject)


# -- settings -----------------------------------------------------------------------------------


def test_peer_tables_give_rights_hosts_and_subjects(tmp_path: Path) -> None:
    s = settings(tmp_path)
    rights = s.dimse_policy.peers
    assert rights["CT1"] == PeerRights("CT1", find=False, move=False, hosts=("10.0.0.0/24", "192.168.7.7/32"))
    assert rights["WS1"] == PeerRights("WS1", store=False, get=False, commit=False, tls_subject="CN=ws1.example.org,O=Radiology")
    assert rights["RESEARCH"] == PeerRights("RESEARCH")  # every right by default
    # only a table with host and port is an AE we open associations to (C-MOVE destination, commitment report)
    assert s.peers == {"WS1": Peer("WS1", "10.0.1.5", 11112)}
    assert s.for_partition("STUDYX").dimse_policy.own_peers == ("RESEARCH",)
    assert s.dimse_policy.own_peers is None
    assert s.dimse_policy.accept_unknown_peers is False and s.dimse_policy.accept_any_called_aet is False


def test_defaults_without_policy_keys(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    assert s.dimse_policy == DimsePolicySettings()
    assert s.dimse_policy.accepts_unknown_peers("127.0.0.1")


@pytest.mark.parametrize(
    "host,accepts",
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("imaging.example.org", False), ("", False)],
)
def test_unknown_peers_are_accepted_by_default_only_on_loopback(host: str, accepts: bool) -> None:
    assert DimsePolicySettings().accepts_unknown_peers(host) is accepts
    assert DimsePolicySettings(accept_unknown_peers=True).accepts_unknown_peers(host) is True
    assert DimsePolicySettings(accept_unknown_peers=False).accepts_unknown_peers(host) is False


def test_the_default_follows_a_host_given_on_the_command_line(tmp_path: Path) -> None:
    s = settings(tmp_path, "").with_overrides(host="0.0.0.0")
    assert DimsePolicy.for_archives(s).accept_unknown is False
    assert DimsePolicy.for_archives(settings(tmp_path, "")).accept_unknown is True


@pytest.mark.parametrize(
    "text,message",
    [
        ("[dimse]\naccept_unknown_peers = 'no'\n", r"\[dimse\] accept_unknown_peers must be true or false"),
        ("[dimse]\naccept_any_called_aet = 1\n", r"\[dimse\] accept_any_called_aet must be true or false"),
        ("[dimse]\naccept_everyone = true\n", r"unknown key\(s\) in \[dimse\]: accept_everyone"),
        ("[peers.CT1]\nstore = 'yes'\n", r"\[peers.CT1\] store must be true or false"),
        ("[peers.CT1]\nhosts = ['ct1.example.org']\n", r"\[peers.CT1\] hosts: 'ct1.example.org' is not an IP address or network"),
        ("[peers.CT1]\nhosts = []\n", r"\[peers.CT1\] hosts must be a list of addresses or networks"),
        ("[peers.CT1]\ntls_subject = 'ct1.example.org'\n", r"\[peers.CT1\] tls_subject 'ct1.example.org' is not an RFC 4514 subject"),
        ("[peers.CT1]\ntls_subject = 7\n", r"\[peers.CT1\] tls_subject must be a string"),
        ("[peers.CT1]\ntls_subject = 'CN=ct1'\n", r"\[peers.CT1\] tls_subject needs a DICOM TLS listener"),
        ("[peers.CT1]\nwrite = true\n", r"unknown key\(s\) in \[peers.CT1\]: write"),
        ("[peers.CT1]\nhost = 'ct1'\n", r"\[peers.CT1\] needs host and port"),
        ("[partitions.P]\npeers = ['NOBODY']\n", r"\[partitions.P\] peers: 'NOBODY' is not configured in \[peers\]"),
        ("[partitions.P]\npeers = 'CT1'\n", r"\[partitions.P\] peers must be a list of AE titles"),
    ],
)
def test_bad_policy_settings_are_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        settings(tmp_path, text)
    assert "\n" not in str(info.value)


def test_single_host_string_and_ipv6_networks(tmp_path: Path) -> None:
    s = settings(tmp_path, '[peers.CT1]\nhosts = "10.0.0.7"\n[peers.CT2]\nhosts = ["2001:db8::/64"]\n')
    assert s.dimse_policy.peers["CT1"].hosts == ("10.0.0.7/32",)
    assert s.dimse_policy.peers["CT2"].hosts == ("2001:db8::/64",)


# -- decisions ----------------------------------------------------------------------------------


def test_a_called_ae_title_not_served_is_rejected_reason_7(tmp_path: Path) -> None:
    d = policy(tmp_path).decide(caller("RESEARCH", called="ANY-SCP"))
    assert (d.accepted, d.result, d.source, d.diagnostic) == (False, REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLED_AE_NOT_RECOGNISED)
    assert "'ANY-SCP'" in d.reason and not d.allows("store")


def test_accept_any_called_aet_serves_it_as_the_main_ae(tmp_path: Path) -> None:
    p = policy(tmp_path, POLICY.replace("accept_unknown_peers = false", "accept_unknown_peers = false\naccept_any_called_aet = true"))
    assert p.decide(caller("RESEARCH", called="ANY-SCP")).accepted
    assert not p.decide(caller("STRANGER", called="ANY-SCP")).accepted  # the caller is still checked


def test_unknown_calling_ae_rejected_reason_3_when_unknown_peers_are_off(tmp_path: Path) -> None:
    d = policy(tmp_path).decide(caller("STORESCU"))
    assert (d.accepted, d.result, d.source, d.diagnostic) == (False, 1, 1, CALLING_AE_NOT_RECOGNISED)
    assert "'STORESCU'" in d.reason


def test_unknown_calling_ae_accepted_with_every_right_when_unknown_peers_are_on(tmp_path: Path) -> None:
    d = policy(tmp_path, POLICY.replace("accept_unknown_peers = false", "accept_unknown_peers = true")).decide(caller("STORESCU"))
    assert d.accepted and d.rights is None
    assert all(d.allows(op) for op in ("store", "find", "move", "get", "commit"))


def test_a_known_ae_only_from_its_hosts(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert p.decide(caller("CT1", "10.0.0.200")).accepted
    assert p.decide(caller("CT1", "192.168.7.7")).accepted
    assert p.decide(caller("CT1", "::ffff:10.0.0.3")).accepted  # a dual-stack listener's view of 10.0.0.3
    for address in ("10.0.1.1", "192.168.7.8", "::1", "", "not-an-address"):
        d = p.decide(caller("CT1", address))
        assert (d.accepted, d.diagnostic) == (False, CALLING_AE_NOT_RECOGNISED), address
    # with unknown peers accepted too: a known AE title from elsewhere is a stranger using a known name, not the peer
    p2 = policy(tmp_path, POLICY.replace("accept_unknown_peers = false", "accept_unknown_peers = true"))
    assert not p2.decide(caller("CT1", "10.9.9.9")).accepted


def test_a_known_ae_with_tls_subject_needs_that_certificate(tmp_path: Path) -> None:
    p = policy(tmp_path)
    ok = p.decide(caller("WS1", subject="CN=ws1.example.org,O=Radiology"))
    assert ok.accepted and ok.rights is not None and ok.rights.ae_title == "WS1"
    for subject in (None, "CN=ws2.example.org,O=Radiology", "CN=ws1.example.org"):
        d = p.decide(caller("WS1", subject=subject))
        assert (d.accepted, d.diagnostic) == (False, CALLING_AE_NOT_RECOGNISED), subject
    assert "plain DICOM" in p.decide(caller("WS1")).reason


def test_rights_per_operation(tmp_path: Path) -> None:
    p = policy(tmp_path)
    ct1 = p.decide(caller("CT1"))
    assert [ct1.allows(op) for op in ("store", "find", "move", "get", "commit")] == [True, False, False, True, True]
    ws1 = p.decide(caller("WS1", subject="CN=ws1.example.org,O=Radiology"))
    assert [ws1.allows(op) for op in ("store", "find", "move", "get", "commit")] == [False, True, True, False, False]
    with pytest.raises(ValueError):
        ws1.allows("delete")


def test_partition_only_for_its_peers(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert p.decide(caller("RESEARCH", called="STUDYX")).accepted
    d = p.decide(caller("CT1", called="STUDYX"))
    assert (d.accepted, d.diagnostic) == (False, CALLING_AE_NOT_RECOGNISED) and "'STUDYX'" in d.reason
    # the main AE title has no allow-list: every accepted peer may use it
    assert p.decide(caller("RESEARCH")).accepted and p.decide(caller("CT1")).accepted
    # an unknown peer accepted elsewhere is still not in the partition's list
    p2 = policy(tmp_path, POLICY.replace("accept_unknown_peers = false", "accept_unknown_peers = true"))
    assert p2.decide(caller("STORESCU")).accepted and not p2.decide(caller("STORESCU", called="STUDYX")).accepted


def test_a_partition_listener_serves_only_its_own_ae_title(tmp_path: Path) -> None:
    s = settings(tmp_path).for_partition("STUDYX")  # what a partition's own dicom_port listener is built from
    p = DimsePolicy.for_archives(s)
    assert p.decide(caller("RESEARCH", called="STUDYX")).accepted
    assert p.decide(caller("RESEARCH", called="ARCHIVE")).diagnostic == CALLED_AE_NOT_RECOGNISED
    assert p.decide(caller("CT1", called="STUDYX")).diagnostic == CALLING_AE_NOT_RECOGNISED


def test_ae_titles_compare_without_padding(tmp_path: Path) -> None:
    assert policy(tmp_path).decide(caller("CT1  ", called="ARCHIVE ")).accepted


def test_caller_of_reads_the_association_request() -> None:
    primitive = SimpleNamespace(called_ae_title=b"ARCHIVE         ", calling_ae_title=b"CT1             ")
    assoc = SimpleNamespace(requestor=SimpleNamespace(primitive=primitive, address="10.0.0.9"), dul=SimpleNamespace(socket=None))
    assert caller_of(assoc) == Caller("ARCHIVE", "CT1", "10.0.0.9", None)


def test_refusal_is_decided_once_per_association_and_names_the_operation(tmp_path: Path) -> None:
    p = policy(tmp_path)
    primitive = SimpleNamespace(called_ae_title="ARCHIVE", calling_ae_title="CT1")
    assoc = SimpleNamespace(requestor=SimpleNamespace(primitive=primitive, address="10.0.0.9"), dul=SimpleNamespace(socket=None))
    assert p.on_association(assoc).accepted
    assert p.refusal(assoc, "store") is None
    assert p.refusal(assoc, "find") == "CT1 is not authorised to find"
    assoc.requestor.address = "10.9.9.9"  # the decision made at association time holds for the association
    assert p.refusal(assoc, "store") is None


def test_describe_says_who_is_accepted(tmp_path: Path) -> None:
    assert policy(tmp_path).describe() == "accepting only the 3 AE title(s) in [peers], called AE title(s) ARCHIVE, STUDYX"
    s = settings(tmp_path, "[dimse]\naccept_any_called_aet = true\n")
    assert DimsePolicy.for_archives(s).describe() == "accepting any calling AE title, any called AE title"


def test_certificate_subject_of_a_plain_unconnected_or_closed_socket_is_none() -> None:
    import socket
    import ssl

    from xdsi.security.tls import certificate_subject

    assert certificate_subject(None) is None
    with socket.socket() as plain:
        assert certificate_subject(plain) is None
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False)
    assert certificate_subject(tls) is None  # no handshake yet
    tls.close()
    assert certificate_subject(tls) is None  # closed
