"""C2PA Content Credentials (experts/c2pa.py) on fixtures signed with a local certificate chain."""

from __future__ import annotations

import datetime
import struct

import numpy as np
import pytest
from imaging import decode, jpeg_bytes
from skimage import data

from assistant.cli import main
from experts import load_image
from experts.base import ExpertError
from experts.c2pa import ContentCredentials, sign

c2pa = pytest.importorskip("c2pa")
x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Forensics Test Org"),
        ]
    )


def _usage(**flags: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


@pytest.fixture(scope="module")
def chain() -> dict[str, bytes]:
    """A test CA and an end-entity signing certificate with the extensions C2PA requires (ES256,
    digitalSignature key usage, emailProtection extended key usage)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Forensics Test Root CA"))
        .issuer_name(_name("Forensics Test Root CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("Forensics Test Signer"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "chain": leaf.public_bytes(pem) + ca.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ca": ca.public_bytes(pem),
    }


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_bytes(data.coffee(), 90)


@pytest.fixture(scope="module")
def signed(chain, photo) -> bytes:
    return sign(photo, "image/jpeg", chain["chain"], chain["key"], title="coffee.jpg")


def _app11_segments(jpeg: bytes) -> bytes:
    """The JPEG's APP11 (JUMBF, where C2PA lives) segments."""
    found, index = [], 2
    while index < len(jpeg) and jpeg[index + 1] != 0xDA:
        length = struct.unpack(">H", jpeg[index + 2 : index + 4])[0]
        if jpeg[index + 1] == 0xEB:
            found.append(jpeg[index : index + 2 + length])
        index += 2 + length
    return b"".join(found)


def _with_manifest(pixels: np.ndarray, manifest: bytes) -> bytes:
    """Re-encode the pixels and put the old manifest back (what a careless editor would do)."""
    fresh = jpeg_bytes(pixels, 90)
    return fresh[:2] + manifest + fresh[2:]


def _analyze(data_bytes: bytes, anchors: bytes | None = None):
    expert = ContentCredentials(trust_anchors=anchors.decode() if anchors else None)
    return expert.analyze(load_image(data_bytes))


def test_signed_and_trusted_supports_authenticity(chain, signed):
    evidence = _analyze(signed, chain["ca"])
    assert evidence.applicable and evidence.score <= 0.1
    assert evidence.details["state"] == "trusted" and evidence.details["supports_authentic"]
    assert evidence.details["signer"] == "Forensics Test Signer"
    assert evidence.details["actions"][0]["digitalSourceType"] == "digitalCapture"


def test_signed_with_an_untrusted_certificate_is_weaker(signed):
    evidence = _analyze(signed)
    assert evidence.details["state"] == "valid_untrusted"
    assert 0.1 < evidence.score < 0.5 and "do not trust" in evidence.summary


def test_ai_generation_declared(chain, photo):
    marked = sign(photo, "image/jpeg", chain["chain"], chain["key"], source_type="trainedAlgorithmicMedia")
    evidence = _analyze(marked, chain["ca"])
    assert evidence.details["indicates"] == "ai_generated" and evidence.score >= 0.9


def test_re_encoded_file_no_longer_matches(chain, signed):
    evidence = _analyze(_with_manifest(decode(signed), _app11_segments(signed)), chain["ca"])
    assert evidence.details["state"] == "changed" and evidence.score >= 0.9
    assert any("mismatch" in code for code in evidence.details["validation_failures"])
    assert "changed or re-encoded after it was signed" in evidence.summary


def test_pixel_tampered_file_no_longer_matches(chain, signed):
    pixels = decode(signed).copy()
    pixels[100:200, 150:300] = 255
    evidence = _analyze(_with_manifest(pixels, _app11_segments(signed)), chain["ca"])
    assert evidence.details["state"] == "changed" and evidence.details["indicates"] == "manipulated"


def test_stripped_file_has_no_credentials(signed):
    evidence = _analyze(jpeg_bytes(decode(signed), 90))
    assert not evidence.applicable and "No Content Credentials" in evidence.summary


def test_sign_command_and_bad_key(chain, photo, tmp_path):
    (tmp_path / "cert.pem").write_bytes(chain["chain"])
    (tmp_path / "key.pem").write_bytes(chain["key"])
    (tmp_path / "photo.jpg").write_bytes(photo)
    args = ["sign", str(tmp_path / "photo.jpg"), "--cert", str(tmp_path / "cert.pem")]
    assert main([*args, "--key", str(tmp_path / "key.pem")]) == 0
    evidence = _analyze((tmp_path / "photo.signed.jpg").read_bytes(), chain["ca"])
    assert evidence.details["state"] == "trusted"
    (tmp_path / "bad.pem").write_bytes(b"not a key")
    assert main([*args, "--key", str(tmp_path / "bad.pem")]) == 1
    with pytest.raises(ExpertError, match="PEM"):
        sign(photo, "image/jpeg", chain["chain"], b"junk")


def test_file_without_bytes_is_not_applicable():
    assert not ContentCredentials().analyze(load_image(np.zeros((8, 8, 3), np.uint8))).applicable
