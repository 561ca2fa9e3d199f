#!/usr/bin/env python3
"""The same work as `provline batch` in one Python process with the
`cryptography` package: per device a P-256 key, a certificate with the
station's profile, the four files written to a temporary name and renamed,
a manifest row. Prints {"devices": N, "seconds": S, "devices_per_sec": R}.

Usage: python_baseline.py JOB_SIZE OUT_DIR
"""
import csv
import datetime
import hashlib
import json
import os
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "AmazonRootCA1.pem")


def write(path, data, mode=0o644):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def main():
    count, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    root = open(ROOT, "rb").read()
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "python baseline CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    started = time.perf_counter()
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as manifest:
        rows = csv.writer(manifest)
        rows.writerow(["serial", "thing_name", "certificate_id", "cert_serial", "not_after", "status", "error"])
        for i in range(count):
            serial = f"SN-{i:09d}"
            thing = f"sensor_{serial}"
            key = ec.generate_private_key(ec.SECP256R1())
            cert_serial = x509.random_serial_number()
            not_after = now + datetime.timedelta(days=3650)
            cert = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.COMMON_NAME, thing),
                            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                        ]
                    )
                )
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(cert_serial)
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
                )
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(aki, critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            folder = os.path.join(out, thing)
            os.mkdir(folder)
            write(os.path.join(folder, "private.key"), key_pem, 0o600)
            write(os.path.join(folder, "chain.pem"), cert_pem + ca_pem)
            write(os.path.join(folder, "AmazonRootCA1.pem"), root)
            write(os.path.join(folder, "cert.pem"), cert_pem)
            der = cert.public_bytes(serialization.Encoding.DER)
            rows.writerow(
                [serial, thing, hashlib.sha256(der).hexdigest(), f"{cert_serial:x}", not_after.isoformat(), "issued", ""]
            )
    seconds = time.perf_counter() - started
    print(json.dumps({"devices": count, "seconds": seconds, "devices_per_sec": count / seconds}))


if __name__ == "__main__":
    main()
