"""authz-service: an Envoy ext_authz gRPC service that admits registered API clients by API key."""

__version__ = "0.1.0"
