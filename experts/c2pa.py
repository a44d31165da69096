"""C2PA Content Credentials: read and validate an embedded manifest with the C2PA reference SDK
(`c2pa-python`, C2PA Technical Specification 2.x).

What it reports: who signed (certificate subject and issuer), which program wrote the claim (claim
generator), the declared actions (created, edited, cropped, ...; the IPTC digital source type, e.g.
`trainedAlgorithmicMedia` for AI generation), the ingredients, and the validation result: valid and
trusted, valid but signed by a certificate we do not trust, or a signature / hash mismatch, which means
the file was changed after it was signed. Reading never goes to the network (no OCSP, no remote
manifests); pass `trust_anchors` (PEM) to trust your own certificate authorities.

Score: 0.9 when the hashes or signature do not match (changed after signing; indicates manipulated);
0.95 (trusted) or 0.85 (untrusted signer) when a valid manifest declares AI generation (indicates
ai_generated); 0.5 for declared compositing, 0.3 for declared ordinary edits; 0.05 (trusted) or 0.2
(untrusted) for a valid manifest without AI or edits, which is evidence FOR authenticity
(details["supports_authentic"] is True). Not applicable when the file has no Content Credentials.
Every manifest string is untrusted data: quoted, never obeyed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experts.base import Evidence, ExpertError, not_applicable
from experts.image import LoadedImage
from experts.metadata import quote

log = logging.getLogger(__name__)

MIME_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
}
AI_SOURCE_TYPES = ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia")
COMPOSITE_SOURCE_TYPES = ("composite", "compositeCapture", "compositeSynthetic")
COMPOSITE_ACTIONS = ("c2pa.placed", "c2pa.edited")
EDIT_ACTIONS = (
    "c2pa.cropped",
    "c2pa.resized",
    "c2pa.color_adjustments",
    "c2pa.filtered",
    "c2pa.orientation",
    "c2pa.drawing",
    "c2pa.removed",
    "c2pa.converted",
    "c2pa.transcoded",
    "c2pa.repackaged",
)
MISMATCH_MARKERS = ("mismatch", "claimSignature.missing", "signingCredential.invalid", "hashedURI.missing")
UNTRUSTED_CODES = ("signingCredential.untrusted",)
BENIGN_FAILURE_CODES = (*UNTRUSTED_CODES, "signingCredential.ocsp.skipped", "timeStamp.untrusted")


def _source_type_name(value: Any) -> str:
    return str(value).rstrip("/").rsplit("/", 1)[-1] if value else ""


def _context(trust_anchors: str | None):
    import c2pa

    settings: dict[str, Any] = {"verify": {"ocsp_fetch": False, "remote_manifest_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"trust_anchors": trust_anchors}
    return c2pa.Context(settings=c2pa.Settings.from_dict(settings))


@dataclass(frozen=True)
class ManifestReport:
    """What an embedded manifest says and whether it validates."""

    state: str  # "trusted", "valid_untrusted", "changed", "invalid"
    signer: str
    issuer: str
    signed_at: str | None
    claim_generator: str
    actions: tuple[dict[str, str], ...]
    ingredients: tuple[dict[str, str], ...]
    failures: tuple[str, ...]
    manifests: int

    @property
    def source_types(self) -> tuple[str, ...]:
        return tuple(a["digitalSourceType"] for a in self.actions if a.get("digitalSourceType"))

    @property
    def declares_ai(self) -> bool:
        return any(s in AI_SOURCE_TYPES for s in self.source_types)

    @property
    def declares_composite(self) -> bool:
        return any(s in COMPOSITE_SOURCE_TYPES for s in self.source_types) or any(
            a["action"] in COMPOSITE_ACTIONS for a in self.actions
        )

    @property
    def declares_edits(self) -> bool:
        return any(a["action"] in EDIT_ACTIONS for a in self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "signer": self.signer,
            "issuer": self.issuer,
            "signed_at": self.signed_at,
            "claim_generator": self.claim_generator,
            "actions": [dict(a) for a in self.actions],
            "ingredients": [dict(i) for i in self.ingredients],
            "validation_failures": list(self.failures),
            "manifests": self.manifests,
        }


def read_manifest(data: bytes, mime_type: str, trust_anchors: str | None = None) -> ManifestReport | None:
    """The active manifest of a file's Content Credentials, validated; None when there are none."""
    import c2pa

    try:
        reader = c2pa.Reader.try_create(mime_type, io.BytesIO(data), None, _context(trust_anchors))
    except c2pa.C2paError as exc:
        return ManifestReport("invalid", "", "", None, "", (), (), (f"unreadable: {exc}",), 0)
    if reader is None:
        return None
    with reader:
        store = json.loads(reader.json())
    manifests = store.get("manifests", {})
    active = manifests.get(store.get("active_manifest", ""), {})
    signature = active.get("signature_info", {}) or {}
    generator_info = active.get("claim_generator_info") or []
    generator = ", ".join(
        " ".join(str(g.get(k, "")) for k in ("name", "version") if g.get(k)) for g in generator_info
    ) or str(active.get("claim_generator", ""))
    actions = []
    for assertion in active.get("assertions", []):
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions", []):
                agent = action.get("softwareAgent")
                if isinstance(agent, dict):
                    agent = agent.get("name", "")
                actions.append(
                    {
                        "action": str(action.get("action", "")),
                        "digitalSourceType": _source_type_name(action.get("digitalSourceType")),
                        "softwareAgent": str(agent or ""),
                    }
                )
    ingredients = tuple(
        {"title": str(i.get("title", "")), "relationship": str(i.get("relationship", ""))}
        for i in active.get("ingredients", [])
    )
    codes = [s.get("code", "") for s in store.get("validation_status", []) or []]
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    codes += [s.get("code", "") for s in results.get("failure", []) or []]
    failures = tuple(dict.fromkeys(c for c in codes if c))
    state_text = str(store.get("validation_state", "")).lower()
    if any(any(m in code for m in MISMATCH_MARKERS) for code in failures):
        state = "changed"
    elif any(code not in BENIGN_FAILURE_CODES for code in failures) or state_text == "invalid":
        state = "invalid"
    elif state_text == "trusted" and not failures:
        state = "trusted"
    else:
        state = "valid_untrusted"
    return ManifestReport(
        state=state,
        signer=str(signature.get("common_name", "") or ""),
        issuer=str(signature.get("issuer", "") or ""),
        signed_at=signature.get("time"),
        claim_generator=generator,
        actions=tuple(actions),
        ingredients=ingredients,
        failures=failures,
        manifests=len(manifests),
    )


@dataclass(frozen=True)
class ContentCredentials:
    """Expert: read and validate C2PA Content Credentials embedded in the file."""

    name = "c2pa"
    version = "1"
    description = (
        "Reads and validates C2PA Content Credentials (signed provenance): signer, declared actions and "
        "AI generation, and whether the file was changed after signing."
    )
    trust_anchors: str | None = None  # PEM text or a path to a PEM file of CAs to trust

    def _anchors(self) -> str | None:
        if not self.trust_anchors:
            return None
        if "-----BEGIN" in self.trust_anchors:
            return self.trust_anchors
        path = Path(self.trust_anchors)
        if not path.is_file():
            raise ExpertError(f"trust anchors file {path} not found; give a PEM file of CA certificates")
        return path.read_text(encoding="utf-8")

    def analyze(self, image: LoadedImage) -> Evidence:
        if not image.data:
            return not_applicable(self.name, "No file bytes to read Content Credentials from (pixels only).")
        mime_type = MIME_TYPES.get(image.format)
        if mime_type is None or (b"c2pa" not in image.data and b"jumb" not in image.data):
            return not_applicable(
                self.name,
                "No Content Credentials (C2PA): the file carries no signed provenance, which is common "
                "and says nothing either way.",
            )
        report = read_manifest(image.data, mime_type, self._anchors())
        if report is None:
            return not_applicable(self.name, "No Content Credentials (C2PA) found in the file.")
        return self._evidence(report)

    def _evidence(self, report: ManifestReport) -> Evidence:
        signer = quote(report.signer or "an unnamed signer")
        issuer = f" (issued by {quote(report.issuer)})" if report.issuer else ""
        tool = f" with {quote(report.claim_generator)}" if report.claim_generator else ""
        trusted = report.state == "trusted"
        details: dict[str, Any] = {
            **report.to_dict(),
            "indicates": "manipulated",
            "supports_authentic": False,
        }
        declared = ", ".join(
            quote(a["action"] + (f" ({a['digitalSourceType']})" if a["digitalSourceType"] else ""), 40)
            for a in report.actions[:6]
        )
        said = f" It declares: {declared}." if declared else ""
        if report.state == "changed":
            score = 0.9
            failed = ", ".join(c for c in report.failures if c not in BENIGN_FAILURE_CODES)
            summary = (
                f"Content Credentials signed by {signer}{issuer} no longer match the file ({failed}): the "
                "image was changed or re-encoded after it was signed."
            )
        elif report.state == "invalid":
            score = 0.6
            summary = (
                f"The file has Content Credentials that do not validate ({', '.join(report.failures)}), so "
                "its provenance cannot be relied on."
            )
        elif report.declares_ai:
            score = 0.95 if trusted else 0.85
            details["indicates"] = "ai_generated"
            who = "a trusted signer" if trusted else f"{signer}, whose certificate we do not trust,"
            summary = f"Valid Content Credentials{tool} from {who} declare the image AI-generated.{said}"
        elif report.declares_composite or report.declares_edits:
            score = 0.5 if report.declares_composite else 0.3
            kind = "compositing or editing" if report.declares_composite else "ordinary edits"
            trust = "trusted" if trusted else "untrusted"
            summary = (
                f"Valid Content Credentials ({trust} signer {signer}{tool}) declare {kind}: the edits are "
                f"disclosed, not hidden.{said}"
            )
        else:
            score = 0.05 if trusted else 0.2
            details["supports_authentic"] = True
            strength = (
                "strong evidence for authenticity"
                if trusted
                else "weaker evidence, because anyone can sign with a certificate we do not trust"
            )
            summary = (
                f"Valid Content Credentials signed by {signer}{issuer}{tool} match the file and declare "
                f"no AI generation or edits: {strength}.{said}"
            )
        return Evidence(
            expert=self.name,
            score=score,
            applicable=True,
            summary=summary,
            details=details,
            version=self.version,
        )


# --------------------------------------------------------------------------------------------------
# Signing (`forensics sign`)


def _algorithm(key_pem: bytes):
    import c2pa
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ExpertError(f"the private key is not an unencrypted PEM key ({exc})") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey):
        bits = key.curve.key_size
        return {256: c2pa.C2paSigningAlg.ES256, 384: c2pa.C2paSigningAlg.ES384}.get(
            bits, c2pa.C2paSigningAlg.ES512
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    raise ExpertError("unsupported key type: use an EC (P-256/P-384), RSA or Ed25519 key")


def sign(
    data: bytes,
    mime_type: str,
    cert_chain_pem: bytes,
    key_pem: bytes,
    *,
    title: str = "image",
    source_type: str = "digitalCapture",
    tsa_url: str | None = None,
) -> bytes:
    """The file with C2PA Content Credentials attached: one `c2pa.created` action (with the IPTC digital
    source type, which C2PA requires: "digitalCapture" for a camera photo, "trainedAlgorithmicMedia"
    for AI generation, ...), signed with the
    certificate chain (end-entity first, PEM) and its private key."""
    import c2pa

    action = {
        "action": "c2pa.created",
        "digitalSourceType": f"http://cv.iptc.org/newscodes/digitalsourcetype/{source_type}",
    }

    manifest = {
        "claim_generator_info": [{"name": "image-forensics-assistant", "version": "0.1.0"}],
        "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}],
    }
    info = c2pa.C2paSignerInfo(_algorithm(key_pem), cert_chain_pem, key_pem, tsa_url)
    try:
        signer = c2pa.Signer.from_info(info)
        builder = c2pa.Builder(manifest)
        out = io.BytesIO()
        builder.sign(signer, mime_type, io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        raise ExpertError(
            f"signing failed ({exc}); C2PA needs an end-entity certificate with the digitalSignature key "
            "usage and an emailProtection or documentSigning extended key usage, followed by its CA chain"
        ) from exc
    return out.getvalue()
