# authz-service and client-registry in one image.
#   docker build -t authz-service .
#   docker run -p 9001:9001 -p 9003:9003 -p 9004:9004 -p 9090:9090 \
#     -v "$PWD/keys.yaml:/etc/authz/keys.yaml:ro" authz-service
#   docker run -p 8081:8081 authz-service client-registry serve
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the project metadata alone, so that a source change reuses this layer.
COPY pyproject.toml README.md ./
COPY scripts/otel-protos ./scripts/
# DL3013 (pin versions) is ignored: "." is this project, whose dependency versions are bounded
# in pyproject.toml.
# hadolint ignore=DL3013
RUN mkdir -p src/authz_service src/client_registry \
    && touch src/authz_service/__init__.py src/client_registry/__init__.py \
    && pip install --no-cache-dir ".[postgresql,redis,tracing]" \
    && scripts/otel-protos \
    && pip uninstall --yes authz-service
COPY src ./src
# Bytecode is compiled now, so that the service runs on a read-only root filesystem.
RUN pip install --no-cache-dir --no-deps . \
    && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="authz-service" \
      org.opencontainers.image.description="Envoy ext_authz service admitting registered API clients by API key, and its reference client registry" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# The registry's SQLite database and generated tokens live here: mount a volume for them.
RUN mkdir -p /var/lib/client-registry /etc/authz \
    && chown 10001:10001 /var/lib/client-registry
# DL3064 (sensitive data in ENV) is ignored: REGISTRY_TOKENS_FILE names a file path, not a
# secret; tokens come from that file or from REGISTRY_*_TOKEN given at run time.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AUTHZ_KEYS_FILE=/etc/authz/keys.yaml \
    REGISTRY_DATABASE_URL=sqlite:////var/lib/client-registry/registry.db \
    REGISTRY_TOKENS_FILE=/var/lib/client-registry/registry-tokens.json
# A numeric, non-root user, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
# 9001: gRPC (ext_authz, health, reflection); 9003: gRPC (Envoy's access-log service);
# 9004: HTTP ext_authz (Envoy's http_service mode); 9090: /healthz, /readyz, /metrics;
# 8081: client-registry HTTP API.
EXPOSE 9001 9003 9004 9090 8081
ENTRYPOINT []
CMD ["authz-service", "serve"]
