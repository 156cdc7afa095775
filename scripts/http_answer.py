"""Reads an answer of the service as `curl -sS -N -D - ...` prints it (the status line and
headers, then the body) and hands on what the calling script wants; the standard library
only, so that the scripts need python3 and curl and nothing else.

    http_answer.py [--service URL] --field NAME   print the JSON body's NAME
    http_answer.py [--service URL] --stream       pass the body through as it arrives
                                                  (a 204 passes nothing)

Any other status than 2xx: `error: <status> <reason>: <the service's detail>` on stderr and
exit 1. No answer at all (curl could not connect, and said why): exit 3. Never a traceback,
also when the reader of the output goes away (`| head`) or on Ctrl-C (exit 130).
"""

import argparse
import json
import os
import signal
import sys
from http import HTTPStatus
from typing import BinaryIO

EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 3, 130


class Refused(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def read_head(stream: BinaryIO, service: str) -> int:
    """The final status of the answer, past any 1xx interim ones and their headers."""
    while True:
        status_line = stream.readline()
        if not status_line:
            raise Refused(f"no answer from {service}", EXIT_UNREACHABLE)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise Refused(f"not an HTTP answer: {status_line[:80]!r}")
        while stream.readline().strip():
            pass  # the headers, up to the blank line that ends them
        status = int(parts[1])
        if status >= 200:
            return status


def describe(status: int, body: bytes) -> str:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "HTTP error"
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = body.decode(errors="replace").strip() or "(no detail)"
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(
            f"{item['loc'][-1]}: {item['msg']}" if isinstance(item, dict) and "msg" in item else str(item)
            for item in detail
        )
    return f"{status} {reason}: {detail}"


def hand_on(stream: BinaryIO, service: str, field: str | None) -> None:
    status = read_head(stream, service)
    if not 200 <= status < 300:
        raise Refused(describe(status, stream.read()))
    if field is None:
        for line in stream:  # one line at a time, as the events arrive
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
        return
    body = stream.read()
    try:
        value = json.loads(body)[field]
    except (ValueError, KeyError, TypeError):
        raise Refused(f"{status} answer without {field!r}: {body[:200].decode(errors='replace')}") from None
    print(value)


def main() -> int:
    parser = argparse.ArgumentParser(description="Hand on an answer of the service that curl printed.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--field", help="print this field of the JSON body")
    what.add_argument("--stream", action="store_true", help="pass the body through as it arrives")
    parser.add_argument("--service", default="the service", help="its URL, for messages")
    args = parser.parse_args()
    try:
        hand_on(sys.stdin.buffer, args.service, args.field)
    except Refused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return refused.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read the output stopped: nothing left to say. stdout goes to /dev/null so
        # that the interpreter's own flush at exit does not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
