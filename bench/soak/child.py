"""The program the soak's commands run, and what it must have written.

``python child.py SEED LINES`` writes LINES lines of about 100 bytes, made
from SEED: most to stdout, every seventh to stderr, with NUL bytes, invalid
UTF-8, carriage returns and ANSI colours among them, so the check is
byte-exact. :func:`expected_output` computes the same bytes without running
it, which is what the soak compares the stored logs with.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

LINE_BYTES = 100
ODD_BYTES = (b"\x00", b"\xff\xfe", b"\r", b"\x1b[31m", b"\x1b[0m", b"\xc3\xa9")


def line(seed: int, number: int) -> bytes:
    """Line ``number`` of child ``seed``, newline included."""
    head = f"{seed}:{number}:".encode()
    odd = ODD_BYTES[(seed + number) % len(ODD_BYTES)]
    filler_length = LINE_BYTES - len(head) - len(odd) - 1
    filler = bytes(48 + (seed * 31 + number * 7 + i) % 75 for i in range(filler_length))
    return head + odd + filler + b"\n"


def on_stderr(number: int) -> bool:
    """Whether line ``number`` goes to stderr."""
    return number % 7 == 3


@dataclass(frozen=True)
class StreamDigest:
    """Bytes and SHA-256 of one stream, and the bytes themselves."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def expected_output(seed: int, lines: int) -> dict[str, StreamDigest]:
    """What ``child.py seed lines`` writes to each stream."""
    stdout = bytearray()
    stderr = bytearray()
    for number in range(lines):
        (stderr if on_stderr(number) else stdout).extend(line(seed, number))
    return {
        "stdout": StreamDigest(bytes(stdout)),
        "stderr": StreamDigest(bytes(stderr)),
    }


def main(seed: int, lines: int) -> None:
    stdout = sys.stdout.buffer
    stderr = sys.stderr.buffer
    for number in range(lines):
        target = stderr if on_stderr(number) else stdout
        target.write(line(seed, number))
        if number % 50 == 49:
            stdout.flush()
            stderr.flush()
    stdout.flush()
    stderr.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
