"""The one-command local stack works as its printout says: registry, authz-service, Envoy and
upstream together, a demo key that gets in, and a revocation that takes effect."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from tests.e2e import harness

pytestmark = pytest.mark.e2e


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the printout:\n{text}"
    return match.group(1)


def read_until(stream: IO[str], marker: str, within: float) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    printed = ""
    while marker not in printed:
        printed += lines.get(timeout=within)
    return printed


def test_the_dev_stack_admits_the_demo_key_until_it_is_revoked(tmp_path: Path) -> None:
    """curl line -> 200 with the client's identity upstream; after revoke -> 401; Ctrl-C -> 0."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(harness.ROOT / "scripts" / "dev_stack.py"),
            "--free-ports",
            "--workdir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        printed = read_until(process.stdout, "Ctrl-C stops everything.", within=60)
        key = found(r"ApiKey (\S+)'", printed)
        port = int(found(r"http://127\.0\.0\.1:(\d+)/hello", printed))
        reply = harness.send(port, "/hello", [("Authorization", f"ApiKey {key}")])
        assert reply.status == 200
        assert reply.json()["headers"]["x-client-name"] == "Demo client"
        assert harness.send(port, "/hello").status == 401

        registry = found(r"client registry  (\S+)", printed)
        client_id = found(r"revoke (\S+)", printed)
        admin = json.loads((tmp_path / "registry-tokens.json").read_text())["admin_token"]
        revoke = urllib.request.Request(  # noqa: S310 (loopback)
            f"{registry}/clients/{client_id}/api-key",
            method="DELETE",
            headers={"Authorization": f"Bearer {admin}"},
        )
        with urllib.request.urlopen(revoke, timeout=10) as done:  # noqa: S310
            assert done.status == 204
        # The change feed evicts the cached key on every replica within a second.
        harness.wait_until(
            lambda: (
                harness.send(port, "/hello", [("Authorization", f"ApiKey {key}")]).status == 401
            ),
            1.0,
            "revocation",
        )
        reply = harness.send(port, "/hello", [("Authorization", f"ApiKey {key}")])
        assert reply.header("x-ext-authz-reason") == "key_revoked"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        process.stdout.close()
