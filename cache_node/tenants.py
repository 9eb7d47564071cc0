"""Tenant names with a meaning of their own (a module of its own so every process can import
them cheaply, the data-plane workers included)."""

#: Sees and manages every tenant's pipelines.
ADMIN_TENANT = "admin"
#: The only tenant when auth is off (no tokens file).
DEFAULT_TENANT = "default"
