"""The launcher's compile cache, without vLLM: keys, packing, fetching, and what never unpacks.

A real node holds a pipeline; the engine is a directory of files standing in for what vLLM
writes under ``$VLLM_CACHE_ROOT/torch_compile_cache``.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.schema import Manifest
from loader.captures import CaptureClient
from loader.compile_cache import (
    CACHE_DIR,
    CompileCache,
    cache_files,
    compile_cache_key,
    engine_version,
    fetch,
    settings_digest,
    upload,
)
from loader.errors import LoaderError
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state
from tests.fixtures.weights import write_weights

ARGV = ["vllm", "serve", "/m", "--dtype", "float32", "--port", "8000", "--host=0.0.0.0"]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    source = tmp_path / "src"
    write_weights(source)
    (source / "config.json").write_text(json.dumps({"model_type": "toy"}))
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}]}
        assert c.put("/v1/pipelines/p", json=body).status_code == 202
        assert wait_for_state(c, "p", {"warm", "failed"})["state"] == "warm"
        yield node


def _manifest(node: RunningNode) -> Manifest:
    with node.client() as c:
        return Manifest.model_validate(c.get("/v1/pipelines/p/manifest").json())


def _compiled(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / CACHE_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_the_settings_digest_keeps_what_changes_compiled_code_only() -> None:
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": "/a", "HOME": "/h"}
    base = settings_digest(ARGV, model_dir=Path("/m"), environ=environ)
    # where the engine listens and where its cache lies: the same compiled code
    moved = ["vllm", "serve", "/m", "--dtype", "float32", "--port", "9000", "--host=::"]
    assert settings_digest(moved, model_dir=Path("/m"),
                           environ={**environ, "VLLM_CACHE_ROOT": "/b", "HOME": "/x"}) == base
    # a dtype, a flag it does not know, another model path or a vLLM variable: another key
    for argv, model_dir, env in (
        (["vllm", "serve", "/m", "--dtype", "bfloat16", "--port", "8000"], "/m", environ),
        ([*ARGV, "--some-new-flag"], "/m", environ),
        (ARGV, "/elsewhere", environ),
        (ARGV, "/m", {**environ, "VLLM_CPU_KVCACHE_SPACE": "2"}),
    ):
        assert settings_digest(argv, model_dir=Path(model_dir), environ=env) != base
    # the flag after a switch left out is kept (a switch takes no value), and so is a flag
    # where a left-out flag's value would be
    for left_out in (["--disable-log-stats"], ["--port"]):
        one, other = (settings_digest([*ARGV, *left_out, flag, "fp8"], model_dir=Path("/m"),
                                      environ=environ)
                      for flag in ("--quantization", "--kv-cache-dtype"))
        assert one != other, left_out


def test_the_key_names_the_models_config_blob(node: RunningNode) -> None:
    manifest = _manifest(node)
    key = compile_cache_key(manifest, model=None, tp_size=1, version="0.32.0",
                            settings="0" * 64)
    assert key is not None
    config = next(f.blob for f in manifest.files if f.path == "config.json")
    assert (key.kind, key.model, key.config, key.engine_version) == (
        "compile_cache", "llm", config, "0.32.0")
    assert key.device.startswith(("cpu-", "cuda-", "rocm-"))
    assert compile_cache_key(manifest, model="other", tp_size=1, version="0.32.0",
                             settings="0" * 64) is None


def test_a_compile_cache_goes_up_and_comes_back_into_another_root(
    node: RunningNode, tmp_path: Path
) -> None:
    key = compile_cache_key(_manifest(node), model=None, tp_size=1, version="0.32.0",
                            settings="1" * 64)
    assert key is not None
    first, second = tmp_path / "host-a", tmp_path / "host-b"
    files = {"torch_aot_compile/abc/rank_0_0/model": b"aot" * 1000,
             "torch_aot_compile/abc/inductor_cache/x.so": bytes(range(256)) * 40}
    _compiled(first, files)
    with CaptureClient(node.url, "p") as client:
        assert fetch(client, key, second) == (0, "no compile_cache capture of model 'llm' "
                                                 "on the node yet")
        assert upload(client, key, first, limit=1 << 20).startswith("uploaded")
        fetched, note = fetch(client, key, second)
        assert fetched > 0
        assert note.startswith("capture ")
    assert cache_files(second) == cache_files(first)
    for name, data in files.items():
        assert (second / CACHE_DIR / name).read_bytes() == data
    with CaptureClient(node.url, "p") as client:  # over the limit: nothing is sent
        assert upload(client, key, first, limit=10).startswith("not uploaded: ")


def _tarball(members: dict[str, bytes], *, link: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("members", "link"),
    [
        ({f"{CACHE_DIR}/../../escaped": b"x"}, None),
        ({"/etc/escaped": b"x"}, None),
        ({"elsewhere/file": b"x"}, None),
        ({f"{CACHE_DIR}/ok": b"x"}, (f"{CACHE_DIR}/link", "/etc/passwd")),
        # a link that stays inside the root (the data filter allows it), to a file put beside
        # the cache dir through a ".." that normalises back under the root
        ({f"{CACHE_DIR}/../escaped": b"x"}, (f"{CACHE_DIR}/a", "../escaped")),
        ({f"{CACHE_DIR}/ok": b"x"}, (f"{CACHE_DIR}/b", "ok")),
    ],
    ids=["dotdot", "absolute", "outside-the-cache-dir", "link-out", "dotdot-in-root",
         "link-inside"],
)
def test_a_tarball_that_reaches_outside_the_cache_is_never_unpacked(
    node: RunningNode, tmp_path: Path, members: dict[str, bytes],
    link: tuple[str, str] | None,
) -> None:
    import hashlib

    key = compile_cache_key(_manifest(node), model=None, tp_size=1, version="0.32.0",
                            settings="2" * 64)
    assert key is not None
    data = _tarball(members, link=link)
    root = tmp_path / "root"
    with CaptureClient(node.url, "p") as client:
        client.upload(key, [data], size=len(data), sha256=hashlib.sha256(data).hexdigest())
        with pytest.raises((LoaderError, tarfile.TarError)):
            fetch(client, key, root)
    assert not (tmp_path / "escaped").exists()
    assert list(root.rglob("*")) == []  # refused whole: not even its harmless members


def test_a_tarball_that_unpacks_past_the_bound_is_refused_before_a_byte_lands(
    node: RunningNode, tmp_path: Path
) -> None:
    import hashlib

    key = compile_cache_key(_manifest(node), model=None, tp_size=1, version="0.32.0",
                            settings="3" * 64)
    assert key is not None
    # 4 MiB of zeros packs into a few KiB: the bound is on what it unpacks to
    data = _tarball({f"{CACHE_DIR}/a": b"x", f"{CACHE_DIR}/zeros": bytes(4 << 20)})
    assert len(data) < 64 << 10
    root = tmp_path / "root"
    with CaptureClient(node.url, "p") as client:
        client.upload(key, [data], size=len(data), sha256=hashlib.sha256(data).hexdigest())
        with pytest.raises(LoaderError, match="unpacks to more than"):
            fetch(client, key, root, max_unpacked=1 << 20)
        assert list(root.rglob("*")) == []
        fetched, _ = fetch(client, key, root, max_unpacked=8 << 20)
    assert fetched == len(data)
    assert (root / CACHE_DIR / "zeros").stat().st_size == 4 << 20


def test_no_compile_cache_without_compilation_or_a_version(
    node: RunningNode, tmp_path: Path
) -> None:
    said: list[str] = []
    manifest = _manifest(node)

    def prepare(argv: list[str], env: dict[str, str], limit: int) -> CompileCache | None:
        return CompileCache.prepare(
            argv, manifest=manifest, model=None, tp_size=1, model_dir=tmp_path / "m",
            url=node.url, token=None, pipeline="p", env=env, limit=limit, say=said.append,
        )

    env: dict[str, str] = {}
    assert prepare([sys.executable, "serve", "--enforce-eager"], env, 1 << 20) is None
    assert prepare([sys.executable], env, 0) is None
    # an interpreter without vLLM: its version cannot be told
    assert engine_version([sys.executable]) is None
    assert prepare([sys.executable, "serve"], env, 1 << 20) is None
    assert env == {}  # nothing pointed anywhere
    assert said == [
        "compile cache: none, compilation is off (--enforce-eager)",
        "compile cache: off (--compile-cache-limit 0)",
        f"compile cache: none, cannot tell the vLLM version of {sys.executable!r}",
    ]


def test_the_version_is_read_from_the_engines_own_interpreter(tmp_path: Path) -> None:
    # a "vllm" package of its own: _version.py is read, the package itself never imported
    site = tmp_path / "site" / "vllm"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("raise SystemExit('imported vllm')\n")
    (site / "_version.py").write_text("__version__ = version = '9.8.7'\n")
    script = tmp_path / "vllm"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(site.parent)!r})\n")
    script.chmod(0o755)
    interpreter = tmp_path / "python"
    interpreter.write_text(
        f"#!/bin/sh\nPYTHONPATH={site.parent} exec {sys.executable} \"$@\"\n")
    interpreter.chmod(0o755)
    script.write_text(f"#!{interpreter}\n")
    assert engine_version([str(script), "serve"]) == "9.8.7"
