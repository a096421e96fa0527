"""scripts/quickstart as a newcomer meets it: the first run prints a key and a grpcurl check, a
later run says that the keys file exists and how to add a key; each printed command runs as
printed, from where the printout says."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from authz_service import apikeys
from tests.e2e import harness

pytestmark = pytest.mark.e2e
QUICKSTART = harness.ROOT / "scripts" / "quickstart"


@contextmanager
def quickstart(keys: Path) -> Iterator[str]:
    """Run scripts/quickstart on free ports; yield its printout once the service is ready."""
    grpc_port, http_port = harness.free_port(), harness.free_port()
    process = subprocess.Popen(
        [str(QUICKSTART)],
        env={
            **os.environ,
            "AUTHZ_KEYS_FILE": str(keys),
            "AUTHZ_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
            "AUTHZ_HTTP_ADDRESS": f"127.0.0.1:{http_port}",
            "AUTHZ_ADMIN_ADDRESS": "",
            "AUTHZ_ACCESS_LOG_ADDRESS": "",
            "AUTHZ_HTTP_CHECK_ADDRESS": "",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        printed = ""
        while "Ctrl-C stops it." not in printed:
            # Long enough for a first run that installs the package.
            printed += lines.get(timeout=120)
        harness.wait_until(
            lambda: harness.send(http_port, "/readyz").status == 200, 20, "quickstart"
        )
        yield printed
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        stdout.close()


def printed_command(printed: str, start: str) -> str:
    (command,) = [line.strip() for line in printed.splitlines() if line.strip().startswith(start)]
    return command


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """A printed line as a user pastes it, in the repository root, where the printout says."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )


def test_the_first_run_prints_a_key_and_a_grpcurl_check_that_works(tmp_path: Path) -> None:
    """The key is admitted by the printed grpcurl line; the file holds its hash only."""
    keys = tmp_path / "keys.yaml"
    with quickstart(keys) as printed:
        assert f"from another shell in {harness.ROOT}" in printed
        key = re.search(r"^\s+(azk_\w+)$", printed, re.MULTILINE)
        assert key is not None, printed
        assert apikeys.hash_key(key[1]) in keys.read_text()
        answer = json.loads(shell(printed_command(printed, ".venv/bin/grpcurl")).stdout)
        assert answer["status"] == {}  # OK
        assert "ok_response" in answer


def test_a_later_run_says_the_keys_file_exists_and_how_to_add_a_key(tmp_path: Path) -> None:
    """No key is created or printed; the printed list and add commands run as printed."""
    keys = tmp_path / "keys.yaml"
    with quickstart(keys):
        pass
    before = keys.read_text()
    with quickstart(keys) as printed:
        assert f"{keys} exists, so no key was created" in printed
        assert keys.read_text() == before
        listed = shell(printed_command(printed, ".venv/bin/authz-service keys list")).stdout
        assert " demo " in listed
        added = shell(printed_command(printed, ".venv/bin/authz-service keys add")).stdout
        assert apikeys.hash_key(added.strip()) in keys.read_text()
