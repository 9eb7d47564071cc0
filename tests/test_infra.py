"""The deployment files in ``infra/`` agree with the code they deploy.

Nothing here needs Docker or a cluster: the files are parsed, every ``weightcache`` command line in
them goes through the CLI's own parser, and every environment variable they set is read back
through the node's settings or the client's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cache_node.access import is_loopback_host
from cache_node.settings import DEFAULT_PORT, NodeSettings
from clients.cli import build_parser
from clients.client import default_token, default_url
from clients.serve_cli import _serve_refusal

INFRA = Path(__file__).resolve().parent.parent / "infra"
K8S = INFRA / "k8s"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
NAMESPACE = "weightcache"
CLUSTER_SCOPED = {"Namespace", "StorageClass", "PersistentVolume"}
POD_NAME = "weightcache-node-0"


def load_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_docs(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
    """``weightcache ARGV`` as the CLI parses it, and the command after ``--`` (if any).

    The part after ``--`` is split off first so that the flags before it must all belong to
    ``weightcache`` itself: a flag swallowed into ``launch``'s command shows up as a non-empty
    ``command`` and fails the caller's check.
    """
    head, tail = argv, None
    if "--" in argv:
        at = argv.index("--")
        head, tail = argv[:at], argv[at + 1 :]
    try:
        return build_parser().parse_args(head), tail
    except SystemExit:
        pytest.fail(f"weightcache rejects {shlex.join(argv)}")


def serve_ports() -> tuple[int, int]:
    """The API and data-plane ports ``serve`` uses when given none (data: ``--port`` + 1)."""
    defaults, _ = parse_cli(["serve"])
    api = defaults.port if defaults.port is not None else DEFAULT_PORT  # NodeSettings' default
    return api, defaults.data_port if defaults.data_port is not None else api + 1


def dockerfile(name: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, rest)`` pairs of ``infra/NAME``, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (INFRA / name).read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def instruction(pairs: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for key, rest in pairs if key == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def node_settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> NodeSettings:
    """NodeSettings built from exactly ``env`` (none of the test's own variables)."""
    for name in list(os.environ):
        if name.startswith(("WEIGHTCACHE_", "AWS_", "HF_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return NodeSettings()


def url_host_port(url: str) -> tuple[str, int]:
    match = re.match(r"\w+://([\w.$()-]+):(\d+)", url)
    assert match is not None, url
    return match.group(1), int(match.group(2))


def compose() -> dict[str, Any]:
    (doc,) = load_docs(INFRA / "docker-compose.yml")
    return doc


def compose_value(text: str) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


# ---------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.json")), ids=lambda p: p.name)
def test_json_file_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def test_k8s_documents_are_complete() -> None:
    seen: set[tuple[str, str]] = set()
    for doc in k8s_docs():
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        name = doc.get("metadata", {}).get("name")
        assert name, doc
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']} {name}"
        seen.add((doc["kind"], name))
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, name
    assert ("Namespace", NAMESPACE) in seen


# ------------------------------------------------------------------------------ the cache node


def check_serve_is_guarded(args: argparse.Namespace, *, published: list[str] | None) -> None:
    """A ``serve`` line on an open address has auth, or says it runs without (and then only
    publishes its ports on loopback): what ``serve`` itself insists on at start."""
    assert args.command_name == "serve"
    if args.tokens_file is not None:
        assert not args.allow_unauthenticated  # auth on: nothing to allow
        return
    if is_loopback_host(args.host or "127.0.0.1"):
        return
    assert args.allow_unauthenticated, "serve on an open address without --tokens is refused"
    assert published is not None, "an unauthenticated node must say where its ports go"
    assert all(p.startswith("127.0.0.1:") for p in published), published


def test_serve_refuses_what_infra_must_not_do() -> None:
    """The rule the infra checks follow is the CLI's own: parse lines and ask ``serve``."""
    for argv, refused in (
        (["serve", "--host", "0.0.0.0"], True),
        (["serve", "--host", "::"], True),
        (["serve", "--host", "0.0.0.0", "--allow-unauthenticated"], False),
        (["serve"], False),  # 127.0.0.1
        (["serve", "--host", "::1"], False),
        (["serve", "--host", "localhost"], False),
    ):
        args, _ = parse_cli(argv)
        settings = NodeSettings(host=args.host or "127.0.0.1")
        reason = _serve_refusal(settings, allow_unauthenticated=args.allow_unauthenticated)
        assert (reason is not None) == refused, argv


def test_dockerfile_runs_serve_on_the_default_ports() -> None:
    pairs = dockerfile("Dockerfile")
    api, data = serve_ports()
    argv = json.loads(instruction(pairs, "ENTRYPOINT")) + json.loads(instruction(pairs, "CMD"))
    assert argv[0] == "weightcache"
    args, _ = parse_cli(argv[1:])
    assert args.command_name == "serve"
    assert args.host == "0.0.0.0"
    # the image's default is safe: auth on (a tokens file to mount), never unauthenticated
    assert args.tokens_file is not None
    assert not args.allow_unauthenticated
    check_serve_is_guarded(args, published=None)
    assert args.data_dir in json.loads(instruction(pairs, "VOLUME"))
    assert {int(p) for p in instruction(pairs, "EXPOSE").split()} == {api, data}
    healthcheck = instruction(pairs, "HEALTHCHECK")
    assert f"127.0.0.1:{api}/healthz" in healthcheck
    assert any("pip install" in rest and "[server]" in rest for key, rest in pairs if key == "RUN")
    assert instruction(pairs, "USER").split(":")[0] not in ("root", "0")


def test_compose_cache_node(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    node = services["cache-node"]
    assert node["build"]["dockerfile"] == "infra/Dockerfile"
    api, data = serve_ports()
    args, _ = parse_cli([str(a) for a in node["command"]])  # after the image's ENTRYPOINT
    assert args.command_name == "serve"
    assert args.host == "0.0.0.0"
    assert any(v.split(":")[1] == args.data_dir for v in node["volumes"])
    check_serve_is_guarded(args, published=[str(p) for p in node["ports"]])
    published = {int(p.rsplit(":", 1)[1]) for p in node["ports"]}
    port = args.port if args.port is not None else api
    assert published == {port, args.data_port or port + 1} == {api, data}
    assert url_host_port(args.redis_url)[0] in services

    env = {k: compose_value(str(v)) for k, v in node["environment"].items()}
    settings = node_settings_from(env, monkeypatch)
    assert settings.data_url == f"http://127.0.0.1:{data}"
    s3_host, s3_port = url_host_port(settings.s3.endpoint_url or "")
    assert s3_host in services
    assert f"-s3.port={s3_port}" in services["seaweedfs"]["command"]
    (identity,) = json.loads((INFRA / "seaweedfs-s3.json").read_text())["identities"]
    (credential,) = identity["credentials"]
    assert settings.s3.access_key_id == credential["accessKey"]
    assert settings.s3.secret_access_key is not None
    assert settings.s3.secret_access_key.get_secret_value() == credential["secretKey"]
    assert settings.hf.token is None  # an empty HF_TOKEN means none


def test_statefulset_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    sts = find("StatefulSet", "weightcache-node")
    container = only_container(sts)
    argv = [str(a) for a in container["command"] + container.get("args", [])]
    assert argv[0] == "weightcache"
    args, _ = parse_cli(argv[1:])
    api, data = serve_ports()
    assert (args.command_name, args.host) == ("serve", "0.0.0.0")
    assert (args.port, args.data_port) == (api, data)
    check_serve_is_guarded(args, published=None)
    assert args.tokens_file is not None  # a cluster node always has auth
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"api": api, "data": data}

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == args.data_dir
    assert str(Path(args.tokens_file).parent) == mounts["tokens"]
    redis_host, redis_port = url_host_port(args.redis_url)
    assert redis_port in [p["port"] for p in find("Service", redis_host)["spec"]["ports"]]

    env = {e["name"]: e["value"].replace("$(POD_NAME)", POD_NAME)
           for e in container["env"] if "value" in e}
    settings = node_settings_from(env, monkeypatch)
    headless = sts["spec"]["serviceName"]
    assert settings.node_id == POD_NAME
    assert settings.data_url == f"http://{POD_NAME}.{headless}.{NAMESPACE}.svc.cluster.local:{data}"


def test_statefulset_probes_and_placement() -> None:
    sts = find("StatefulSet", "weightcache-node")
    container = only_container(sts)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    api, _ = serve_ports()
    probes = {kind: container[kind]["httpGet"] for kind in
              ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(ports[probe["port"]] == api for probe in probes.values())

    pod = sts["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    (claim,) = sts["spec"]["volumeClaimTemplates"]
    storage_class = find("StorageClass", claim["spec"]["storageClassName"])
    assert storage_class["provisioner"] == "kubernetes.io/no-provisioner"
    assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"


def test_services_reach_the_cache_nodes() -> None:
    sts = find("StatefulSet", "weightcache-node")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in only_container(sts)["ports"]}
    headless = find("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for service in (find("Service", "weightcache"), headless):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]} == {
            port: port for port in serve_ports()
        }


def test_secrets_are_those_the_manifests_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        d["metadata"]["name"]: d["stringData"] for d in load_docs(K8S / "secrets.example.yaml")
    }
    for doc in k8s_docs():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items", [])
                assert {i["key"] for i in items} <= secrets[volume["secret"]["secretName"]].keys()
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]

    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(secrets["weightcache-tokens"]["tokens.json"])
    tokens = NodeSettings(tokens_file=tokens_file).load_tokens()
    assert tokens is not None
    assert "admin" in tokens.values()
    assert secrets["weightcache-replica-token"]["token"] in tokens

    # The origin credentials are the standard variables the node's settings read.
    settings = node_settings_from(secrets["weightcache-origin-credentials"], monkeypatch)
    origin = secrets["weightcache-origin-credentials"]
    assert settings.hf.token is not None
    assert settings.hf.token.get_secret_value() == origin["HF_TOKEN"]
    assert settings.s3.access_key_id == origin["AWS_ACCESS_KEY_ID"]
    assert settings.s3.region == origin["AWS_REGION"]


# ---------------------------------------------------------------------------------- replicas


def check_launch(argv: list[str], *, pipeline: str, tp_size: int) -> list[str]:
    """Parse a ``weightcache launch`` line; returns the engine command after ``--``."""
    assert argv[0] == "weightcache"
    args, tail = parse_cli(argv[1:])
    assert args.command_name == "launch"
    assert (args.id, args.tp_size, args.command) == (pipeline, tp_size, [])
    assert tail is not None
    assert tail[:2] == ["vllm", "serve"]
    return tail


def test_replica_dockerfile_launches_vllm() -> None:
    pairs = dockerfile("Dockerfile.replica")
    env = dict(pair.split("=", 1) for pair in shlex.split(instruction(pairs, "ENV")))
    entrypoint = json.loads(instruction(pairs, "ENTRYPOINT"))
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    script = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), entrypoint[2])
    words = shlex.split(script)
    assert words[0] == "exec"
    assert words[-1] == "$@"
    tail = check_launch(words[1:-1], pipeline=env["PIPELINE"], tp_size=int(env["TP"]))
    assert tail == ["vllm", "serve"]
    installs = [rest for key, rest in pairs if key == "RUN" and "pip install" in rest]
    assert installs
    assert not any("[" in rest for rest in installs)


def test_vllm_deployment_uses_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find("Deployment", "vllm-llama-8b")
    container = only_container(deployment)
    tail = check_launch([str(a) for a in container["command"]], pipeline="llama-8b", tp_size=1)
    served = tail[tail.index("--port") + 1]
    assert [p["containerPort"] for p in container["ports"]] == [int(served)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    env = {e["name"]: e for e in container["env"]}
    assert env.keys() == {"WEIGHTCACHE_URL", "WEIGHTCACHE_TOKEN"}
    url = env["WEIGHTCACHE_URL"]["value"]
    match = re.fullmatch(r"http://([\w-]+)\.([\w-]+)\.svc\.cluster\.local:(\d+)", url)
    assert match is not None
    service = find("Service", match.group(1))
    assert match.group(2) == service["metadata"]["namespace"]
    api = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "api")
    assert int(match.group(3)) == api == serve_ports()[0]
    # The client reads exactly these two variables.
    monkeypatch.setenv("WEIGHTCACHE_URL", url)
    monkeypatch.setenv("WEIGHTCACHE_TOKEN", "t")
    assert (default_url(), default_token()) == (url, "t")
