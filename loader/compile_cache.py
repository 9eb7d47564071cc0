"""The engine's compile cache, kept with the pipeline: ``weightcache launch``'s half of it.

With compilation on (no ``--enforce-eager``), vLLM compiles the model at every start
(torch.compile: Dynamo traces it, Inductor generates and builds kernels) unless it finds the
result under ``$VLLM_CACHE_ROOT/torch_compile_cache``. The launcher keeps that directory on the
node as a capture of kind ``compile_cache`` (a gzip tarball), keyed by
:func:`compile_cache_key`: the engine and its version, the model's ``config.json`` (its blob's
sha256), the TP size, the device kind, and a digest of the settings that change compiled code
(:func:`settings_digest`). Before the engine starts, a cache of that key is fetched and
unpacked into ``VLLM_CACHE_ROOT`` (:func:`fetch`); after a start that found none, once the
engine answers, the directory is packed (at most ``limit`` bytes) and uploaded
(:func:`upload`). vLLM checks its own hash of everything it compiled from before it uses a
file there, so a cache that does not apply is compiled again, never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path

import torch

from api.schema import CaptureKey, Manifest
from loader.captures import CaptureClient, device_kind, explain_miss
from loader.errors import LoaderError

__all__ = [
    "CACHE_DIR",
    "CompileCache",
    "cache_files",
    "compile_cache_key",
    "engine_version",
    "fetch",
    "pack",
    "settings_digest",
    "upload",
]

#: What vLLM writes under ``VLLM_CACHE_ROOT`` when it compiles (and reads back).
CACHE_DIR = "torch_compile_cache"
#: Flags that change how the engine is reached or logs, never the code it compiles. Every
#: other flag is in the settings digest: a flag it does not know costs a cache miss, not a
#: wrong cache.
_NOT_COMPILED = frozenset({
    "--host", "--port", "--api-key", "--served-model-name", "--uvicorn-log-level",
    "--root-path", "--allowed-origins", "--allowed-methods", "--allowed-headers",
    "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--load-format",
    "--model-loader-extra-config", "--middleware", "--log-config-file",
})
#: The same, for flags that take no value (the next word is another flag's).
_NOT_COMPILED_SWITCHES = frozenset({
    "--disable-log-requests", "--disable-log-stats", "--enable-log-requests",
    "--disable-uvicorn-access-log",
})
#: Environment variables of vLLM's that are not about compiled code (or are secrets).
_ENV_NOT_COMPILED = frozenset({
    "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "VLLM_API_KEY", "VLLM_NO_USAGE_STATS",
    "VLLM_USAGE_SOURCE", "VLLM_USAGE_STATS_SERVER", "VLLM_LOGGING_LEVEL",
    "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_PREFIX", "VLLM_CONFIGURE_LOGGING",
})
#: Read by the engine's own interpreter: vLLM's version, without importing vLLM (seconds).
_VERSION_PROBE = (
    "import importlib.util, pathlib\n"
    "spec = importlib.util.find_spec('vllm')\n"
    "path = pathlib.Path(spec.origin).with_name('_version.py')\n"
    "found = {}\n"
    "exec(path.read_text(), found)\n"
    "print(found['__version__'])\n"
)
_SHEBANG = re.compile(rb"^#!\s*(\S+)")


def engine_version(argv: Sequence[str]) -> str | None:
    """The version of the vLLM that ``argv`` runs (asked of its own interpreter); None when
    it cannot be told (then there is no compile cache: its key needs the version)."""
    program = shutil.which(argv[0]) if argv else None
    if program is None:
        return None
    interpreter = program
    if not Path(program).name.startswith("python"):
        with open(program, "rb") as handle:
            match = _SHEBANG.match(handle.readline())
        if match is None:
            return None
        interpreter = os.fsdecode(match.group(1))
    try:
        answer = subprocess.run([interpreter, "-c", _VERSION_PROBE], capture_output=True,
                                text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    version = answer.stdout.strip()
    return version or None


def settings_digest(
    argv: Sequence[str], *, model_dir: Path, environ: Mapping[str, str]
) -> str:
    """A sha256 of what changes the code the engine compiles: its flags (but those of
    :data:`_NOT_COMPILED`), the path it reads the model from (vLLM hashes it too) and vLLM's
    environment variables (but those of :data:`_ENV_NOT_COMPILED`)."""
    flags: list[str] = []
    skip = False
    for word in argv[1:]:
        if skip and not word.startswith("--"):  # the value of a flag left out
            skip = False
            continue
        skip = False
        name = word.split("=", 1)[0]
        if name in _NOT_COMPILED_SWITCHES:
            continue
        if name in _NOT_COMPILED:
            skip = "=" not in word
            continue
        flags.append(word)
    env = sorted((k, v) for k, v in environ.items()
                 if k.startswith("VLLM_") and k not in _ENV_NOT_COMPILED)
    document = {"argv": flags, "model_dir": str(model_dir), "env": env}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def compile_cache_key(
    manifest: Manifest, *, model: str | None, tp_size: int, version: str, settings: str,
) -> CaptureKey | None:
    """The key of the compile cache for this engine; None when the model has no
    ``config.json`` (nothing to key the architecture by)."""
    names = sorted({f.model for f in manifest.files} | {t.model for t in manifest.tensors})
    name = model or (names[0] if len(names) == 1 else None)
    config = next((f.blob for f in manifest.files
                   if f.path == "config.json" and f.model == name), None)
    if name is None or config is None:
        return None
    accelerator = getattr(torch, "accelerator", None)
    kind = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
    device = torch.device(kind.type, 0) if kind is not None else torch.device("cpu")
    return CaptureKey(kind="compile_cache", model=name, engine="vllm", engine_version=version,
                      tp_size=tp_size, device=device_kind(device), config=config,
                      settings=settings)


def cache_files(root: Path) -> set[str]:
    """The files under ``root/torch_compile_cache``, relative to ``root``."""
    base = root / CACHE_DIR
    if not base.is_dir():
        return set()
    return {str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()}


def fetch(
    client: CaptureClient, key: CaptureKey, root: Path, *, max_unpacked: int = 8 << 30
) -> tuple[int, str]:
    """Unpack the node's compile cache of ``key`` into ``root``: (bytes fetched, what
    happened). A tarball with a member outside ``root/torch_compile_cache`` (an absolute path,
    a ``..``), anything but plain files and directories (links, devices), or that unpacks to
    more than ``max_unpacked`` bytes is refused whole
    (LoaderError, or tarfile's error): it is unpacked beside ``root`` first and moved in only
    once all of it is out, so a refused one leaves nothing in the engine's cache."""
    found = client.find(key)
    if found is None:
        return 0, explain_miss(key, client.list())
    root.mkdir(parents=True, exist_ok=True)
    # on root's filesystem, so that moving the files in is a rename
    with tempfile.TemporaryDirectory(prefix=".weightcache-cc-", dir=root) as scratch:
        tarball = Path(scratch) / "cache.tar.gz"
        client.download(found, tarball)
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(tarball, "r:gz") as archive:
            members = archive.getmembers()
            _check_members(members, label=f"compile cache {found.id[:12]}",
                           max_unpacked=max_unpacked)
            archive.extractall(unpacked, members=members, filter="data")
        _move_in(unpacked / CACHE_DIR, root / CACHE_DIR)
    return found.bytes, f"capture {found.id[:12]}"


def _check_members(members: list[tarfile.TarInfo], *, label: str, max_unpacked: int) -> None:
    """Only plain files and directories, each under ``CACHE_DIR`` by a path of plain names
    (no ``..``, no ``.``, not absolute), and at most ``max_unpacked`` bytes in all."""
    total = 0
    for member in members:
        parts = member.name.split("/")
        if parts[0] != CACHE_DIR or any(p in ("", ".", "..") for p in parts[1:]):
            raise LoaderError(f"{label}: {member.name!r} is not a path under {CACHE_DIR}/")
        if not (member.isfile() or member.isdir()):
            raise LoaderError(f"{label}: {member.name!r} is not a plain file or directory")
        total += member.size if member.isfile() else 0
        if total > max_unpacked:
            raise LoaderError(f"{label}: unpacks to more than {max_unpacked / 1e6:.0f} MB")


def _move_in(source: Path, dest: Path) -> None:
    """Every file under ``source`` to the same place under ``dest`` (renames, replacing)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


def pack(root: Path, *, limit: int, into: Path) -> tuple[Path | None, str]:
    """A gzip tarball of ``root/torch_compile_cache`` at ``into``: (its path, or None and why
    there is none: nothing compiled, or larger than ``limit`` bytes)."""
    base = root / CACHE_DIR
    if not cache_files(root):
        return None, f"nothing compiled under {base}"
    with tarfile.open(into, "w:gz") as archive:
        archive.add(base, arcname=CACHE_DIR)
    size = into.stat().st_size
    if size > limit:
        into.unlink()
        return None, f"{size / 1e6:.1f} MB packed, over the {limit / 1e6:.1f} MB limit"
    return into, f"{size / 1e6:.1f} MB"


def upload(client: CaptureClient, key: CaptureKey, root: Path, *, limit: int) -> str:
    """Pack and upload ``root``'s compile cache; says what it did."""
    with tempfile.TemporaryDirectory(prefix="weightcache-cc-") as scratch:
        tarball, note = pack(root, limit=limit, into=Path(scratch) / "cache.tar.gz")
        if tarball is None:
            return f"not uploaded: {note}"
        info = client.upload_file(key, tarball)
    return f"uploaded {info.bytes / 1e6:.1f} MB (capture {info.id[:12]})"


class CompileCache:
    """One launch's compile cache: fetched before the engine starts (:meth:`prepare`); when
    there was none to fetch, uploaded once the engine answers (:meth:`after_ready`)."""

    def __init__(
        self, *, client: CaptureClient, key: CaptureKey, root: Path, limit: int,
        fetched: bool, say: Callable[[str], None],
    ) -> None:
        self.client = client
        self.key = key
        self.root = root
        self.limit = limit
        self.fetched = fetched
        self.say = say

    @classmethod
    def prepare(
        cls, argv: Sequence[str], *, manifest: Manifest, model: str | None, tp_size: int,
        model_dir: Path, url: str, token: str | None, pipeline: str,
        env: MutableMapping[str, str], limit: int, say: Callable[[str], None],
    ) -> CompileCache | None:
        """Key the cache, point the engine's ``VLLM_CACHE_ROOT`` at it (in ``env``, for the
        engine only: never this process's environment) and fetch it; None when there is
        none to keep (compilation off, the limit 0, vLLM's version unknown)."""
        if limit <= 0:
            say("compile cache: off (--compile-cache-limit 0)")
            return None
        if "--enforce-eager" in argv:
            say("compile cache: none, compilation is off (--enforce-eager)")
            return None
        version = engine_version(argv)
        if version is None:
            say(f"compile cache: none, cannot tell the vLLM version of {argv[0]!r}")
            return None
        # the user's cache root, else one per pipeline (and model) beside its staged files
        root = Path(env.get("VLLM_CACHE_ROOT")
                    or model_dir.parent / f".{model_dir.name}.vllm-cache")
        env["VLLM_CACHE_ROOT"] = str(root)
        settings = settings_digest(argv, model_dir=model_dir, environ=env)
        key = compile_cache_key(manifest, model=model, tp_size=tp_size, version=version,
                                settings=settings)
        if key is None:
            say("compile cache: none, the model has no config.json to key it by")
            return None
        client = CaptureClient(url, pipeline, token=token, timeout=300)
        try:
            # compiled code packs about 3:1; 8x the upload limit bounds a tarball bomb
            fetched, note = fetch(client, key, root, max_unpacked=8 * limit)
        except Exception as exc:  # a cache is an optimisation: the engine compiles instead
            fetched, note = 0, f"could not be fetched: {getattr(exc, 'code', '')} {exc}"
        if fetched:
            say(f"compile cache: fetched {fetched / 1e6:.1f} MB into {root} ({note})")
        else:
            say(f"compile cache: none for this engine yet ({note})")
        return cls(client=client, key=key, root=root, limit=limit, fetched=bool(fetched),
                   say=say)

    def after_ready(self) -> None:
        """The engine answers: upload its compile cache, unless it started from the node's
        (every engine of this key compiles the same code: one upload is enough)."""
        try:
            if self.fetched:
                self.say("compile cache: the engine started from the node's, nothing uploaded")
                return
            self.say(f"compile cache: {upload(self.client, self.key, self.root, limit=self.limit)}")
        except Exception as exc:  # the engine serves either way
            self.say(f"compile cache: not uploaded: {getattr(exc, 'code', '')} {exc}")
        finally:
            self.client.close()
