"""DKIM signing speed on one core: ferry.dkim.Signer.sign on a 1 KB message. Not a test.

    python bench/dkim_sign.py [--n 5000] [--size 1024] [--no-openssl]

Measures signatures per second through the whole ``Signer.sign`` path (parse,
canonicalise, body hash, header hash, sign, fold) for RSA-2048, Ed25519, and a
domain with both keys (two signatures per message); and for comparison the raw
private-key operation through ``cryptography`` and ``openssl speed -seconds 3
rsa2048`` (the ceiling: OpenSSL's own RSA-2048 sign/s on this machine).
The process is pinned to one CPU. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ferry.dkim import KeyStore, Signer

TARGET = 2000  # RSA-2048 signatures per second, one core (the target)


def message(size: int) -> bytes:
    """A plausible message of ``size`` bytes (headers + text body, CRLF)."""
    head = (
        b"From: Alice Example <alice@example.com>\r\n"
        b"To: Bob Example <bob@example.net>\r\n"
        b"Subject: Your monthly statement is ready\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <statement-20240101-000001@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = (line * (size // len(line) + 1))[: max(size - len(head) - 2, 0)] + b"\r\n"
    return head + body


def rate(fn: Callable[[], object], n: int) -> float:
    """Calls per second of ``fn`` over ``n`` calls (after a short warm-up)."""
    for _ in range(min(50, n)):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def openssl_speed(seconds: int = 3) -> float | None:
    """RSA-2048 sign/s from ``openssl speed`` (None when openssl is missing)."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    cmd = [exe, "speed", "-seconds", str(seconds), "rsa2048"]
    if hasattr(os, "sched_getaffinity"):
        cpu = min(os.sched_getaffinity(0))
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    m = re.search(r"^rsa\s+2048 bits\s+\S+s\s+\S+s\s+([\d.]+)", out, re.M)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="signatures per measurement")
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--no-openssl", action="store_true", help="skip `openssl speed`")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    msg = message(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(tmp)
        store.generate("rsa.example")
        store.generate("ed.example", kind="ed25519")
        store.generate("both.example")
        store.generate("both.example", selector="ed", kind="ed25519")
        time.sleep(0.2)  # past the key store's "just changed" window: steady state
        signer = Signer(store)

        def sign_as(domain: str) -> Callable[[], object]:
            m = msg.replace(b"@example.com>", b"@" + domain.encode() + b">", 1)
            assert signer.sign(m, envelope_sender="").signed
            return lambda: signer.sign(m, envelope_sender="")

        results: dict[str, object] = {
            "message_bytes": len(msg),
            "n": args.n,
            "cpu": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "rsa2048_signs_per_s": round(rate(sign_as("rsa.example"), args.n)),
            "ed25519_signs_per_s": round(rate(sign_as("ed.example"), args.n)),
            "dual_messages_per_s": round(rate(sign_as("both.example"), args.n)),
        }
        raw_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        data = msg[:600]
        results["raw_cryptography_rsa2048_sign_per_s"] = round(
            rate(lambda: raw_key.sign(data, padding.PKCS1v15(), hashes.SHA256()), args.n)
        )
    if not args.no_openssl:
        speed = openssl_speed()
        results["openssl_speed_rsa2048_sign_per_s"] = round(speed) if speed else None
    rsa_rate = results["rsa2048_signs_per_s"]
    assert isinstance(rsa_rate, int)
    results["target_rsa2048_per_s"] = TARGET
    results["target_met"] = rsa_rate >= TARGET
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
