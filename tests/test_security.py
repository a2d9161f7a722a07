"""TLS / mTLS on real sockets, enrolment tokens (hashed, single-device, revocable while serving),
plaintext only on request, and refusal counts in `edge-coordinator status`."""
import json
import sqlite3

import grpc
import pytest
import torch

from coordinator.cli import main as coordinator_main
from coordinator.security import channel_credentials, generate_dev_pki, server_credentials
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from protos import federation_pb2 as pb
from test_reliability_support import SimDevice, tiny_model
from waiting import wait_until

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("sec"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return generate_dev_pki(tmp_path_factory.mktemp("pki"), clients=["dev0"])


def _serve(model, store, creds=None, **kw):
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(store), strategy="zero_pad", rounds=3,
                                      min_devices=1, max_rank=4, **kw))
    server, port = create_server("127.0.0.1:0", c, credentials=creds)
    server.start()
    return c, server, port


def _code(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code()


def _refusal(fn):
    """The status code fn's call is refused with, or None while it is still accepted."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return None


def _wait_refused(fn, what: str):
    """Wait (revocations reach a running coordinator within its 1 s cache period) for fn to be refused."""
    return wait_until(lambda: _refusal(fn), timeout=30, interval=0.05, what=what)


def test_mutual_tls_round_trip_and_refusals(model, pki, tmp_path):
    c, server, port = _serve(model, tmp_path / "store",
                             server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert))
    target = f"localhost:{port}"
    try:
        cert, key = pki.clients["dev0"]
        dev = SimDevice(target, "dev0", credentials=channel_credentials(pki.ca_cert, cert, key))
        reply = dev.register()
        t = dev.wait_task()
        state = dev.download_state(t)
        assert dev.upload(t, dev.update_bytes(state, seed=1)).accepted
        assert reply.assigned_rank == 4
        # no client certificate -> the TLS handshake fails; plaintext -> no connection either
        no_cert = SimDevice(target, "x", credentials=channel_credentials(pki.ca_cert))
        assert _code(no_cert.register) == grpc.StatusCode.UNAVAILABLE
        plain = SimDevice(target, "y")
        assert _code(plain.register) == grpc.StatusCode.UNAVAILABLE
        other = generate_dev_pki(tmp_path / "other", clients=["evil"])  # certificate from another CA
        ecert, ekey = other.clients["evil"]
        evil = SimDevice(target, "evil", credentials=channel_credentials(pki.ca_cert, ecert, ekey))
        assert _code(evil.register) == grpc.StatusCode.UNAVAILABLE
        for d in (dev, no_cert, plain, evil):
            d.close()
    finally:
        server.stop(0)
        c.close()


def test_server_only_tls(model, pki, tmp_path):
    c, server, port = _serve(model, tmp_path / "store", server_credentials(pki.server_cert, pki.server_key))
    try:
        dev = SimDevice(f"127.0.0.1:{port}", "d", credentials=channel_credentials(pki.ca_cert))
        assert dev.register().device_token
        dev.close()
    finally:
        server.stop(0)
        c.close()


def test_enrolment_tokens_hashed_single_device_and_revocable(model, tmp_path, capsys):
    store = tmp_path / "store"
    c, server, port = _serve(model, store, open_enrolment=False)
    target = f"127.0.0.1:{port}"
    try:
        assert coordinator_main(["enrol", "--store", str(store), "--count", "2", "--json"]) == 0
        tokens = json.loads(capsys.readouterr().out)["tokens"]
        assert len(tokens) == 2 and all(t.startswith("et_") for t in tokens)
        raw = b"".join(f.read_bytes() for f in store.glob("coordinator.sqlite*"))
        assert not any(t.split(".", 1)[1].encode() in raw for t in tokens)  # only hashes are stored

        assert _code(SimDevice(target, "anon").register) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(SimDevice(target, "bad", enrolment_token=tokens[0][:-2] + "xx").register) == \
            grpc.StatusCode.UNAUTHENTICATED
        a = SimDevice(target, "alice", enrolment_token=tokens[0])
        ra = a.register()
        assert a.register().device_id == ra.device_id  # restart: same token re-enrols the same device
        thief = SimDevice(target, "mallory", enrolment_token=tokens[0])
        assert thief.register().device_id == ra.device_id  # the token only ever enrols alice...
        assert _code(SimDevice(target, "alice", enrolment_token=tokens[1]).register) == \
            grpc.StatusCode.UNAUTHENTICATED  # ...and alice's name cannot be taken with another token
        a.client.token = thief.client.token
        a.client.get_task()

        # revoke alice's device while the coordinator runs: every call is refused within the cache period
        assert coordinator_main(["enrol", "--store", str(store), "--revoke", ra.device_id]) == 0
        assert _wait_refused(a.client.get_task, "alice's revoked device to be refused") == \
            grpc.StatusCode.PERMISSION_DENIED
        assert _code(a.register) == grpc.StatusCode.PERMISSION_DENIED
        b = SimDevice(target, "bob", enrolment_token=tokens[1])
        b.register()
        assert coordinator_main(["enrol", "--store", str(store), "--revoke", tokens[1].split(".")[0]]) == 0
        assert _wait_refused(b.client.heartbeat, "bob's device (revoked token) to be refused") == \
            grpc.StatusCode.PERMISSION_DENIED
        assert _code(SimDevice(target, "x", enrolment_token="et_nope.nope").register) == \
            grpc.StatusCode.UNAUTHENTICATED
        capsys.readouterr()
    finally:
        server.stop(0)
        c.close()
    assert coordinator_main(["status", "--store", str(store), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    print("\nrefusals:", s["rejections"], "enrolment:", s["enrolment"])
    rej = s["rejections"]
    assert rej["permission_denied"] >= 3 and rej["unauthenticated"] >= 2 and rej["enrolment"] >= 2
    assert s["enrolment"] == {"tokens": 2, "bound": 2, "revoked": 2}
    assert coordinator_main(["status", "--store", str(store)]) == 0
    assert "refused requests" in capsys.readouterr().out


def test_serve_requires_tls_or_insecure(model, tmp_path, pki, capsys):
    base = ["serve", "--model", str(model), "--store", str(tmp_path / "s"), "--port", "0"]
    assert coordinator_main(base) == 2
    assert "--insecure" in capsys.readouterr().err
    assert coordinator_main(base + ["--insecure", "--tls-cert", str(pki.server_cert),
                                    "--tls-key", str(pki.server_key)]) == 2
    assert coordinator_main(base + ["--dp-noise", "1.0", "--insecure"]) == 2  # DP needs --clip-norm
    assert "--clip-norm" in capsys.readouterr().err


def test_certs_command(tmp_path, capsys):
    assert coordinator_main(["certs", "--out", str(tmp_path), "--host", "coord.local", "--host", "10.0.0.5",
                             "--client", "jetson-1"]) == 0
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.local" in sans.get_values_for_type(x509.DNSName)
    assert (tmp_path / "client-jetson-1.key").stat().st_mode & 0o077 == 0  # private keys are 0600
    assert "--client-ca" in capsys.readouterr().out


def test_rejections_are_counted_durably(model, tmp_path):
    c, server, port = _serve(model, tmp_path / "store")
    try:
        dev = SimDevice(f"127.0.0.1:{port}", "d")
        dev.register()
        t = dev.wait_task()
        state = dev.download_state(t)
        bad = dict(state)
        k = next(iter(bad))
        bad[k] = bad[k].clone()
        bad[k].view(-1)[0] = float("nan")
        from protos import wire

        assert _code(lambda: dev.upload(t, wire.encode_tensors(bad))) == grpc.StatusCode.INVALID_ARGUMENT
        t2 = pb.Task()
        t2.CopyFrom(t)
        t2.nonce = "0" * 32
        assert _code(lambda: dev.upload(t2, dev.update_bytes(state, 1))) == grpc.StatusCode.FAILED_PRECONDITION
        counts = c.rejections.counts()
        assert counts.get("non_finite") == 1 and counts.get("replay") == 1, counts
        assert any(e.get("reason") == "non_finite" for e in c.store.events("upload_rejected"))
        dev.close()
    finally:
        server.stop(0)
        c.close()
