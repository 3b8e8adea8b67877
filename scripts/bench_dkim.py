#!/usr/bin/env python3
"""Benchmark: a campaign signed with DKIM RSA-2048 against the same campaign unsigned, and the cost of one signature.

    .venv/bin/python scripts/bench_dkim.py                        # PostgreSQL, 100,000 recipients
    .venv/bin/python scripts/bench_dkim.py --recipients 2000 --idle-wait 0   # a quick look

In one run:
1. `openssl speed -seconds 3 rsa2048` and `… ed25519`: OpenSSL's own signatures per second on this
   machine, one core.
2. Per-message signing cost, in this process: --sign-messages messages rendered from the shipped
   `welcome` template and built by build_mime (each personalized, with List-Unsubscribe headers), then signed with
   smartmail.content.dkim.sign: µs per message for RSA-2048 and for Ed25519, against the bare
   OpenSSL signature through cryptography (what canonicalization and hashing add) and against
   `openssl speed`.
3. A check that a real worker signs: a 20-recipient campaign into an in-process aiosmtpd server,
   every message verified with dkimpy (a test dependency; skipped with a note when missing).
4. Campaigns of --recipients contacts (scripts/bench_campaign.py's campaign_run: one
   `smartmail worker -Q bulk,default` with 2 prefork processes into Postfix's C smtp-sink, timed from
   launch to the sink's last acceptance), unsigned and signed with one RSA-2048 key
   (SMARTMAIL_DKIM_KEYS), alternating, --rounds times each; best and median msg/s of each.
   Target: signed >= 60% of unsigned.
Needs PostgreSQL with trust auth (or --database sqlite), Redis (database 12 by default, FLUSHED; one is
started if none answers) and Postfix's smtp-sink (Debian package `postfix`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import bench_results

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_campaign  # noqa: E402
import bench_send  # noqa: E402
from bench_send import ROOT, Bench, BenchError, Worker, log, wait_for  # noqa: E402

SENDER_DOMAIN = bench_send.SENDER.rpartition("@")[2].rstrip(">")  # the campaigns' sender
PREFLIGHT = 20


def write_key(directory: Path, domain: str, selector: str, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path = directory / domain / f"{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def use_keys(directory: Path | None) -> None:
    """SMARTMAIL_DKIM_KEYS for this process and the workers it starts from now on."""
    from smartmail.config import get_settings

    if directory is None:
        os.environ.pop("SMARTMAIL_DKIM_KEYS", None)
    else:
        os.environ["SMARTMAIL_DKIM_KEYS"] = str(directory)
    get_settings.forget()


def openssl_speed(algorithm: str, seconds: int) -> float:
    """Signatures per second from `openssl speed -seconds N <algorithm>` (its sign/s column)."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), algorithm], capture_output=True, text=True, timeout=300
    ).stdout
    header = None
    for line in out.splitlines():
        if "sign/s" in line:
            header = line.split()
            continue
        if header and (line.startswith("rsa") or "Ed25519" in line):
            # The figures are the line's last len(header) fields; sign/s is the one under that heading.
            values = line.split()[-len(header) :]
            return float(values[header.index("sign/s")])
    raise BenchError(f"could not read sign/s from `openssl speed {algorithm}`:\n{out[-500:]}")


def built_messages(n: int, domain: str) -> list[bytes]:
    """n personalized welcome messages from `news@<domain>`, built as the workers build them."""
    from smartmail.content import rendering
    from smartmail.content.mime import build_mime
    from smartmail.store.engine import session_scope

    messages = []
    with session_scope() as session:
        for i in range(n):
            address, context = bench_send.recipient(i)
            rendered = rendering.render(
                session, context=context, template=bench_send.TEMPLATE, templates_dir=ROOT / "templates"
            )
            messages.append(
                build_mime(
                    sender=f"News <news@{domain}>",
                    recipient=address,
                    subject=rendered.subject,
                    text=rendered.text,
                    html=rendered.html,
                    message_id=f"<{i}.bench@{domain}>",
                    headers={
                        "List-Unsubscribe": f"<https://mail.example.com/unsubscribe/{i:020d}>",
                        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                    },
                )
            )
    return messages


def per_message_cost(bench: Bench, n: int, passes: int = 3) -> dict:
    """µs per dkim.sign for RSA-2048 and Ed25519 over n built messages, and per bare OpenSSL signature
    (through cryptography, of a SHA-256 digest: what dkim.sign adds is canonicalization and hashing)."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    from smartmail.content import dkim

    directory = bench.workdir / "dkim-micro"
    keys = {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    keys["ed25519"] = ed25519.Ed25519PrivateKey.generate()
    for name, key in keys.items():
        write_key(directory, f"{name}.{SENDER_DOMAIN}", "micro", key)
    use_keys(directory)
    results = {}
    for name, key in keys.items():
        domain = f"{name}.{SENDER_DOMAIN}"
        messages = built_messages(n, domain)
        sender = f"News <news@{domain}>"
        assert dkim.sign(messages[0], sender) != messages[0], "no signature: the key was not found"
        digests = [hashlib.sha256(m).digest() for m in messages]
        if name == "rsa":
            bare_sign = lambda digest, key=key: key.sign(digest, padding.PKCS1v15(), hashes.SHA256())
        else:
            bare_sign = lambda digest, key=key: key.sign(digest)
        # Alternating passes, each side's fastest kept: the least disturbed on a shared machine.
        signing = bare = float("inf")
        for _ in range(passes):
            started = time.perf_counter()
            for message in messages:
                dkim.sign(message, sender)
            signing = min(signing, (time.perf_counter() - started) / n)
            started = time.perf_counter()
            for digest in digests:
                bare_sign(digest)
            bare = min(bare, (time.perf_counter() - started) / n)
        results[name] = {
            "messages": n,
            "mean_message_bytes": sum(map(len, messages)) / n,
            "us_per_sign": signing * 1e6,
            "signs_per_s": 1 / signing,
            "bare_openssl_us": bare * 1e6,
        }
    use_keys(None)
    return results


class _Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(envelope.original_content or envelope.content)
        return "250 2.0.0 Ok"


def preflight(bench: Bench, keys: Path) -> dict:
    """A real worker signs: a small signed campaign into aiosmtpd, every message checked with dkimpy."""
    from aiosmtpd.controller import Controller

    from smartmail.campaigns import lifecycle as campaigns
    from smartmail.content import dkim

    bench.fresh_broker()
    bench_campaign.make_audience(bench, PREFLIGHT)
    recorder = _Recorder()
    port = bench_send.free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, decode_data=False)
    controller.start()
    use_keys(keys)
    env = dict(os.environ, SMARTMAIL_SMTP_URL=f"smtp://127.0.0.1:{port}?tls=none")
    worker = Worker(bench, "preflight", "smartmail.workers.app", ["bulk", "default"], env)
    try:
        campaigns.create_campaign("dkim-preflight", template=bench_send.TEMPLATE, lists=["bench"])
        campaigns.launch_campaign("dkim-preflight")
        wait_for(lambda: len(recorder.messages) >= PREFLIGHT, timeout=120, what="the preflight", alive=worker.check)
    finally:
        worker.stop()
        controller.stop()
        use_keys(None)
    signed = sum(1 for m in recorder.messages if m.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"))
    if signed != len(recorder.messages):
        raise BenchError(f"preflight: {signed} of {len(recorder.messages)} messages carry an RSA DKIM-Signature")
    try:
        import dkim as dkimpy
    except ImportError:
        log("  (dkimpy not installed: the preflight messages were checked for a signature, not verified)")
        return {"messages": signed, "verified": None}
    records = {
        f"{key.selector}._domainkey.{domain}.".encode(): key.dns_value().encode()
        for domain, domain_keys in dkim.load_keys(keys).keys.items()
        for key in domain_keys
    }
    verified = sum(1 for m in recorder.messages if dkimpy.verify(m, dnsfunc=lambda name, timeout=5: records.get(name)))
    if verified != signed:
        raise BenchError(f"preflight: only {verified} of {signed} signed messages verify with dkimpy")
    return {"messages": signed, "verified": verified}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=100_000, help="audience of each campaign")
    parser.add_argument("--rounds", type=int, default=2, help="unsigned/signed campaign pairs, alternating")
    parser.add_argument("--sign-messages", type=int, default=5000, help="messages signed in-process per algorithm")
    parser.add_argument("--openssl-seconds", type=int, default=3)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--postgres-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="FLUSHED; default db 12")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--stall-timeout", type=float, default=60.0)
    parser.add_argument("--idle-wait", type=float, default=60.0)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    bench = Bench(args)
    try:
        bench.setup()
        bench.environment()
        from cryptography.hazmat.primitives.asymmetric import rsa

        keys = bench.workdir / "dkim"
        write_key(keys, SENDER_DOMAIN, "bench2048", rsa.generate_private_key(public_exponent=65537, key_size=2048))

        bench.quiet()
        speed = {name: openssl_speed(name, args.openssl_seconds) for name in ("rsa2048", "ed25519")}
        log(
            f"openssl   speed -seconds {args.openssl_seconds}: rsa2048 {speed['rsa2048']:.0f} sign/s, "
            f"ed25519 {speed['ed25519']:.0f} sign/s (one core)"
        )
        bench.quiet()
        cost = per_message_cost(bench, args.sign_messages)
        for name, reference in (("rsa", "rsa2048"), ("ed25519", "ed25519")):
            c = cost[name]
            c["openssl_speed_sign_s"] = speed[reference]
            c["of_openssl_speed"] = c["signs_per_s"] / speed[reference]
            log(
                f"sign      {name:<7} dkim.sign {c['us_per_sign']:7.1f} µs/message ({c['signs_per_s']:6.0f}/s, "
                f"{c['of_openssl_speed']:.0%} of openssl speed); bare OpenSSL signature through cryptography "
                f"{c['bare_openssl_us']:.1f} µs; {c['messages']} messages of {c['mean_message_bytes']:.0f} bytes"
            )

        check = preflight(bench, keys)
        log(f"preflight a worker signed {check['messages']} campaign messages; dkimpy verified {check['verified']}")

        runs: dict[str, list[dict]] = {"unsigned": [], "signed": []}
        for round_ in range(args.rounds):
            for side in ("unsigned", "signed"):
                use_keys(keys if side == "signed" else None)
                r = bench_campaign.campaign_run(bench, args.recipients)
                use_keys(None)
                runs[side].append(r)
                log(
                    f"campaign  round {round_ + 1} {side:<8} {args.recipients} recipients: {r['rate']:8.0f} msg/s "
                    f"({r['seconds']:.1f} s); steady {r['steady_rate']:.0f} msg/s\n          {r['cpu']}"
                )
                if set(r["states"]) != {"sent"}:
                    log(f"          states: {r['states']}")
        best = {side: max(r["rate"] for r in rs) for side, rs in runs.items()}
        median = {side: statistics.median(r["rate"] for r in rs) for side, rs in runs.items()}
        ratio = best["signed"] / best["unsigned"]
        log(
            f"result    signed (RSA-2048) {best['signed']:.0f} msg/s vs unsigned {best['unsigned']:.0f} msg/s "
            f"(best of {args.rounds}): {ratio:.0%} (target >= 60%) {'OK' if ratio >= 0.6 else 'MISSED'}; "
            f"medians {median['signed']:.0f} / {median['unsigned']:.0f}"
        )
        bench_results.save(
            "bench_dkim",
            args,
            {
                "openssl_speed_sign_s": speed,
                "per_message": cost,
                "preflight": check,
                "campaign": {
                    "recipients": args.recipients,
                    "best_msg_s": best,
                    "median_msg_s": median,
                    "ratio": ratio,
                    "target_ratio": 0.6,
                    "runs": {
                        side: [
                            {
                                "msg_s": r["rate"],
                                "seconds": r["seconds"],
                                "steady_msg_s": r["steady_rate"],
                                "cpu": r["cpu"],
                                "states": r["states"],
                            }
                            for r in rs
                        ]
                        for side, rs in runs.items()
                    },
                },
            },
        )
        return 0
    except BenchError as exc:
        bench.failed = True
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
