"""Throw-away PKI for a local control plane, made with the openssl CLI (no extra Python dependency).

One CA signs the apiserver's serving certificate (for 127.0.0.1, localhost and any extra IPs) and
client certificates; a separate RSA key pair signs service-account tokens.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path

    def client(self, name: str, common_name: str, organization: str | None = None) -> ClientCert:
        """Issue (once) a client certificate; ``organization`` becomes the Kubernetes group."""
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if not cert.exists():
            subj = f"/CN={common_name}" if organization is None else f"/O={organization}/CN={common_name}"
            _issue(self, cert, key, subj, extensions="extendedKeyUsage=clientAuth")
        return ClientCert(cert, key)


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _issue(pki: Pki, cert: Path, key: Path, subject: str, extensions: str) -> None:
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    ext.write_text(extensions + "\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", subject)
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_cert),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-days",
        "30",
        "-out",
        str(cert),
        "-extfile",
        str(ext),
    )
    csr.unlink()
    ext.unlink()
    key.chmod(0o600)


def create_pki(directory: Path, extra_ips: tuple[str, ...] = ()) -> Pki:
    """Create (or reuse, if already complete) the PKI under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        dir=directory,
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
    )
    if not pki.ca_cert.exists():
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            str(pki.ca_key),
            "-out",
            str(pki.ca_cert),
            "-subj",
            "/CN=vnpu-local-ca",
        )
    if not pki.serving_cert.exists():
        sans = ["IP:127.0.0.1", "DNS:localhost", "IP:10.0.0.1", "DNS:kubernetes.default.svc"]
        sans += [f"IP:{ip}" for ip in extra_ips]
        _issue(
            pki,
            pki.serving_cert,
            pki.serving_key,
            "/CN=kube-apiserver",
            extensions=f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth",
        )
    if not pki.sa_key.exists():
        _openssl("genrsa", "-out", str(pki.sa_key), "2048")
        _openssl("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    return pki
