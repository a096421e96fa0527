from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExplainRequest(_message.Message):
    __slots__ = ("method", "host", "path", "key", "client_id", "roles", "context_extensions")
    class ContextExtensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    key: str
    client_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    context_extensions: _containers.ScalarMap[str, str]
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., key: _Optional[str] = ..., client_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., context_extensions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("decision", "reason", "http_status", "credential", "key_id", "resolution", "client", "rule", "dry_run_rule", "normalized_path", "steps")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_RULE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_PATH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    decision: str
    reason: str
    http_status: int
    credential: str
    key_id: str
    resolution: str
    client: Client
    rule: str
    dry_run_rule: str
    normalized_path: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decision: _Optional[str] = ..., reason: _Optional[str] = ..., http_status: _Optional[int] = ..., credential: _Optional[str] = ..., key_id: _Optional[str] = ..., resolution: _Optional[str] = ..., client: _Optional[_Union[Client, _Mapping]] = ..., rule: _Optional[str] = ..., dry_run_rule: _Optional[str] = ..., normalized_path: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class Client(_message.Message):
    __slots__ = ("client_id", "name", "roles")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., name: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("key", "key_sha256", "client_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    key_sha256: str
    client_id: str
    def __init__(self, key: _Optional[str] = ..., key_sha256: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("evicted", "detail")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    detail: str
    def __init__(self, evicted: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...
