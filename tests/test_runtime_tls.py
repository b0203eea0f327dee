"""Mutual TLS between stages and clients (`--tls-cert/--tls-key/--tls-ca`): real stage servers on loopback, each
in its own process, with certificates made here by a throwaway CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import compiler_fixtures as cf
from distree.cli import cli
from distree.errors import DistreeError
from distree.runtime.client import InferenceClient, ServeError, infer_dataset
from distree.runtime.executor import run_bundle
from distree.runtime.local import StageProcess
from distree.runtime.tls import load_tls

REPO = Path(__file__).resolve().parents[1]


def _ca(folder: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(folder: Path, name: str, ca) -> tuple[str, str]:
    """A certificate for 127.0.0.1 / localhost signed by ``ca`` (servers and clients alike)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, rogue = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    return {"ca": str(folder / "ca.pem"), "rogue_ca": str(folder / "rogue-ca.pem"),
            "stage": _issue(folder, "stage", ca), "client": _issue(folder, "client", ca),
            "rogue": _issue(folder, "rogue", rogue)}


def _flags(pair: tuple[str, str], ca: str) -> tuple[str, ...]:
    return ("--tls-cert", pair[0], "--tls-key", pair[1], "--tls-ca", ca)


@pytest.fixture(scope="module")
def served(tiny_bundle, certs):
    """host -> pi4 of the tiny bundle, both over mutual TLS (pi4 only answers host, host only TLS clients)."""
    tls = _flags(certs["stage"], certs["ca"])
    pi4 = StageProcess(tiny_bundle, "pi4", extra_args=tls, start_timeout_s=180, cwd=REPO)
    host = StageProcess(tiny_bundle, "host", next_address=pi4.address, extra_args=tls, start_timeout_s=180, cwd=REPO)
    yield host
    host.stop()
    pi4.stop()


def test_a_pipeline_over_mutual_tls_answers_like_run_bundle(served, tiny_bundle, certs):
    data = cf.dataset(60, seed=7)
    want = run_bundle(tiny_bundle, data)
    with InferenceClient(served.address, tls=load_tls(*certs["client"], certs["ca"])) as client:
        got = infer_dataset(client, data)
    assert got.predictions == want.predictions and got.exits == want.exits
    assert "final" in got.exits        # some requests crossed the TLS hop to pi4


@pytest.mark.parametrize("who", ["plain client", "client of another CA"])
def test_a_tls_stage_refuses_clients_without_a_certificate_from_its_ca(served, certs, who):
    tls = None if who == "plain client" else load_tls(*certs["rogue"], certs["ca"])
    with InferenceClient(served.address, timeout_s=5.0, tls=tls) as client, \
            pytest.raises(ServeError, match=f"cannot reach {served.address}.*--tls-"):
        client.infer(np.zeros((1, *cf.SHAPE[1:]), np.float32))


def test_tls_flags_come_all_three_or_not_at_all(certs, tmp_path):
    with pytest.raises(DistreeError, match="--tls-key, --tls-ca missing"):
        load_tls(certs["client"][0], None, None)
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(DistreeError, match="--tls-ca .*not.pem: not a PEM file"):
        load_tls(*certs["client"], str(tmp_path / "not.pem"))
    res = CliRunner().invoke(cli, ["infer", "127.0.0.1:1", "--input", "x.npz", "--tls-cert", certs["client"][0]])
    assert res.exit_code == 2 and "needs --tls-cert, --tls-key and --tls-ca together" in res.output
