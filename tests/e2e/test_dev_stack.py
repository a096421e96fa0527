"""The one-command local stack works as its printout says: registry, authz-service, Envoy and
upstream together, and every command it prints runs as printed, from where it says."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.e2e import harness

pytestmark = pytest.mark.e2e
DEV_STACK = harness.ROOT / "scripts" / "dev_stack.py"


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


@dataclass
class Printout:
    text: str
    where: Path  # the directory the printout says to run its commands from
    commands: list[str]

    def command(self, pattern: str) -> str:
        """The one printed command that ``pattern`` finds."""
        (command,) = [c for c in self.commands if re.search(pattern, c)]
        return command


def shell(command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run one printed line exactly as a user pastes it into a shell."""
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Printout]:
    workdir = tmp_path_factory.mktemp("dev-stack")
    process = subprocess.Popen(
        [sys.executable, str(DEV_STACK), "--free-ports", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        text = read_until(process.stdout, "Ctrl-C stops everything.", within=60)
        where = Path(found(r"Run these from (\S+):", text))
        commands = [
            line.strip()
            for line in text.splitlines()
            if re.match(r"\s+(curl|\S*\.venv/bin/)", line)
        ]
        yield Printout(text, where, commands)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        process.stdout.close()


def test_every_address_in_use_is_printed(stack: Printout) -> None:
    """Envoy and its admin, the upstream, the service's four ports and the registry."""
    for label in (
        r"Envoy\s+http://127\.0\.0\.1:\d+\s+\(admin http://127\.0\.0\.1:\d+\)",
        r"echo upstream\s+http://127\.0\.0\.1:\d+",
        r"checks \(gRPC\) 127\.0\.0\.1:\d+",
        r"admin API \(gRPC: Explain, Invalidate\) 127\.0\.0\.1:\d+",
        r"access logs \(gRPC\) 127\.0\.0\.1:\d+",
        r"/healthz /readyz /metrics http://127\.0\.0\.1:\d+",
        r"policy examples/policy\.yaml",
        r"client registry\s+http://127\.0\.0\.1:\d+",
    ):
        assert re.search(label, stack.text), label


def test_the_printed_commands_work_as_printed_until_the_key_is_revoked(stack: Printout) -> None:
    """The curl lines get 200, 401 and the policy's 403, Explain says why, and after the printed
    revoke command the key gets 401 key_revoked."""
    with_key = stack.command(r"ApiKey .*/hello$")
    allowed = shell(with_key, stack.where)
    assert allowed.startswith("HTTP/1.1 200")
    assert '"x-client-name": "Demo client"' in allowed
    assert shell(stack.command(r"/hello +# no key: 401$"), stack.where).startswith("HTTP/1.1 401")
    forbidden = shell(stack.command(r"/admin/users +# 403"), stack.where)
    assert forbidden.startswith("HTTP/1.1 403")
    assert "x-ext-authz-rule: admin-area" in forbidden

    explained = json.loads(shell(stack.command(r"Admin/Explain$"), stack.where))
    assert (explained["decision"], explained["rule"]) == ("deny", "admin-area")

    shell(stack.command(r" revoke cl_\w+$"), stack.where)
    # The change feed evicts the cached key within a second.
    harness.wait_until(
        lambda: shell(with_key, stack.where).startswith("HTTP/1.1 401"), 1.0, "revocation"
    )
    assert "x-ext-authz-reason: key_revoked" in shell(with_key, stack.where)


def test_the_readme_explain_examples_work_against_the_stack(stack: Printout) -> None:
    """The admin API section's grpcurl lines, with the venv on PATH as the README says, get
    answers (the policy is the sample one), at the port the stack printed."""
    readme = (harness.ROOT / "README.md").read_text()
    section = readme[readme.index("### The admin API") :]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start : section.index("\n```", start)]
    examples = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("grpcurl ")]
    assert len(examples) == 3
    admin = found(r"admin API \(gRPC: Explain, Invalidate\) (127\.0\.0\.1:\d+)", stack.text)
    path = f"{harness.BIN}{os.pathsep}{os.environ['PATH']}"  # what `. .venv/bin/activate` does
    for example in examples:
        answer = shell(example.replace("127.0.0.1:9002", admin), stack.where, {"PATH": path})
        assert json.loads(answer), example


def test_a_busy_documented_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    """With 8081 taken, the stack names it, suggests --free-ports and starts nothing."""
    with socket.socket() as holder:
        with contextlib.suppress(OSError):  # taken already, which is all this test needs
            holder.bind(("127.0.0.1", 8081))
            holder.listen()
        result = subprocess.run(
            [sys.executable, str(DEV_STACK), "--workdir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "8081 (the client registry)" in result.stderr
    assert "scripts/dev-stack --free-ports" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
