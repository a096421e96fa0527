"""Run the whole system on this machine for a first look, and print commands to try.

The client registry (SQLite), authz-service resolving keys through it with the sample policy
(examples/policy.yaml), a real Envoy with envoy/front-proxy.yaml, and an echo upstream, all on
127.0.0.1 and the documented ports. Creates a demo client and prints commands that work as
printed from the repository root. Ctrl-C stops everything.

Run it through scripts/dev-stack, which installs what it needs first. It reuses the process
helpers of the end-to-end tests (tests/e2e/harness.py), so it runs exactly what they test.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import socket
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import harness  # noqa: E402 (after the path is set)

POLICY = ROOT / "examples" / "policy.yaml"
# The documented ports (README, samples); --free-ports picks others.
PORTS = {
    "envoy": (8080, "Envoy's listener"),
    "envoy_admin": (9901, "Envoy's admin"),
    "authz_grpc": (9001, "authz-service's checks"),
    "authz_admin": (9002, "authz-service's admin API"),
    "authz_access_log": (9003, "authz-service's access-log service"),
    "authz_http": (9090, "authz-service's health and metrics"),
    "registry": (8081, "the client registry"),
    "upstream": (8000, "the echo upstream"),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/dev-stack",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".dev-stack",
        help="where the registry's database, tokens and the logs go (default: .dev-stack)",
    )
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free ports instead of the documented ones (when one of those is in use); "
        "the printed commands use the ports picked",
    )
    args = parser.parse_args()
    if args.free_ports:
        ports = {name: harness.free_port() for name in PORTS}
    else:
        ports = {name: port for name, (port, _) in PORTS.items()}
        busy = [f"{port} ({PORTS[name][1]})" for name, port in ports.items() if in_use(port)]
        if busy:
            which = f"port {busy[0]} is" if len(busy) == 1 else f"ports {', '.join(busy)} are"
            print(
                f"scripts/dev-stack: {which} in use on 127.0.0.1, so nothing was started. "
                "Stop what uses it, or run: scripts/dev-stack --free-ports",
                file=sys.stderr,
            )
            return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with ExitStack() as stack:
        registry = stack.enter_context(
            harness.registry_process(args.workdir, port=ports["registry"])
        )
        upstream = stack.enter_context(harness.echo_upstream(port=ports["upstream"]))
        service = stack.enter_context(
            harness.authz_service(
                args.workdir,
                grpc_port=ports["authz_grpc"],
                http_port=ports["authz_http"],
                registry="http",
                registry_url=registry.url,
                registry_token=registry.service_token(),
                policy_file=str(POLICY),
                admin_address=f"127.0.0.1:{ports['authz_admin']}",
                access_log_address=f"127.0.0.1:{ports['authz_access_log']}",
                # Envoy's front proxy asks over gRPC; the HTTP check server stays off.
                http_check_address="",
            )
        )
        # The harness picks the admin and access-log ports itself unless told; these were.
        service = dataclasses.replace(
            service, admin_port=ports["authz_admin"], access_log_port=ports["authz_access_log"]
        )
        config = harness.render_front_proxy(
            ports["envoy"], ports["envoy_admin"], service, upstream.port
        )
        stack.enter_context(harness.envoy(args.workdir, config))
        client = registry.create_client("Demo client", ["reader"])
        print(printout(args.workdir, ports, registry.url, client), flush=True)
        stop.wait()
    return 0


def in_use(port: int) -> bool:
    """Whether something listens on the port (SO_REUSEADDR, as the servers bind, so that
    connections of a stopped stack still in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def shown(path: Path) -> str:
    """A path as the printed commands give it: relative to the repository root if inside it."""
    return shlex.quote(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))


def printout(workdir: Path, ports: dict[str, int], registry: str, client: dict[str, str]) -> str:
    envoy = f"http://127.0.0.1:{ports['envoy']}"
    key, client_id = client["api_key"], client["client_id"]
    tokens = shown(workdir.resolve() / "registry-tokens.json")
    bin_dir = Path(sys.executable).parent
    grpcurl = shown(bin_dir / "grpcurl")
    revoke = f"{shown(bin_dir / 'client-registry')} clients --url {registry} --token-file {tokens}"
    explain = (
        f"{grpcurl} -plaintext -d "
        + shlex.quote(f'{{"method":"GET","path":"/admin/users","key":"{key}"}}')
        + f" 127.0.0.1:{ports['authz_admin']} authz_service.admin.v1.Admin/Explain"
    )
    return f"""
Everything is running on 127.0.0.1 (logs in {shown(workdir.resolve())}):
  Envoy            {envoy}  (admin http://127.0.0.1:{ports["envoy_admin"]})
  echo upstream    http://127.0.0.1:{ports["upstream"]}
  authz-service    checks (gRPC) 127.0.0.1:{ports["authz_grpc"]}
                   admin API (gRPC: Explain, Invalidate) 127.0.0.1:{ports["authz_admin"]}
                   access logs (gRPC) 127.0.0.1:{ports["authz_access_log"]}
                   /healthz /readyz /metrics http://127.0.0.1:{ports["authz_http"]}
                   policy {shown(POLICY)}
  client registry  {registry}  (admin token in {tokens})

Demo client {client_id} ("Demo client", roles: reader). Run these from {shlex.quote(str(ROOT))}:

  curl -i -H 'Authorization: ApiKey {key}' {envoy}/hello
  curl -i {envoy}/hello    # no key: 401
  curl -i -H 'Authorization: ApiKey {key}' {envoy}/admin/users    # 403: policy rule admin-area

Ask the admin API how that 403 was decided:
  {explain}

Revoke the key, and the first curl gets 401:
  {revoke} revoke {client_id}

Ctrl-C stops everything."""


if __name__ == "__main__":
    raise SystemExit(main())
