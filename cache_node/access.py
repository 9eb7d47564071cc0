"""Who may use which origin, with whose credentials: the tokens file and the source checks (I7).

The tokens file (``serve --tokens FILE``) is JSON in one of two shapes. The first is the original
one and stays valid: an object mapping each bearer token to a tenant name::

    {"tok-a": "team-a", "tok-ops": "admin"}

The second adds a policy per tenant (keyed by tenant, since a tenant may hold several tokens)::

    {
      "tokens": {"tok-a": "team-a", "tok-a2": "team-a", "tok-ops": "admin"},
      "tenants": {
        "team-a": {
          "sources": ["s3://bucket-a/", "hf://org-a/", "file:///srv/models/team-a/"],
          "hf": {"token": "hf_...", "endpoint": "https://huggingface.co"},
          "s3": {"access_key_id": "...", "secret_access_key": "...", "session_token": "...",
                 "profile": "...", "endpoint_url": "...", "region": "..."},
          "local_roots": ["/srv/models/team-a"]
        }
      }
    }

Every key of a tenant's policy is optional, and each one only narrows or replaces what the node
gives everyone:

- ``sources``: the source prefixes the tenant may register. A prefix matches whole path segments
  of the parsed source (``s3://bucket-a/`` allows ``s3://bucket-a/x`` but not
  ``s3://bucket-ab/x``; ``hf://org/`` allows ``hf://org/m`` but not ``hf://org-evil/m``),
  compared exactly (case included) after the source is parsed, so ``..``, ``%2e`` and the like
  are refused or normalised before matching. Omitted: any source the node accepts.
- ``hf`` / ``s3``: the tenant's own origin credentials, used for every origin request of its
  pipelines. ``s3`` fields left out keep the node's endpoint and region; credentials are the
  tenant's alone once it gives any (keys or a profile). Omitted: the node's credentials.
- ``local_roots``: where the tenant's ``file://`` sources may lie; each must be inside one of
  the node's ``--local-root`` dirs. Omitted: the node's ``--local-root`` dirs.

A token's value may also be an object ``{"tenant": NAME, ...policy}``, the policy inline.
A source outside the tenant's ``sources`` is ``SourceNotAllowed`` (HTTP 403
``source_not_allowed``); a ``file://`` source outside the local roots (or on a node with none) is
``LocalSourceNotAllowed`` (HTTP 400 ``invalid_input`` with a ``reason``). Both are raised before
anything is recorded or fetched, and logged as a ``source.refused`` event. Secrets are held as
``SecretStr`` and never logged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from api.schema import ModelSpec
from cache_node.errors import LocalSourceNotAllowed, NotFound, SourceNotAllowed
from cache_node.events import emit, redact
from cache_node.origins import check_local_source
from cache_node.origins.base import SourceRef, parse_source
from cache_node.settings import HFSettings, NodeSettings, S3Settings
from cache_node.tenants import ADMIN_TENANT, DEFAULT_TENANT
from cache_node.tokens_file import TokensFile

__all__ = [
    "AccessConfig",
    "TenantAccess",
    "TenantPolicy",
    "access_parser",
    "check_access",
    "is_loopback_host",
    "load_access",
    "open_tokens_file",
    "parse_access",
    "source_segments",
]

_POLICY_KEYS = frozenset({"sources", "hf", "hf_token", "s3", "local_roots"})
_S3_KEYS = frozenset(
    {"access_key_id", "secret_access_key", "session_token", "profile", "endpoint_url", "region"}
)
_S3_CREDENTIALS = frozenset({"access_key_id", "secret_access_key", "session_token", "profile"})
_HF_KEYS = frozenset({"token", "endpoint"})


@dataclass(frozen=True)
class Prefix:
    """An allowed source prefix: a scheme and the leading path segments it covers."""

    scheme: str
    segments: tuple[str, ...]

    def covers(self, scheme: str, segments: tuple[str, ...]) -> bool:
        if scheme != self.scheme or segments[: len(self.segments)] != self.segments:
            return False
        # "hf://org-a/" is a namespace: it covers the repos in it, not a repo named "org-a"
        # (a namespace-less repo, like the old "gpt2", is another thing on the hub).
        return not (scheme == "hf" and len(self.segments) == 1 and len(segments) == 1)


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's allowance and origin credentials (None: the node's)."""

    sources: tuple[Prefix, ...] | None = None
    hf: dict[str, Any] | None = None
    s3: dict[str, Any] | None = None
    local_roots: tuple[Path, ...] | None = None


@dataclass(frozen=True)
class AccessConfig:
    """The parsed tokens file: token → tenant, and the tenants that have a policy."""

    tokens: dict[str, str]
    tenants: dict[str, TenantPolicy]


def load_access(path: Path) -> AccessConfig:
    """Parse a tokens file (either shape). Raises ValueError naming what is wrong, no secret."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc}") from None
    return parse_access(text, path=path)


def parse_access(text: bytes | str, *, path: Path | str = "") -> AccessConfig:
    """Parse the bytes of a tokens file (either shape). Raises ValueError naming what is wrong,
    never a token (the JSON decoder names a line and column, not the text around it)."""
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("tokens file must be a JSON object")
    structured = isinstance(raw.get("tokens"), dict) or isinstance(raw.get("tenants"), dict)
    if structured:
        if set(raw) - {"tokens", "tenants"}:
            raise ValueError("a tokens file with a 'tokens' section has only 'tokens', 'tenants'")
        token_map, tenant_map = raw.get("tokens", {}), raw.get("tenants", {})
        if not isinstance(token_map, dict) or not isinstance(tenant_map, dict):
            raise ValueError("'tokens' and 'tenants' must be JSON objects")
    else:
        token_map, tenant_map = raw, {}
    tokens: dict[str, str] = {}
    policies: dict[str, dict[str, Any]] = {}
    for index, (token, value) in enumerate(token_map.items()):
        where = f"token #{index + 1}"  # never the token itself
        if not isinstance(token, str) or not token:
            raise ValueError(f"{where}: a token must be a non-empty string")
        if isinstance(value, dict):
            tenant = value.get("tenant")
            inline = {k: v for k, v in value.items() if k != "tenant"}
            if inline:
                if tenant in policies and policies[tenant] != inline:
                    raise ValueError(f"{where}: tenant {tenant!r} has two different policies")
                policies[str(tenant)] = inline
        else:
            tenant = value
        if not isinstance(tenant, str) or not tenant:
            raise ValueError(f"{where}: the tenant must be a non-empty string")
        tokens[token] = tenant
    for tenant, policy in tenant_map.items():
        if not isinstance(policy, dict):
            raise ValueError(f"tenant {tenant!r}: its policy must be a JSON object")
        if tenant in policies and policies[tenant] != policy:
            raise ValueError(f"tenant {tenant!r} has two different policies")
        policies[tenant] = policy
    return AccessConfig(
        tokens=tokens,
        tenants={name: _policy(name, policy) for name, policy in policies.items()},
    )


def _policy(tenant: str, raw: dict[str, Any]) -> TenantPolicy:
    unknown = set(raw) - _POLICY_KEYS
    if unknown:
        raise ValueError(f"tenant {tenant!r}: unknown keys {sorted(unknown)}")
    sources = raw.get("sources")
    if sources is not None and (
        not isinstance(sources, list) or not all(isinstance(s, str) for s in sources)
    ):
        raise ValueError(f"tenant {tenant!r}: 'sources' must be a list of source prefixes")
    hf = dict(raw.get("hf") or {})
    if "hf_token" in raw:
        hf["token"] = raw["hf_token"]
    if set(hf) - _HF_KEYS or not all(isinstance(v, str) for v in hf.values()):
        raise ValueError(f"tenant {tenant!r}: 'hf' takes string fields {sorted(_HF_KEYS)}")
    s3 = raw.get("s3")
    if s3 is not None and (
        not isinstance(s3, dict)
        or set(s3) - _S3_KEYS
        or not all(isinstance(v, str) for v in s3.values())
    ):
        raise ValueError(f"tenant {tenant!r}: 's3' takes string fields {sorted(_S3_KEYS)}")
    roots = raw.get("local_roots")
    if roots is not None and (
        not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots)
    ):
        raise ValueError(f"tenant {tenant!r}: 'local_roots' must be a list of directories")
    return TenantPolicy(
        sources=None if sources is None else tuple(_prefix(tenant, s) for s in sources),
        hf=hf or None,
        s3=s3,
        local_roots=None if roots is None else tuple(Path(r).resolve() for r in roots),
    )


def _prefix(tenant: str, text: str) -> Prefix:
    """An allowed prefix, parsed like a source (so both compare in one canonical form)."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("hf", "s3", "file") or parts.query or parts.fragment or "@" in text:
        raise ValueError(
            f"tenant {tenant!r}: source prefix {text!r} must be hf://ORG[/REPO], "
            "s3://BUCKET[/PREFIX] or file:///DIR, without a revision"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"tenant {tenant!r}: {text!r} is not an absolute file:// path")
        return Prefix("file", Path(unquote(parts.path)).resolve().parts)
    # the path as parse_source reads it: leading slashes dropped, trailing ones too
    path = unquote(parts.path).strip("/")
    segments = [parts.netloc, *path.split("/")] if path else [parts.netloc]
    while segments and segments[-1] == "":
        segments.pop()
    if not segments:  # "hf://": every source of the scheme
        return Prefix(scheme, ())
    if any(s in (".", "..") for s in segments) or segments[0] == "":
        raise ValueError(f"tenant {tenant!r}: invalid source prefix {text!r}")
    return Prefix(scheme, tuple(segments))


def source_segments(ref: SourceRef) -> tuple[str, ...]:
    """A parsed source as the path segments a prefix is matched against.

    S3 ``bucket/models/llama`` lists the keys under ``models/llama/``, so a prefix covering
    segments ``(bucket, models)`` covers exactly what the origin will read. Local paths are
    resolved (symlinks too), as the local origin will open them.
    """
    if ref.scheme == "file":
        return Path(ref.location).resolve().parts
    segments = ref.location.split("/")
    while len(segments) > 1 and segments[-1] == "":
        segments.pop()
    return tuple(segments)


def check_access(config: AccessConfig, settings: NodeSettings) -> AccessConfig:
    """``config`` if this node can enforce it (every tenant's local roots lie inside the
    node's ``--local-root`` dirs); ValueError otherwise."""
    for tenant, policy in config.tenants.items():
        for root in policy.local_roots or ():
            if not any(root.is_relative_to(r) for r in settings.local_roots):
                raise ValueError(
                    f"tenant {tenant!r}: local root {root} is not inside a --local-root dir"
                )
    return config


def access_parser(settings: NodeSettings) -> Callable[[bytes], AccessConfig]:
    """How every process of a node reads its tokens file: parsed and checked alike, so the API
    and the data-plane workers accept (or keep refusing) exactly the same edits."""
    path = settings.tokens_file or ""

    def parse(text: bytes) -> AccessConfig:
        return check_access(parse_access(text, path=path), settings)

    return parse


def open_tokens_file(
    settings: NodeSettings,
    *,
    process: str,
    fallback: bytes | None = None,
    on_result: Callable[[bool], None] | None = None,
    report: bool = True,
) -> TokensFile | None:
    """The node's tokens file as this process follows it (None: no ``--tokens``, auth off).

    Raises ValueError when the file cannot be used and there is no ``fallback`` (the bytes of
    the config the node last accepted) to start from.
    """
    if settings.tokens_file is None:
        return None
    return TokensFile(
        Path(settings.tokens_file),
        access_parser(settings),
        process=process,
        fallback=fallback,
        on_result=on_result,
        report=report,
    )


class TenantAccess:
    """The node's view of the tokens file: tenants, their allowances and credentials.

    The file is followed while the node runs (:class:`cache_node.tokens_file.TokensFile`):
    ``tokens`` and ``policies`` are always those of the last version that parsed, so a token
    is rotated or revoked by editing the file, and an edit that does not parse changes nothing.
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.file = open_tokens_file(settings, process="api")
        # per config: a reload starts a new cache, so a tenant's new credentials apply at once
        self._settings: tuple[AccessConfig | None, dict[str, NodeSettings]] = (None, {})

    @property
    def config(self) -> AccessConfig | None:
        """The config in force; None when auth is off (never because a reload failed)."""
        return None if self.file is None else self.file.config

    @property
    def tokens(self) -> dict[str, str] | None:
        """Token → tenant, or None when auth is off."""
        config = self.config
        return None if config is None else config.tokens

    @property
    def policies(self) -> dict[str, TenantPolicy]:
        config = self.config
        return {} if config is None else config.tenants

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant a bearer token belongs to; None when it is missing or unknown."""
        tokens = self.tokens
        if tokens is None:
            return DEFAULT_TENANT
        if token is None:
            return None
        return tokens.get(token)

    def acting_tenant(self, caller: str, requested: str | None) -> str:
        """The tenant a request acts for: ``?tenant=NAME`` lets admin address NAME's pipelines
        (two tenants may use one id); anyone else may name only itself. A tenant that is not
        the caller's to address, or that does not exist, is a 404, like a missing pipeline."""
        if requested is None or requested == caller:
            return caller
        if caller == ADMIN_TENANT:
            tokens = self.tokens
            known = set(tokens.values()) if tokens is not None else {DEFAULT_TENANT}
            if requested in known:
                return requested
        emit("tenant.refused", level=logging.WARNING, caller=caller, requested=requested)
        raise NotFound(f"no tenant {requested!r} here", tenant=requested)

    def settings_for(self, tenant: str) -> NodeSettings:
        """The node's settings with this tenant's credentials and local roots in place."""
        config = self.config
        cached_for, cache = self._settings
        if cached_for is not config:
            cache = {}
            self._settings = (config, cache)
        cached = cache.get(tenant)
        if cached is not None:
            return cached
        policy = None if config is None else config.tenants.get(tenant)
        settings = self.settings
        if policy is not None:
            update: dict[str, Any] = {}
            if policy.hf is not None:
                update["hf"] = _tenant_hf(settings.hf, policy.hf)
            if policy.s3 is not None:
                update["s3"] = _tenant_s3(settings.s3, policy.s3)
            if policy.local_roots is not None:
                update["local_roots"] = list(policy.local_roots)
            settings = settings.model_copy(update=update)
        cache[tenant] = settings
        return settings

    def check_source(self, tenant: str, model: ModelSpec, *, pipeline: str) -> SourceRef:
        """Parse a model's source and check this tenant may use it; opens nothing.

        Raises InvalidInput (400) for a malformed source, LocalSourceNotAllowed (400) for a
        ``file://`` source outside the local roots, SourceNotAllowed (403) for one outside the
        tenant's ``sources``; the last two with a ``source.refused`` event.
        """
        ref = parse_source(model.source, model.revision)
        try:
            policy = self.policies.get(tenant)
            if policy is not None and policy.sources is not None:
                segments = source_segments(ref)
                if not any(p.covers(ref.scheme, segments) for p in policy.sources):
                    raise SourceNotAllowed(
                        f"source {model.source!r} is outside the sources tenant {tenant!r} "
                        "may use",
                        reason="outside_tenant_sources",
                    )
            if ref.scheme == "file":
                check_local_source(Path(ref.location), self.settings_for(tenant))
        except (SourceNotAllowed, LocalSourceNotAllowed) as exc:
            emit("source.refused", level=logging.WARNING, tenant=tenant, pipeline=pipeline,
                 source=redact(model.source), reason=exc.details.get("reason"))
            raise
        return ref


def _tenant_hf(node: HFSettings, raw: dict[str, Any]) -> HFSettings:
    update: dict[str, Any] = {"token": SecretStr(raw["token"]) if raw.get("token") else None}
    if raw.get("endpoint"):
        update["endpoint"] = raw["endpoint"]
    return node.model_copy(update=update)


def _tenant_s3(node: S3Settings, raw: dict[str, Any]) -> S3Settings:
    # model_copy skips the validator that would fill credentials from AWS_*: once a tenant
    # gives any credential, the node's own (and the environment's) never mix in.
    update: dict[str, Any] = {
        name: raw.get(name) for name in ("endpoint_url", "region") if raw.get(name)
    }
    if _S3_CREDENTIALS & set(raw):
        update.update(
            access_key_id=raw.get("access_key_id"),
            secret_access_key=_secret(raw.get("secret_access_key")),
            session_token=_secret(raw.get("session_token")),
            profile=raw.get("profile"),
        )
    return node.model_copy(update=update)


def _secret(value: str | None) -> SecretStr | None:
    return SecretStr(value) if value else None


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (a wildcard or a name that resolves
    anywhere else does not)."""
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )
