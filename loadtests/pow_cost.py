"""What the proof of work costs a person and a bot, measured on this machine.

    python loadtests/pow_cost.py [--solves 5] [--puzzles 4] [--base 20]

Prints the SHA-256 rate of the reference Python solver (engine.pow.solve) and of native
code (OpenSSL's `openssl speed`, when installed), the measured time to solve challenges at
the base difficulty, and for each difficulty: the expected hashes, a low-end phone's time
(about 4 M SHA-256 per second in a browser), and what one million attempts cost a bot on
native cores and on a GPU. docs/abuse.md records a run.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import time

from engine.pow import issue, solve

PHONE_HASHES_PER_S = 4e6  # a low-end phone's browser (WebCrypto or WASM), DESIGN.md
GPU_HASHES_PER_S = 5e9  # one consumer GPU on SHA-256 (order of magnitude)
CORE_EUR_PER_HOUR = 0.01  # a rented cloud vCPU, order of magnitude
GPU_EUR_PER_HOUR = 0.50  # a rented consumer GPU, order of magnitude


def python_rate(seconds: float) -> float:
    """Hashes per second of the reference solver's inner loop (prefix copied, nonce added)."""
    prefix = hashlib.sha256(b"v1.rexample000000.tag.20.4.1800000000000.id.mac:0:")
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(10_000):
            h = prefix.copy()
            h.update(str(i).encode())
            h.digest()
        n += 10_000
    return n / (time.perf_counter() - start)


def native_rate(seconds: int) -> float | None:
    """Hashes per second of OpenSSL on 64-byte messages (a solver's message size), one core."""
    if shutil.which("openssl") is None:
        return None
    out = subprocess.run(
        ["openssl", "speed", "-evp", "sha256", "-bytes", "64", "-seconds", str(seconds)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    m = re.search(r"sha256\s+([\d.]+)k", out)
    return float(m.group(1)) * 1000 / 64 if m else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solves", type=int, default=5)
    parser.add_argument("--puzzles", type=int, default=4)
    parser.add_argument("--base", type=int, default=20)
    parser.add_argument("--extra", type=int, default=8, help="difficulties above the base")
    args = parser.parse_args()
    k = args.puzzles

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} "
        f"python {platform.python_version()}"
    )
    py = python_rate(2.0)
    native = native_rate(2)
    print(f"python solver: {py / 1e6:.2f} M SHA-256/s (one core)")
    print(
        "native (openssl speed, 64-byte messages): "
        + (f"{native / 1e6:.2f} M SHA-256/s (one core)" if native else "openssl not found")
    )

    times, hashes_tried = [], 0
    for _ in range(args.solves):
        c = issue(
            secrets.token_bytes(32),
            "rexample00000",
            "10.0.0.1",
            args.base,
            k,
            2**41,
            secrets.token_urlsafe(12),
        )
        start = time.perf_counter()
        nonces = solve(c.text, args.base, k)
        times.append(time.perf_counter() - start)
        hashes_tried += sum(int(n) + 1 for n in nonces)  # decimal counters from 0
    solver = hashes_tried / sum(times)
    print(
        f"python solve at {args.base} bits x {k} puzzles, {args.solves} challenges: "
        f"median {statistics.median(times):.2f} s, max {max(times):.2f} s "
        f"({solver / 1e6:.2f} M SHA-256/s)"
    )

    core = native or py
    print()
    print(
        f"{'bits':>4} {'hashes/attempt':>15} {'phone':>9} {'python':>9} "
        f"{'1M attempts: core-h':>20} {'EUR (cores)':>12} {'GPU-h':>8} {'EUR (GPU)':>10}"
    )
    for d in range(args.base, args.base + args.extra + 1):
        hashes = k * 2**d
        core_hours = 1e6 * hashes / core / 3600
        gpu_hours = 1e6 * hashes / GPU_HASHES_PER_S / 3600
        print(
            f"{d:>4} {hashes:>15,} {hashes / PHONE_HASHES_PER_S:>8.2f}s {hashes / solver:>8.2f}s "
            f"{core_hours:>20,.0f} {core_hours * CORE_EUR_PER_HOUR:>12,.0f} "
            f"{gpu_hours:>8,.1f} {gpu_hours * GPU_EUR_PER_HOUR:>10,.2f}"
        )
    print(
        f"\n(core: {core / 1e6:.1f} M/s measured; GPU {GPU_HASHES_PER_S / 1e9:.0f} G/s, "
        f"{CORE_EUR_PER_HOUR} EUR per core-hour, {GPU_EUR_PER_HOUR} EUR per GPU-hour assumed)"
    )


if __name__ == "__main__":
    main()
