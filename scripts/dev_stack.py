"""The whole system on this machine, for a first look: the client registry (SQLite),
authz-service resolving keys through it, a real Envoy with envoy/front-proxy.yaml, and an echo
upstream. Creates a demo client and prints a working curl line. Ctrl-C stops everything.

Run it through scripts/dev-stack, which installs what it needs first. It reuses the process
helpers of the end-to-end tests (tests/e2e/harness.py), so it runs exactly what they test.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import harness  # noqa: E402 (after the path is set)

PORTS = {
    "envoy": 8080,
    "envoy_admin": 9901,
    "authz_grpc": 9001,
    "authz_http": 9090,
    "registry": 8081,
    "upstream": 8000,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".dev-stack",
        help="where the registry's database, tokens and logs go",
    )
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="pick free ports instead of the documented ones (for tests)",
    )
    args = parser.parse_args()
    ports = {name: harness.free_port() for name in PORTS} if args.free_ports else PORTS
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
            )
        )
        config = harness.render_front_proxy(
            ports["envoy"], ports["envoy_admin"], service, upstream.port
        )
        stack.enter_context(harness.envoy(args.workdir, config))
        client = registry.create_client("Demo client", ["reader"])
        print(
            f"""
Everything is running (logs in {args.workdir}):
  client registry  {registry.url}   (admin token in {args.workdir / "registry-tokens.json"})
  authz-service    gRPC 127.0.0.1:{service.grpc_port}, HTTP 127.0.0.1:{service.http_port}
  Envoy            http://127.0.0.1:{ports["envoy"]}  ->  echo upstream :{upstream.port}

Demo client {client["client_id"]} ("Demo client", roles: reader). Try:

  curl -i -H 'Authorization: ApiKey {client["api_key"]}' http://127.0.0.1:{ports["envoy"]}/hello
  curl -i http://127.0.0.1:{ports["envoy"]}/hello        # no key: 401

Revoke the key, and the first curl gets 401:
  .venv/bin/client-registry clients --url {registry.url} revoke {client["client_id"]}
  (run it in {args.workdir}, where the tokens file is)

Ctrl-C stops everything.""",
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
