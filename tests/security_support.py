"""Helpers of the security and fault tests (test_auth, test_limits, test_faults, test_fuzz_requests):
a throw-away PKI made at test time with `cryptography` (no private key is ever committed), token
minting, and servers started with a security setup. Fixtures stay in the test modules."""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_PEM = serialization.Encoding.PEM


def _key():
    # P-256: fast to generate (RSA-2048 would add ~0.1 s per certificate to every test).
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: str, name: str) -> tuple[str, str]:
        """(cert path, key path) under directory, the key readable by its owner only."""
        cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
        with open(cert, "wb") as fh:
            fh.write(self.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.key_pem)
        return cert, key


class CA:
    """A certificate authority of its own, issuing server and client certificates."""

    def __init__(self, name: str = "tracecode test CA"):
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_pem = self.cert.public_bytes(_PEM)

    def write(self, directory: str, name: str = "ca") -> str:
        path = os.path.join(directory, f"{name}.crt")
        with open(path, "wb") as fh:
            fh.write(self.cert_pem)
        return path

    def issue(self, common_name: str, *, uris: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), server: bool = False, valid_days: float = 1,
              not_before_days: float = 0) -> Issued:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(days=not_before_days) - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=valid_days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(_PEM), _key_pem(key))

    def server_cert(self) -> Issued:
        return self.issue("tracecode test server", dns=("localhost",), ips=("127.0.0.1",), server=True)


@dataclass
class PKI:
    """Files of one test deployment: the CA, the server's certificate, and a directory for more."""
    directory: str
    ca: CA
    ca_path: str
    server_cert: str
    server_key: str

    @classmethod
    def create(cls, directory: str) -> "PKI":
        os.makedirs(directory, exist_ok=True)
        ca = CA()
        cert, key = ca.server_cert().write(directory, "server")
        return cls(directory, ca, ca.write(directory), cert, key)

    def client(self, common_name: str, **kw) -> tuple[bytes, bytes]:
        """(key PEM, cert PEM) of a client certificate from this PKI's CA."""
        issued = self.ca.issue(common_name, **kw)
        return issued.key_pem, issued.cert_pem


def channel_credentials(pki: PKI, client: tuple[bytes, bytes] | None = None):
    import grpc
    key, cert = client if client else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem, private_key=key,
                                        certificate_chain=cert)


class SecuredRedis:
    """A redis-server of the test's own behind an ACL user and/or TLS (the embedded RedisProcess
    has neither: it listens on a unix socket only its user can open). `url` carries no secret;
    `client_url` is what a client that holds the secrets would use."""

    def __init__(self, directory: str, port: int, *, user: str | None = None, password: str | None = None,
                 tls: "PKI | None" = None, tls_client_auth: bool = False):
        import shutil
        self.directory, self.port, self.user, self.password = directory, port, user, password
        self.tls, self.proc = tls, None
        os.makedirs(directory, exist_ok=True)
        argv = [shutil.which("redis-server"), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
                "--appendonly", "no", "--logfile", os.path.join(directory, "redis.log")]
        if tls:
            # Only the TLS port listens: a plain-text client has nothing to connect to.
            self.redis_cert, self.redis_key = tls.ca.server_cert().write(directory, "redis")
            self.client_cert, self.client_key = tls.ca.issue("tracecode", server=False).write(directory, "redis-client")
            argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.redis_cert,
                     "--tls-key-file", self.redis_key, "--tls-ca-cert-file", tls.ca_path,
                     "--tls-auth-clients", "yes" if tls_client_auth else "no"]
        else:
            argv += ["--port", str(port)]
        if user:
            # The default user is switched off: only the named user with its password gets in.
            argv += ["--user", "default", "off", "--user", user, "on", f">{password}", "~*", "&*", "+@all"]
        elif password:
            argv += ["--requirepass", password]
        self.argv = argv

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "SecuredRedis":
        import subprocess
        import time
        import redis
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kw = {}
        if self.tls:
            kw = dict(ssl_ca_certs=self.tls.ca_path, ssl_certfile=self.client_cert, ssl_keyfile=self.client_key)
        client = redis.Redis.from_url(self.url, username=self.user, password=self.password,
                                      socket_timeout=1, **kw)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, OSError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"secured redis-server did not start; see {self.directory}/redis.log")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
