"""client-registry: the reference client registry. It registers API clients, issues, revokes and
regenerates their keys, and answers the ext_authz service over HTTP (validation, snapshot,
change feed). It shares no in-process state with the ext_authz service."""
