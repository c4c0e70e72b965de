"""Peer security with real daemons: only cluster members reach the peer service (every
method, from the service descriptor); joining needs the right token. No client
certificate, an unknown certificate, plaintext, a wrong or missing token: all refused."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from castore._proto import peer_pb2 as pp
from castore._proto import peer_pb2_grpc as ppg
from castore.identity import JoinToken, load_or_create
from castore.rpc.peer_client import channel_options
from cluster_helpers import CASTORE, Peer, cli, env_for, free_port

pytestmark = pytest.mark.timeout(120)
METHODS = pp.DESCRIPTOR.services_by_name["Peer"].methods


def _every_method(channel: grpc.Channel) -> list[Any]:
    """Call every Peer method with an empty message; returns the status codes."""
    codes = []
    for m in METHODS:
        path = f"/castore.v1.Peer/{m.name}"
        try:
            if m.client_streaming:
                channel.stream_unary(path)(iter([b""]), timeout=5)
            elif m.server_streaming:
                list(channel.unary_stream(path)(b"", timeout=5))
            else:
                channel.unary_unary(path)(b"", timeout=5)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


@pytest.fixture
def seed(tmp_path: Path) -> Any:
    p = Peer("p0", tmp_path / "p0", free_port(), ["--redundancy", "2"])
    p.start()
    try:
        f = tmp_path / "secret.bin"
        f.write_bytes(b"castore secret data " * 1000)
        cli(p.home, "add", str(f))
        yield p
    finally:
        p.stop()


def _state(p: Peer) -> dict[str, Any]:
    return dict(json.loads((p.home / "daemon.json").read_text()))


def test_plaintext_no_cert_and_unknown_cert_get_nothing(seed: Peer, tmp_path: Path) -> None:
    addr = _state(seed)["listen"]
    server_cert = (seed.home / "peer" / "cert.pem").read_bytes()
    stranger = load_or_create(tmp_path / "stranger")
    channels = {
        "plaintext": grpc.insecure_channel(addr),
        "no client certificate": grpc.secure_channel(
            addr, grpc.ssl_channel_credentials(root_certificates=server_cert),
            options=channel_options(1 << 20)),
        "unknown certificate": grpc.secure_channel(
            addr, grpc.ssl_channel_credentials(root_certificates=server_cert,
                                               private_key=stranger.key_pem,
                                               certificate_chain=stranger.cert_pem),
            options=channel_options(1 << 20)),
    }
    for what, ch in channels.items():
        codes = _every_method(ch)
        assert all(c == grpc.StatusCode.UNAVAILABLE for c in codes), (what, codes)
        ch.close()
    assert len(json.loads(cli(seed.home, "peers", "--json").stdout)["peers"]) == 1


def _enrol_stub(seed: Peer) -> Any:
    enrol = _state(seed)["enrol"]
    cert = (seed.home / "peer" / "cert.pem").read_bytes()
    ch = grpc.secure_channel(enrol, grpc.ssl_channel_credentials(root_certificates=cert),
                             options=channel_options(1 << 20))
    return ppg.EnrolStub(ch), ch


def test_enrolment_refuses_a_missing_or_wrong_proof_and_replayed_nonces(
        seed: Peer, tmp_path: Path) -> None:
    stub, ch = _enrol_stub(seed)
    me = load_or_create(tmp_path / "joiner")
    try:
        nonce = stub.GetChallenge(pp.ChallengeRequest(), timeout=5).nonce
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pp.JoinRequest(cert_pem=me.cert_pem, nonce=nonce, proof=b""), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:       # the nonce was used up
            stub.Join(pp.JoinRequest(cert_pem=me.cert_pem, nonce=nonce, proof=b"x" * 32),
                      timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()
    assert len(json.loads(cli(seed.home, "peers", "--json").stdout)["peers"]) == 1


def _try_join(tmp_path: Path, name: str, token: str) -> subprocess.CompletedProcess[str]:
    home = tmp_path / name
    return subprocess.run(CASTORE + ["daemon", "--home", str(home), "--listen",
                                     f"127.0.0.1:{free_port()}", "--token", token],
                          capture_output=True, text=True, env=env_for(), timeout=60)


def test_a_wrong_token_or_a_wrong_seed_fingerprint_is_refused(seed: Peer,
                                                              tmp_path: Path) -> None:
    good = JoinToken.decode(cli(seed.home, "invite").stdout)
    wrong_secret = JoinToken("00" * 32, good.enrol_addr, good.fingerprint).encode()
    proc = _try_join(tmp_path, "j1", wrong_secret)
    assert proc.returncode != 0 and "wrong join token" in proc.stderr
    wrong_seed = JoinToken(good.secret, good.enrol_addr, "11" * 32).encode()
    proc = _try_join(tmp_path, "j2", wrong_seed)
    assert proc.returncode != 0 and "fingerprint mismatch" in proc.stderr
    proc = _try_join(tmp_path, "j3", "castore1-garbage")
    assert proc.returncode != 0 and "token" in proc.stderr
    assert len(json.loads(cli(seed.home, "peers", "--json").stdout)["peers"]) == 1
