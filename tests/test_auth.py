"""Authenticated pharmacies and admin separation over real TLS (a PKI made at test time), real gRPC
and real Redis: mutual TLS and bearer-token identities, the site taken from the credentials, the
per-method policy, certificate rotation, the client CLI's security flags, and Redis behind an ACL
user and TLS."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.api import auth
from tracecode.server.api.server import SERVICE_NAMES
from tracecode.server.app import Server, make_store
from tracecode.server.store import free_port
from tracecode.v1 import bulk_pb2, bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, issuance, load
from helpers import event_types, verdicts
from security_support import CA, PKI, SecuredRedis, channel_credentials

# Authentication, TLS and Redis credentials sit in front of the store: run on one backend.
pytestmark = pytest.mark.backend_independent

P = "8123456"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI.create(str(tmp_path_factory.mktemp("pki")))


class Deployment:
    """A server started with security settings, and clients holding given identities."""

    def __init__(self, config, store, pki: PKI | None, **settings):
        self.config = config.replace(**settings)
        self.pki = pki
        security = auth.from_config(self.config)
        self.server = Server(self.config, store, **security.server_kwargs()).start()
        # "localhost": the name the server certificate is issued for (127.0.0.1 is in it too).
        self.target = f"localhost:{self.server.port}"
        self.clients = []
        self.secret = b""

    def creds(self, common_name: str | None, **kw):
        return channel_credentials(self.pki, self.pki.client(common_name, **kw) if common_name else None)

    def pos(self, common_name: str | None = None, *, credentials=None, metadata=(), **kw) -> PosClient:
        if credentials is None and self.pki is not None:
            credentials = self.creds(common_name, **kw)
        c = PosClient(self.target, credentials=credentials, metadata=metadata, deadline_s=5, retries=0)
        self.clients.append(c)
        return c

    def admin(self, common_name: str | None = None, *, metadata=()) -> AdminClient:
        credentials = self.creds(common_name) if self.pki is not None else None
        c = AdminClient(self.target, credentials=credentials, metadata=metadata, timeout_s=5)
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            c.close()
        self.server.stop(0)


@pytest.fixture
def mtls(config, store, pki):
    d = Deployment(config, store, pki, auth="mtls", tls_cert=pki.server_cert, tls_key=pki.server_key,
                   tls_client_ca=pki.ca_path, admin_identities="ops1,ops2")
    yield d
    d.close()


SECRET = b"0123456789abcdef0123456789abcdef-test-secret"


@pytest.fixture
def token(config, store, tmp_path):
    secret_file = tmp_path / "token.secret"
    secret_file.write_bytes(SECRET + b"\n")
    d = Deployment(config, store, None, auth="token", auth_token_secret_file=str(secret_file))
    d.target = f"127.0.0.1:{d.server.port}"
    yield d
    d.close()


def bearer(role: str, name: str, ttl_s: float = 300, secret: bytes = SECRET) -> tuple:
    return (("authorization", f"Bearer {auth.issue_token(secret, role, name, ttl_s)}"),)


def code_of(err: pytest.ExceptionInfo) -> grpc.StatusCode:
    return err.value.code()


# --------------------------------------------------------------------------- mutual TLS

def test_site_comes_from_the_certificate_and_marks_under_it(mtls):
    code = cn20()
    load(mtls.admin("admin:ops1"), issuance(code, P))
    pos = mtls.pos("site:PHARM-A")
    resp = pos.verify("", [line(code, P)], settlement_id="s-1")  # body names no site
    assert verdicts(resp) == ["OK"] and resp.site_id == "PHARM-A"
    hist = pos.history(code)
    assert event_types(hist) == ["DISPENSED"] and hist.events[0].site_id == "PHARM-A"
    # The same body naming its own site is accepted too (idempotent replay of the same settlement
    # would need the same body: here a new one).
    again = pos.verify("PHARM-A", [line(cn20(), P)], settlement_id="s-2")
    assert again.site_id == "PHARM-A"


def test_body_naming_another_site_is_permission_denied_and_marks_nothing(mtls):
    code = cn20()
    load(mtls.admin("admin:ops1"), issuance(code, P))
    pos = mtls.pos("site:PHARM-A")
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("PHARM-B", [line(code, P)], settlement_id="s-1")
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    assert "PHARM-A" in err.value.details() and "PHARM-B" in err.value.details()
    hist = pos.history(code)
    assert hist.units_used == 0 and event_types(hist) == []
    # The site B itself can still sell the pack: nothing was marked in its name.
    assert verdicts(mtls.pos("site:PHARM-B").verify("", [line(code, P)], settlement_id="s-1")) == ["OK"]


def test_pharmacy_a_cannot_reverse_pharmacy_b_settlement(mtls):
    code = cn20()
    load(mtls.admin("admin:ops1"), issuance(code, P, pack_units=10))
    b, a = mtls.pos("site:PHARM-B"), mtls.pos("site:PHARM-A")
    assert verdicts(b.verify("", [line(code, P, 4)], settlement_id="sale-1")) == ["OK"]
    # Naming B in the body: refused outright.
    with pytest.raises(grpc.RpcError) as err:
        a.reverse("PHARM-B", "sale-1")
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    # Naming no site: A's own settlement "sale-1" does not exist, B's is out of its reach.
    with pytest.raises(grpc.RpcError) as err:
        a.reverse("", "sale-1")
    assert code_of(err) == grpc.StatusCode.NOT_FOUND
    hist = b.history(code)
    assert hist.units_used == 4 and "REVERSED" not in event_types(hist)
    # B reverses its own settlement.
    back = b.reverse("", "sale-1")
    assert [ln.units_returned for ln in back.lines] == [4]
    assert b.history(code).units_used == 0


@pytest.mark.parametrize("who", ["nobody", "foreign-ca", "expired"])
def test_clients_without_a_valid_certificate_cannot_even_connect(mtls, who):
    if who == "nobody":
        creds = channel_credentials(mtls.pki)  # TLS, but no client certificate
    elif who == "foreign-ca":
        other = CA("another CA")
        issued = other.issue("site:PHARM-A")
        creds = grpc.ssl_channel_credentials(mtls.pki.ca.cert_pem, issued.key_pem, issued.cert_pem)
    else:
        creds = mtls.creds("site:PHARM-A", not_before_days=-2, valid_days=-1)
    pos = mtls.pos(credentials=creds)
    with pytest.raises(grpc.RpcError) as err:
        pos.check([line(cn20(), P)])
    # The TLS handshake is refused before any RPC exists: gRPC reports the transport failure.
    assert code_of(err) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_port(mtls):
    with PosClient(f"127.0.0.1:{mtls.server.port}", deadline_s=3, retries=0) as pos:
        with pytest.raises(grpc.RpcError) as err:
            pos.check([line(cn20(), P)])
    assert code_of(err) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cn,kw", [
    ("Pharmacy 12 POS", {}),  # a CA-signed certificate that names no tracecode identity
    ("site:", {}),  # empty site id
    ("site:PHARM A", {}),  # site id outside the alphabet
    ("operator:ops1", {}),  # unknown role
    ("site:PHARM-A", {"uris": ("urn:tracecode:site:PHARM-B",)}),  # two identities
    ("site:PHARM-A", {"uris": ("urn:tracecode:admin:ops1",)}),  # a site that also claims admin
])
def test_certificate_without_one_clear_identity_is_unauthenticated(mtls, cn, kw):
    pos = mtls.pos(cn, **kw)
    with pytest.raises(grpc.RpcError) as err:
        pos.check([line(cn20(), P)])
    assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        pos.history(cn20())
    assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED


def test_identity_in_a_san_uri(mtls):
    code = cn20()
    load(mtls.admin("admin:ops1"), issuance(code, P))
    pos = mtls.pos("POS terminal 7", uris=("urn:tracecode:site:PHARM-U", "spiffe://example/pos7"))
    assert pos.verify("", [line(code, P)]).site_id == "PHARM-U"
    # CN and SAN naming the same identity agree: accepted.
    agreeing = mtls.pos("site:PHARM-U", uris=("urn:tracecode:site:PHARM-U",))
    other = cn20()
    load(mtls.admin("admin:ops1"), issuance(other, P))
    assert agreeing.verify("", [line(other, P)]).site_id == "PHARM-U"


def test_site_identity_cannot_load_recall_or_run_bulk_jobs(mtls):
    code = cn20()
    site_admin = mtls.admin("site:PHARM-A")
    calls = {
        "upsert": lambda: site_admin.upsert([issuance(code, P)], source="t"),
        "status": lambda: site_admin.set_status(code, "ACTIVE"),
        "recall": lambda: site_admin.recall(P, "B1"),
        "get": lambda: site_admin.get(code),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED, name
    bulk = bulk_pb2_grpc.BulkVerificationStub(site_admin.channel)
    with pytest.raises(grpc.RpcError) as err:
        list(bulk.Reverify(iter([bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(
            job_id="j1", mode=bulk_pb2.CHECK))]), timeout=5))
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        bulk.DropJob(bulk_pb2.DropJobRequest(job_id="j1"), timeout=5)
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing was issued by the refused upload.
    with pytest.raises(grpc.RpcError) as err:
        mtls.admin("admin:ops1").get(code)
    assert code_of(err) == grpc.StatusCode.NOT_FOUND


def test_admin_loads_and_recalls_and_is_named_in_the_history(mtls):
    code = cn20()
    ops = mtls.admin("admin:ops2")
    load(ops, issuance(code, P, batch="B7"))
    assert ops.recall(P, "B7").codes_changed == 1
    hist = mtls.pos("site:PHARM-A").history(code)
    assert event_types(hist)[-1] == "STATUS_CHANGED"
    assert hist.events[-1].site_id == "admin:ops2"  # the actor comes from the certificate
    bulk = bulk_pb2_grpc.BulkVerificationStub(ops.channel)
    assert bulk.DropJob(bulk_pb2.DropJobRequest(job_id="j1"), timeout=5).keys_deleted == 0
    # A bulk job (a streaming handler: the identity must reach it too) runs for the admin.
    chunk = bulk_pb2.SettlementChunk(chunk_seq=7, settlements=[bulk_pb2.BulkSettlement(
        site_id="PHARM-A", settlement_id="h-1", settled_at=pb.VerifyDispenseRequest().settled_at,
        lines=[pb.DispenseLine(raw_code=code, product_id=P)])])
    out = list(bulk.Reverify(iter([
        bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(job_id="j1", mode=bulk_pb2.CHECK)),
        bulk_pb2.ReverifyRequest(chunk=chunk), bulk_pb2.ReverifyRequest(finish=bulk_pb2.Finish())]), timeout=10))
    assert [r.chunk_seq for r in out] == [7] and out[0].results[0].results[0].verdict == pb.BLOCKED


def test_admin_outside_admin_identities_is_denied(mtls):
    mallory = mtls.admin("admin:mallory")  # signed by the CA, but not on the operators' list
    with pytest.raises(grpc.RpcError) as err:
        mallory.recall(P, "B1")
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    assert "admin_identities" in err.value.details()


def test_admin_may_check_and_read_history_but_not_dispense_or_reverse(mtls):
    code = cn20()
    load(mtls.admin("admin:ops1"), issuance(code, P))
    ops = mtls.pos("admin:ops1")
    assert ops.check([line(code, P)], site_id="PHARM-A").results[0].verdict == pb.OK
    assert ops.history(code).canonical_code == code
    for call in (lambda: ops.verify("PHARM-A", [line(code, P)]), lambda: ops.reverse("PHARM-A", "s-1")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    assert ops.history(code).units_used == 0


def test_health_is_public_reflection_is_not(mtls):
    # Health needs a TLS connection (the port speaks nothing else) but no identity inside it.
    channel = grpc.secure_channel(mtls.target, mtls.creds("POS without identity"))
    try:
        # Redis is up, so the answer must become SERVING (the health watch and the sanction view
        # set it within a moment of the server's start; NOT_SERVING may come before that).
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while (status := stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status) \
                != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()


def test_every_method_served_has_a_policy():
    from google.protobuf import descriptor_pool
    pool = descriptor_pool.Default()
    for service in SERVICE_NAMES:
        for m in pool.FindServiceByName(service).methods:
            roles = auth.roles_for(f"/{service}/{m.name}")
            assert roles and roles is not auth.PUBLIC, m.full_name
    assert auth.roles_for("/tracecode.v1.Verification/VerifyDispense") == {auth.SITE}
    assert auth.roles_for("/tracecode.v1.Verification/ReverseDispense") == {auth.SITE}
    assert auth.roles_for("/some.new.Service/Method") == frozenset()  # closed until decided


def test_server_certificate_and_client_ca_are_reloaded_without_restart(config, store, tmp_path):
    first = PKI.create(str(tmp_path / "one"))
    d = Deployment(config, store, first, auth="mtls", tls_cert=first.server_cert, tls_key=first.server_key,
                   tls_client_ca=first.ca_path)
    try:
        assert verdicts(d.pos("site:ROT-1").check([line(cn20(), P)])) == ["UNKNOWN"]
        # Rotate to a new CA: new server certificate and new client CA, written in place.
        second = CA("rotated CA")
        issued = second.server_cert()
        time.sleep(0.01)  # a different mtime even on coarse file systems
        with open(first.server_key, "wb") as fh:
            fh.write(issued.key_pem)
        with open(first.server_cert, "wb") as fh:
            fh.write(issued.cert_pem)
        with open(first.ca_path, "wb") as fh:
            fh.write(second.cert_pem)
        new = second.issue("site:ROT-1")
        pos = d.pos(credentials=grpc.ssl_channel_credentials(second.cert_pem, new.key_pem, new.cert_pem))
        assert verdicts(pos.check([line(cn20(), P)])) == ["UNKNOWN"]
        old = d.pos("site:ROT-1")  # old CA's client certificate, trusting the old server CA
        with pytest.raises(grpc.RpcError) as err:
            old.check([line(cn20(), P)])
        assert code_of(err) == grpc.StatusCode.UNAVAILABLE
    finally:
        d.close()


# --------------------------------------------------------------------------- bearer tokens

def test_token_site_identity_marks_under_its_site(token):
    code = cn20()
    load(token.admin(metadata=bearer("admin", "ops1")), issuance(code, P))
    pos = token.pos(metadata=bearer("site", "PHARM-T"))
    resp = pos.verify("", [line(code, P)], settlement_id="t-1")
    assert resp.site_id == "PHARM-T" and verdicts(resp) == ["OK"]
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("PHARM-X", [line(cn20(), P)])
    assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED


def _forged(claims: dict, key=SECRET, alg="HS256", headers=None) -> tuple:
    return (("authorization", "Bearer " + jwt.encode(claims, key, algorithm=alg, headers=headers)),)


@pytest.mark.parametrize("case", ["missing", "not-bearer", "garbage", "wrong-secret", "expired", "alg-none",
                                  "no-exp", "wrong-audience", "bad-role", "bad-sub", "two-headers"])
def test_invalid_tokens_are_unauthenticated(token, case):
    now = int(time.time())
    good = {"sub": "PHARM-T", "role": "site", "aud": "tracecode", "exp": now + 300}
    md = {
        "missing": (),
        "not-bearer": (("authorization", "Basic dXNlcjpwYXNz"),),
        "garbage": (("authorization", "Bearer not.a.token"),),
        "wrong-secret": bearer("site", "PHARM-T", secret=b"x" * 40),
        "expired": _forged({**good, "exp": now - 120}),
        "alg-none": (("authorization", "Bearer " + jwt.encode(good, None, algorithm="none")),),
        "no-exp": _forged({k: v for k, v in good.items() if k != "exp"}),
        "wrong-audience": _forged({**good, "aud": "another-service"}),
        "bad-role": _forged({**good, "role": "superuser"}),
        "bad-sub": _forged({**good, "sub": "PHARM T/../x"}),
        "two-headers": bearer("site", "PHARM-T") + bearer("site", "PHARM-U"),
    }[case]
    pos = token.pos(metadata=md)
    with pytest.raises(grpc.RpcError) as err:
        pos.check([line(cn20(), P)])
    assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED, err.value.details()


def test_token_site_cannot_load_or_recall_admin_can(token):
    code = cn20()
    site = token.admin(metadata=bearer("site", "PHARM-T"))
    for call in (lambda: site.upsert([issuance(code, P)], source="t"), lambda: site.recall(P, "B1"),
                 lambda: site.set_status(code, "LOCKED")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code_of(err) == grpc.StatusCode.PERMISSION_DENIED
    ops = token.admin(metadata=bearer("admin", "ops9"))
    load(ops, issuance(code, P))
    assert ops.set_status(code, "LOCKED").previous == pb.ACTIVE
    # Unauthenticated upload: refused before a record is read.
    anon = token.admin()
    with pytest.raises(grpc.RpcError) as err:
        anon.upsert([issuance(cn20(), P)], source="t")
    assert code_of(err) == grpc.StatusCode.UNAUTHENTICATED


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("settings,message", [
    ({"auth": "kerberos"}, "not one of"),
    ({"auth": "mtls"}, "needs tls_cert"),
    ({"auth": "token"}, "needs auth_token_secret_file"),
    ({"auth": "none", "tls_client_ca": "ca.pem"}, "only used with auth = mtls"),
    ({"tls_cert": "x.pem"}, "go together"),
    ({"auth": "none", "admin_identities": "ops 1"}, "admin_identities"),
])
def test_security_misconfiguration_is_refused_at_start(config, settings, message):
    with pytest.raises(ValueError, match=message):
        auth.from_config(config.replace(**settings))


def test_short_token_secret_is_refused(config, tmp_path):
    f = tmp_path / "short"
    f.write_bytes(b"password")
    with pytest.raises(ValueError, match="at least 32"):
        auth.from_config(config.replace(auth="token", auth_token_secret_file=str(f)))


def test_plaintext_mode_warns(config):
    assert auth.INSECURE_WARNING in auth.from_config(config.replace(auth="none")).warnings
    assert auth.from_config(config.replace(auth="none")).identity is None


# --------------------------------------------------------------------------- the CLI, end to end

def _cli(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracecode.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_serve_with_mtls_and_the_cli_client_flags(redis_server, pki, tmp_path):
    from ops_support import ServeProcess
    args = ["--listen", "127.0.0.1:0", "--redis-url", redis_server.url, "--metrics-port", "0",
            "--key-prefix", f"cli{os.getpid()}", "--auth", "mtls", "--tls-cert", pki.server_cert,
            "--tls-key", pki.server_key, "--tls-client-ca", pki.ca_path]
    if redis_server.cluster:
        args.append("--redis-cluster")
    served = ServeProcess(args, str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        key, cert = pki.client("site:CLI-A")
        (tmp_path / "a.key").write_bytes(key)
        (tmp_path / "a.crt").write_bytes(cert)
        key, cert = pki.client("admin:ops1")
        (tmp_path / "o.key").write_bytes(key)
        (tmp_path / "o.crt").write_bytes(cert)
        server = ["--server", f"localhost:{served.port}", "--tls-ca", pki.ca_path]
        code = cn20()
        (tmp_path / "issuance.csv").write_text(f"code,product_id\n{code},{P}\n")
        out = _cli("load", str(tmp_path / "issuance.csv"), *server, "--tls-cert", str(tmp_path / "o.crt"),
                   "--tls-key", str(tmp_path / "o.key"))
        assert out.returncode == 0 and "created=1" in out.stdout, out.stderr
        as_site = [*server, "--tls-cert", str(tmp_path / "a.crt"), "--tls-key", str(tmp_path / "a.key")]
        out = _cli("verify", code, "--site", "CLI-A", "--product", P, *as_site)
        assert out.returncode == 0 and "at site CLI-A: recorded" in out.stdout, out.stdout + out.stderr
        out = _cli("verify", cn20(), "--site", "CLI-B", "--product", P, *as_site)
        assert out.returncode == 2 and "PERMISSION_DENIED" in out.stderr
        out = _cli("recall", "--product", P, "--batch", "B1", *as_site)
        assert out.returncode == 2 and "PERMISSION_DENIED" in out.stderr
        assert "INSECURE" not in served.log()
    finally:
        served.close()


def test_token_command_and_token_file(token, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    out = _cli("token", "--secret-file", str(secret), "--role", "site", "--name", "CLI-T", "--ttl-days", "1")
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"], audience="tracecode")
    assert claims["sub"] == "CLI-T" and claims["role"] == "site"
    assert 86000 < claims["exp"] - time.time() <= 86400
    (tmp_path / "t").write_text(out.stdout)
    code = cn20()
    load(token.admin(metadata=bearer("admin", "ops1")), issuance(code, P))
    out = _cli("verify", code, "--site", "CLI-T", "--product", P, "--server", token.target,
               "--token-file", str(tmp_path / "t"))
    assert out.returncode == 0 and "at site CLI-T: recorded" in out.stdout, out.stdout + out.stderr


def test_serve_refuses_bad_security_settings_with_a_message():
    out = _cli("serve", "--auth", "mtls", "--listen", "127.0.0.1:0", "--metrics-port", "0")
    assert out.returncode == 2 and "needs tls_cert, tls_key and tls_client_ca" in out.stderr


# --------------------------------------------------------------------------- Redis credentials

def _dispense_through(config, url: str) -> list[str]:
    store = make_store(config, auth.redis_url(config, url))
    server = Server(config, store).start()
    try:
        code = cn20()
        target = f"127.0.0.1:{server.port}"
        admin = AdminClient(target, timeout_s=5)
        load(admin, issuance(code, P))
        admin.close()
        with PosClient(target, deadline_s=5, retries=0) as pos:
            return verdicts(pos.verify("R-SITE", [line(code, P)]))
    finally:
        server.stop(0)
        store.close()


def test_redis_acl_user_with_password_file(config, tmp_path):
    redis = SecuredRedis(str(tmp_path / "r"), free_port(), user="tracecode", password="s3cret:/@pw").start()
    try:
        pw = tmp_path / "redis.pw"
        pw.write_text("s3cret:/@pw\n")  # URL-special characters: must be quoted into the URL
        cfg = config.replace(redis_cluster=False, redis_username="tracecode", redis_password_file=str(pw))
        assert _dispense_through(cfg, redis.url) == ["OK"]
        assert "s3cret" not in redis.url
        # Without the password the server runs but every call is UNAVAILABLE (never a verdict).
        wrong = config.replace(redis_cluster=False, redis_timeout_s=0.5)
        store = make_store(wrong, redis.url)
        server = Server(wrong, store).start()
        try:
            with PosClient(f"127.0.0.1:{server.port}", deadline_s=5, retries=0) as pos:
                with pytest.raises(grpc.RpcError) as err:
                    pos.check([line(cn20(), P)])
            assert code_of(err) == grpc.StatusCode.UNAVAILABLE
        finally:
            server.stop(0)
            store.close()
    finally:
        redis.stop()


def test_redis_over_tls_with_client_certificate(config, pki, tmp_path):
    redis = SecuredRedis(str(tmp_path / "r"), free_port(), tls=pki, tls_client_auth=True).start()
    try:
        cfg = config.replace(redis_cluster=False, redis_tls_ca=pki.ca_path, redis_tls_cert=redis.client_cert,
                             redis_tls_key=redis.client_key)
        assert _dispense_through(cfg, redis.url) == ["OK"]
        with pytest.raises(ValueError, match="rediss://"):
            auth.redis_url(cfg, f"redis://127.0.0.1:{redis.port}/0")
    finally:
        redis.stop()


def test_redis_url_building():
    from tracecode.server.config import Config
    c = Config(redis_username="u ser", redis_tls_ca="/ca.pem")
    assert auth.redis_url(c, "rediss://h:7000/2") == "rediss://u%20ser:@h:7000/2?ssl_ca_certs=%2Fca.pem"
    assert auth.redis_url(Config(), "redis://h:1/0") == "redis://h:1/0"  # nothing set: unchanged


@pytest.fixture
def acl_server(config, tmp_path):
    """A server over a Redis of its own behind the ACL user `tracecode` (password "pw"), which
    the test may change at run time through the returned store: (server, store)."""
    redis = SecuredRedis(str(tmp_path / "r"), free_port(), user="tracecode", password="pw").start()
    pw = tmp_path / "redis.pw"
    pw.write_text("pw\n")
    cfg = config.replace(redis_cluster=False, redis_username="tracecode", redis_password_file=str(pw))
    store = make_store(cfg, auth.redis_url(cfg, redis.url))
    server = Server(cfg, store).start()
    yield server, store
    server.stop(0)
    store.close()
    redis.stop()


def test_redis_acl_without_script_rights_is_internal_logged_not_leaked(acl_server, caplog):
    """An operator's mistake, not the pharmacy's: a Redis user that may not run scripts. The POS
    gets INTERNAL with a fixed message (no Redis text), the log gets the traceback."""
    server, store = acl_server
    store.r.acl_setuser("tracecode", commands=["-evalsha", "-eval"])
    with PosClient(f"127.0.0.1:{server.port}", deadline_s=5, retries=0) as pos, \
            caplog.at_level(logging.ERROR, logger="tracecode"):
        with pytest.raises(grpc.RpcError) as err:
            pos.verify("ACL-SITE", [line(cn20(), P)], settlement_id="acl-1")
    assert code_of(err) == grpc.StatusCode.INTERNAL
    assert "NOPERM" not in err.value.details() and "evalsha" not in err.value.details().lower()
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "evalsha" in str(logged[0].exc_info[1]).lower()


def test_health_follows_a_redis_acl_that_stops_allowing_ping(acl_server):
    """The health watch outlives any error of its ping, not only "unreachable": an ACL change
    that denies PING turns the server NOT_SERVING (it cannot tell Redis is fine), and allowing it
    again turns it back to SERVING, without a restart."""
    from ops_support import wait_for
    server, store = acl_server
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status  # noqa: E731
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 5, "SERVING")
        store.r.acl_setuser("tracecode", commands=["-ping"])
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 3, "NOT_SERVING")
        store.r.acl_setuser("tracecode", commands=["+ping"])
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 3, "SERVING again")
