"""authz_service.admin.v1.Admin (protos/authz_service/admin/v1/admin.proto).

Translates only: an ExplainRequest becomes a Request for the check core's ``explain``, an
InvalidateRequest an invalidation in the registry source; their results become the
responses. Key material
from a request is used for the lookup and never logged or returned.
"""

from __future__ import annotations

import re

import grpc

from authz_service import apikeys
from authz_service.admin.v1 import admin_pb2, admin_pb2_grpc
from authz_service.core import Checker
from authz_service.model import Authorization, Client, Decision, Request, Trace
from authz_service.reasons import OUTCOMES

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
_SHA256 = re.compile(r"[0-9a-f]{64}")

Context = grpc.aio.ServicerContext[object, object]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, checker: Checker) -> None:
        self._checker = checker

    async def Explain(  # noqa: N802 (the gRPC method name)
        self, message: admin_pb2.ExplainRequest, context: Context
    ) -> admin_pb2.ExplainResponse:
        who = message.WhichOneof("who")
        request = Request(
            is_http=True,
            authorization=Authorization((f"ApiKey {message.key}",) if who == "key" else ()),
            method=message.method or "GET",
            host=message.host,
            path=message.path.partition("?")[0].partition("#")[0],
            route=tuple(sorted(message.context_extensions.items())),
        )
        if who == "key":
            decision, trace = await self._checker.explain(request)
            return _explanation(decision, trace)
        if who != "client_id":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give key or client_id")
        client = self._checker.registry.find_client(message.client_id)
        resolution = "known_client"
        if client is None:
            if not message.roles:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"client {message.client_id!r} is not known to this replica; "
                    "pass roles to explain for a client with those roles",
                )
            resolution = "supplied_roles"
            client = Client(message.client_id, message.client_id, tuple(message.roles))
        decision, trace = await self._checker.explain(request, client)
        trace.resolution = resolution
        return _explanation(decision, trace)

    async def Invalidate(  # noqa: N802 (the gRPC method name)
        self, message: admin_pb2.InvalidateRequest, context: Context
    ) -> admin_pb2.InvalidateResponse:
        target = message.WhichOneof("target")
        if target is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "give key, key_sha256 or client_id"
            )
        if target == "key_sha256" and not _SHA256.fullmatch(message.key_sha256):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "key_sha256: 64 lower-case hex digits"
            )
        if target == "client_id":
            evicted = self._checker.registry.invalidate(None, message.client_id)
            what = f"client {message.client_id!r}"
        else:
            digest = (
                bytes.fromhex(message.key_sha256)
                if target == "key_sha256"
                else apikeys.digest(message.key)
            )
            evicted = self._checker.registry.invalidate(digest, None)
            what = f"key {apikeys.key_id(digest)}"
        if evicted is None:
            return admin_pb2.InvalidateResponse(
                evicted=0,
                detail="nothing cached: this replica reads its registry (the keys file or the "
                "snapshot) directly, so changes apply as soon as they are loaded",
            )
        return admin_pb2.InvalidateResponse(
            evicted=evicted, detail=f"evicted {evicted} cached answer(s) of {what}"
        )


def _explanation(decision: Decision, trace: Trace) -> admin_pb2.ExplainResponse:
    outcome = OUTCOMES[decision.reason]
    client = decision.client
    steps = []
    if trace.resolution in ("known_client", "supplied_roles"):
        credential = "skipped"
    elif trace.key_id is None:
        credential = decision.reason.value
        steps.append(f"credential: refused ({decision.reason.value}): {outcome.message}")
    else:
        credential = "valid"
        steps.append(f"credential: an ApiKey, key id {trace.key_id}")
    if trace.resolution == "memory":
        steps.append("resolution: answered from memory (the cache or the loaded registry copy)")
    elif trace.resolution == "registry":
        registry_ms = (trace.registry_seconds or 0) * 1000
        steps.append(f"resolution: asked the registry ({registry_ms:.1f} ms)")
    elif trace.resolution == "known_client":
        steps.append("resolution: skipped; the client is known to this replica")
    elif trace.resolution == "supplied_roles":
        steps.append("resolution: skipped; the client is unknown here, so the roles given are used")
    if client is not None:
        roles = ", ".join(client.roles) or "none"
        steps.append(f"client: {client.client_id} ({client.name}); roles: {roles}")
    elif trace.key_id is not None:
        steps.append(f"client: none, the registry refused the key ({decision.reason.value})")
    if trace.policy_path is not None:
        steps.append(f"path compared by the policy rules: {trace.policy_path}")
    if client is not None:
        steps.append(_policy_step(decision))
    if decision.dry_run_rule is not None:
        steps.append(f"dry-run: rule {decision.dry_run_rule} would have denied this request")
    verdict = "allow" if decision.allowed else "deny"
    steps.append(f"decision: {verdict} ({decision.reason.value}), HTTP {outcome.status.http}")
    return admin_pb2.ExplainResponse(
        decision=verdict,
        reason=decision.reason.value,
        http_status=outcome.status.http,
        credential=credential,
        key_id=trace.key_id or "",
        resolution=trace.resolution or "",
        client=None
        if client is None
        else admin_pb2.Client(client_id=client.client_id, name=client.name, roles=client.roles),
        rule=decision.rule or "",
        dry_run_rule=decision.dry_run_rule or "",
        normalized_path=trace.policy_path or "",
        steps=steps,
    )


def _policy_step(decision: Decision) -> str:
    if decision.rule is None:
        return "policy: allowed (no policy rule applies; the policy allows by default)"
    if decision.allowed:
        return f"policy: rule {decision.rule} allows this client"
    return f"policy: rule {decision.rule} denies this client ({decision.reason.value})"
