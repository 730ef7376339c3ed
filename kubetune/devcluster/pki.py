"""Certificates and keys for one control plane, generated at start-up.

One CA signs the API server's serving certificate and a client certificate
per component; the API server trusts the CA for client authentication
(`--client-ca-file`). Users and groups come from the certificate subject
(CN = user, O = group), which is how RBAC sees them. ECDSA P-256 keys keep
start-up fast (RSA key generation costs about a second each on a slow core).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=7)


@dataclass(frozen=True)
class ClientIdentity:
    """A user the API server authenticates by client certificate."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


# Bootstrap RBAC binds these names to the components' own ClusterRoles.
ADMIN = ClientIdentity("admin", "kubetune:admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("kube-controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("kube-scheduler", "system:kube-scheduler")
# kwok patches node and pod status and deletes pods of any namespace.
KWOK = ClientIdentity("kwok", "kubetune:kwok", ("system:masters",))
# The API server's identity towards aggregated API servers (front proxy).
FRONT_PROXY = ClientIdentity("front-proxy-client", "front-proxy-client")
# Kueue authenticates as its in-cluster ServiceAccount would (same user name and
# groups), so the RBAC installed from Kueue's own manifests is what authorizes it.
KUEUE = ClientIdentity(
    "kueue",
    "system:serviceaccount:kueue-system:kueue-controller-manager",
    ("system:serviceaccounts", "system:serviceaccounts:kueue-system"),
)
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, KWOK, FRONT_PROXY, KUEUE)


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files written by `write_pki`."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def service_account_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def service_account_pub(self) -> Path:
        return self.directory / "sa.pub"

    def client_cert(self, who: ClientIdentity) -> Path:
        return self.directory / f"{who.file_stem}.crt"

    def client_key(self, who: ClientIdentity) -> Path:
        return self.directory / f"{who.file_stem}.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime, validity: datetime.timedelta = _VALIDITY
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # Backdated a little: the components may judge the clock differently by a second.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
    )


def serving_sans(service_ip: str) -> list[x509.GeneralName]:
    """Names clients use for the API server: loopback, and the in-cluster service names."""
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
    ips = ["127.0.0.1", service_ip]
    return [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]


def write_pki(directory: Path, service_ip: str) -> Pki:
    """Generate the CA, the serving and client certificates and the service-account key."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = _key()
    ca_name = _name("kubetune-devcluster-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(pki.ca_key, _key_pem(ca_key), private=True)
    _write(pki.ca_cert, _cert_pem(ca_cert))

    def leaf(subject: x509.Name, usage, sans=None) -> tuple[bytes, bytes]:
        key = _key()
        builder = _builder(subject, ca_name, key.public_key(), now).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _cert_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key)

    cert, key = leaf(_name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, serving_sans(service_ip))
    _write(pki.serving_cert, cert)
    _write(pki.serving_key, key, private=True)

    for who in CLIENTS:
        cert, key = leaf(_name(who.user, who.groups), ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(pki.client_cert(who), cert)
        _write(pki.client_key(who), key, private=True)

    sa_key = _key()
    _write(pki.service_account_key, _key_pem(sa_key), private=True)
    _write(
        pki.service_account_pub,
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return pki


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


@dataclass(frozen=True)
class WebhookPki:
    """PEM bytes of a webhook server's own CA and serving certificate."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def webhook_pki(ca_name: str, dns_names: list[str], ip_addresses: list[str], validity_days: int = 365) -> WebhookPki:
    """A CA and a serving certificate for an add-on's webhook server, kept apart
    from the cluster CA (whose key mints cluster-admin client certificates).

    RSA keys in PKCS#1 PEM and a CA that names itself in a DNS SAN: this is
    the shape open-policy-agent/cert-controller (Kueue's certificate rotator)
    writes and accepts; given anything else it throws the pair away and
    generates its own, whose certificate lacks the loopback address. A year of
    validity: the rotator replaces certificates expiring within 90 days.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = datetime.timedelta(days=validity_days)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_subject = _name(ca_name, (ca_name,))
    ca_cert = (
        _builder(ca_subject, ca_subject, ca_key.public_key(), now, validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=False, content_commitment=False,
                key_encipherment=True, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ca_name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans = [x509.DNSName(d) for d in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    cert = (
        _builder(_name(dns_names[0]), ca_subject, key.public_key(), now, validity)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return WebhookPki(_cert_pem(ca_cert), _rsa_pem(ca_key), _cert_pem(cert), _rsa_pem(key))


def _rsa_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
