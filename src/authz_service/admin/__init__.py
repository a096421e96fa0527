"""The project's own gRPC admin API: the servicer here, the generated modules in ``v1``."""
