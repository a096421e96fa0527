"""What evaluating the access policy costs per check, in process, side by side in one run.

    .venv/bin/python benchmarks/policy_bench.py [--number 200000]

Times Policy.evaluate for the sample policy (examples/policy.yaml) on requests that take its
cheapest and its dearest paths, against no policy at all, and prints microseconds per call and
the ratio to the no-policy call. check_bench.py measures the same through gRPC, end to end.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

from authz_service.model import Client, Request
from authz_service.policy import NO_POLICY, parse

POLICY = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    args = parser.parse_args()
    policy = parse(POLICY.read_text(), str(POLICY))
    client = Client("bench", "Benchmark client", ("reader",))
    admin = Client("ops", "Ops", ("admin",))

    def request(path: str) -> Request:
        return Request(is_http=True, method="GET", host="api.example.com", path=path)

    cases = [
        ("no policy file", NO_POLICY, request("/v1/orders/12345"), client),
        ("sample, first rule decides", policy, request("/admin/status"), client),
        ("sample, no rule matches", policy, request("/v1/orders/12345"), client),
        ("sample, path normalised", policy, request("/v1//orders/./%31"), client),
        ("sample, admin rule allows", policy, request("/admin/users"), admin),
        (
            "sample + route requirement",
            policy,
            Request(
                is_http=True,
                method="GET",
                host="api.example.com",
                path="/billing/1",
                route=(("required_roles", "billing,reader"),),
            ),
            client,
        ),
    ]
    timings = {}
    for name, chosen, req, who in cases:
        timer = timeit.Timer(
            "evaluate(request, client)",
            globals={"evaluate": chosen.evaluate, "request": req, "client": who},
        )
        best = min(timer.repeat(number=args.number, repeat=5))
        timings[name] = best / args.number * 1e6
    floor = timings["no policy file"]
    print(f"{args.number} calls per case, best of 5")
    print(f"{'case':<30}{'us/call':>9}{'ratio':>8}")
    for name, micros in timings.items():
        print(f"{name:<30}{micros:>9.2f}{micros / floor:>7.1f}x")


if __name__ == "__main__":
    main()
