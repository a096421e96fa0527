"""The Authorization handler answers every input with a CheckResponse, never an exception."""

from __future__ import annotations

import asyncio
from typing import Any

from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.answers import AnswerSettings
from authz_service.core import Checker, CheckSettings
from authz_service.credentials import CredentialRules
from authz_service.envoy_codec import Encoder
from authz_service.grpc_server import AuthorizationServicer
from tests.fakes import FakeRegistry


class Context:
    def time_remaining(self) -> float:
        return 1.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
async def test_arbitrary_request_bytes_get_a_denial_and_never_an_error(raw: bytes) -> None:
    """Garbage, truncated or random protobuf bytes are denied; nothing raises. The handler runs
    on a worker thread, as on the check server, with the event loop behind it."""
    checker = Checker(
        FakeRegistry({}),
        CheckSettings(CredentialRules(), check_timeout=1.0),
        asyncio.get_running_loop(),
    )
    servicer = AuthorizationServicer(checker, Encoder(AnswerSettings()), max_message_bytes=256)
    context: Any = Context()
    response = CheckResponse.FromString(await asyncio.to_thread(servicer.check, raw, context))
    assert response.status.code != 0
