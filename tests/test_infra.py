"""The deployment files in ``infra/`` agree with the code they deploy.

Nothing here needs Docker or a cluster: the files are parsed, every ``weightcache`` command line in
them goes through the CLI's own parser, and every environment variable they set is read back
through the node's settings or the client's defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from cache_node.access import is_loopback_host
from cache_node.region import RegionSecret
from cache_node.settings import DEFAULT_PORT, NodeSettings
from clients.cli import build_parser
from clients.client import default_token, default_url
from clients.serve_cli import _serve_refusal
from tests.fixtures.pod_security import CONTAINER_LISTS, pod_template, restricted_violations

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


def compose_nodes() -> dict[str, dict[str, Any]]:
    """The compose file's cache node services, by service name."""
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {name: service for name, service in services.items()
            if service.get("image", "").startswith("weightcache-node:")}


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


def compose_node_settings(
    node: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[argparse.Namespace, NodeSettings]:
    """A compose cache node's ``serve`` line, parsed, and the settings its environment gives."""
    args, _ = parse_cli([str(a) for a in node["command"]])  # after the image's ENTRYPOINT
    env = {k: compose_value(str(v)) for k, v in node["environment"].items()}
    return args, node_settings_from(env, monkeypatch)


@pytest.mark.parametrize("name", sorted(compose_nodes()))
def test_compose_cache_node(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    node = services[name]
    assert node["build"]["dockerfile"] == "infra/Dockerfile"
    api, data = serve_ports()
    args, settings = compose_node_settings(node, monkeypatch)
    assert args.command_name == "serve"
    assert args.host == "0.0.0.0"
    assert any(v.split(":")[1] == args.data_dir for v in node["volumes"])
    check_serve_is_guarded(args, published=[str(p) for p in node["ports"]])
    inside = {int(p.rsplit(":", 1)[1]): int(p.split(":")[1]) for p in node["ports"]}
    port = args.port if args.port is not None else api
    assert set(inside) == {port, args.data_port or port + 1} == {api, data}
    assert url_host_port(args.redis_url)[0] in services

    # Replicas on this machine reach the data plane where it is published; peers reach the
    # API by the service's name on the compose network.
    assert settings.data_url == f"http://127.0.0.1:{inside[data]}"
    assert settings.node_id == name
    assert settings.regional.advertise_url == f"http://{name}:{api}"
    s3_host, s3_port = url_host_port(settings.s3.endpoint_url or "")
    assert s3_host in services
    assert f"-s3.port={s3_port}" in services["seaweedfs"]["command"]
    (identity,) = json.loads((INFRA / "seaweedfs-s3.json").read_text())["identities"]
    (credential,) = identity["credentials"]
    assert settings.s3.access_key_id == credential["accessKey"]
    assert settings.s3.secret_access_key is not None
    assert settings.s3.secret_access_key.get_secret_value() == credential["secretKey"]
    assert settings.hf.token is None  # an empty HF_TOKEN means none


def test_compose_runs_one_region_of_three_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = compose_nodes()
    assert len(nodes) == 3
    seen = [compose_node_settings(node, monkeypatch) for node in nodes.values()]
    # one region: the same name, Redis and secret everywhere
    assert len({args.region for args, _ in seen}) == 1
    assert len({args.redis_url for args, _ in seen}) == 1
    secrets = {s.regional.secret.get_secret_value() for _, s in seen if s.regional.secret}
    assert len(secrets) == 1
    RegionSecret(secrets.pop())  # long enough, as a node insists at start
    # each node its own identity, data volume and host ports
    assert len({s.node_id for _, s in seen}) == 3
    assert len({s.data_url for _, s in seen}) == 3
    volumes = [v.split(":")[0] for node in nodes.values() for v in node["volumes"]]
    assert len(set(volumes)) == len(volumes) == 3
    assert set(volumes) <= set(compose()["volumes"])
    published = [p.rsplit(":", 1)[0] for node in nodes.values() for p in node["ports"]]
    assert len(set(published)) == len(published) == 6
    for node in nodes.values():
        assert {"redis", "seaweedfs"} <= set(node["depends_on"])


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


def test_statefulset_runs_a_region_of_three_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    sts = find("StatefulSet", "weightcache-node")
    assert sts["spec"]["replicas"] == 3
    container = only_container(sts)
    args, _ = parse_cli([str(a) for a in container["command"] + container.get("args", [])][1:])
    assert args.region
    redis_host, _ = url_host_port(args.redis_url)
    assert find("Service", redis_host)["spec"]["selector"].items() <= pod_labels(
        "Deployment", redis_host).items()

    # The region secret comes from a Secret, in the variable the node's settings read.
    (secret_var,) = [e for e in container["env"] if e["name"] == "WEIGHTCACHE_REGION_SECRET"]
    ref = secret_var["valueFrom"]["secretKeyRef"]
    assert "optional" not in ref  # a node of a region never starts without it
    secrets = {d["metadata"]["name"]: d["stringData"]
               for d in load_docs(K8S / "secrets.example.yaml")}
    value = secrets[ref["name"]][ref["key"]]
    RegionSecret(value)  # long enough, as a node insists at start

    # Each node advertises its own stable name on the headless Service, which resolves for
    # every pod of the set, ready or not: <set>-<ordinal>.<service>.<namespace>.svc.<domain>.
    headless = find("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= pod_labels(
        "StatefulSet", "weightcache-node").items()
    api, data = serve_ports()
    service_ports = {p["port"] for p in headless["spec"]["ports"]}
    advertised = set()
    for ordinal in range(sts["spec"]["replicas"]):
        pod = f"{sts['metadata']['name']}-{ordinal}"
        env = {e["name"]: e["value"].replace("$(POD_NAME)", pod)
               for e in container["env"] if "value" in e}
        settings = node_settings_from({**env, "WEIGHTCACHE_REGION_SECRET": value}, monkeypatch)
        assert settings.node_id == pod
        assert settings.regional.secret is not None
        assert settings.regional.secret.get_secret_value() == value
        name = f"{pod}.{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert settings.regional.advertise_url == f"http://{name}:{api}"
        assert settings.data_url == f"http://{name}:{data}"
        assert {api, data} <= service_ports
        advertised.add(settings.regional.advertise_url)
    assert len(advertised) == 3


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


# --------------------------------------------------- Pod Security Standard "restricted"


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """``(KIND/NAME, pod)`` for every Pod template in ``infra/k8s``."""
    found = []
    for doc in k8s_docs():
        pod = pod_template(doc)
        if pod is not None:
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", pod))
    return found


def containers_of(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for key in CONTAINER_LISTS for c in pod["spec"].get(key) or []]


def test_every_workload_is_checked() -> None:
    assert {where for where, _ in pod_templates()} == {
        "StatefulSet/weightcache-node", "Deployment/weightcache-redis",
        "Deployment/vllm-llama-8b",
    }


def test_the_namespace_enforces_the_restricted_standard() -> None:
    labels = find("Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


@pytest.mark.parametrize(("where", "pod"), pod_templates(), ids=lambda v: str(v)[:40])
def test_pod_template_meets_the_restricted_standard(where: str, pod: dict[str, Any]) -> None:
    assert restricted_violations(pod) == [], where


@pytest.mark.parametrize(("where", "pod"), pod_templates(), ids=lambda v: str(v)[:40])
def test_pod_runs_as_a_numeric_user_on_a_read_only_image(
    where: str, pod: dict[str, Any]
) -> None:
    """Beyond the standard: numeric non-root uid, gid and fsGroup, and a read-only image whose
    writable places are emptyDirs (and the cache node's data volume)."""
    pod_context = pod["spec"]["securityContext"]
    assert isinstance(pod_context["fsGroup"], int)
    assert pod_context["fsGroup"] > 0
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    kind, name = where.split("/")
    claims = {c["metadata"]["name"] for c in find(kind, name)["spec"].get(
        "volumeClaimTemplates", [])}
    for container in containers_of(pod):
        context = {**pod_context, **container.get("securityContext", {})}
        for field in ("runAsUser", "runAsGroup"):
            assert isinstance(context.get(field), int), (where, field)
            assert context[field] > 0, (where, field)
        assert context.get("readOnlyRootFilesystem") is True, where
        for mount in container.get("volumeMounts", []):
            if not mount.get("readOnly"):
                volume = volumes.get(mount["name"], {})
                assert "emptyDir" in volume or mount["name"] in claims, (where, mount)


def _good_pod() -> dict[str, Any]:
    (_, pod), = [(w, p) for w, p in pod_templates() if w == "StatefulSet/weightcache-node"]
    return copy.deepcopy(pod)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _context(pod: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = _container(pod)["securityContext"]
    return context


def _init_container(pod: dict[str, Any]) -> dict[str, Any]:
    init = copy.deepcopy(_container(pod))
    init["name"] = "init"
    pod["spec"]["initContainers"] = [init]
    return init


def _drop_pod_seccomp(pod: dict[str, Any]) -> None:
    del pod["spec"]["securityContext"]["seccompProfile"]


#: One deliberate violation per case: (what the message names, how to break a good pod).
VIOLATIONS: dict[str, tuple[str, Any]] = {
    "hostNetwork": ("spec.hostNetwork", lambda p: p["spec"].update(hostNetwork=True)),
    "hostPID": ("spec.hostPID", lambda p: p["spec"].update(hostPID=True)),
    "hostIPC": ("spec.hostIPC", lambda p: p["spec"].update(hostIPC=True)),
    "privileged": ("privileged", lambda p: _context(p).update(privileged=True)),
    "windows-host-process": ("hostProcess", lambda p: p["spec"]["securityContext"].update(
        windowsOptions={"hostProcess": True})),
    "capability-beyond-baseline": ("SYS_ADMIN", lambda p: _context(p)["capabilities"].update(
        add=["SYS_ADMIN"])),
    "baseline-capability-added": ("CHOWN", lambda p: _context(p)["capabilities"].update(
        add=["CHOWN"])),
    "capabilities-not-dropped": ("capabilities.drop", lambda p: _context(p).pop(
        "capabilities")),
    "init-container-keeps-capabilities": ("initContainers[0]", lambda p: _init_container(
        p)["securityContext"].pop("capabilities")),
    "init-container-escalates": ("initContainers[0] (init).securityContext.allowPrivilege",
                                 lambda p: _init_container(p)["securityContext"].update(
                                     allowPrivilegeEscalation=True)),
    "ephemeral-container-as-root": ("ephemeralContainers[0]", lambda p: p["spec"].update(
        ephemeralContainers=[{"name": "debug", "image": "busybox:1.36.1", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsUser": 0}}])),
    "hostPath-volume": ("hostPath", lambda p: p["spec"]["volumes"].append(
        {"name": "host", "hostPath": {"path": "/"}})),
    "nfs-volume": ("volume type nfs", lambda p: p["spec"]["volumes"].append(
        {"name": "n", "nfs": {"server": "x", "path": "/"}})),
    "hostPort": ("hostPort", lambda p: _container(p)["ports"][0].update(hostPort=8470)),
    "apparmor-unconfined": ("appArmorProfile", lambda p: _context(p).update(
        appArmorProfile={"type": "Unconfined"})),
    "apparmor-annotation": ("apparmor", lambda p: p["metadata"].update(annotations={
        "container.apparmor.security.beta.kubernetes.io/cache-node": "unconfined"})),
    "selinux-type": ("seLinuxOptions.type", lambda p: _context(p).update(
        seLinuxOptions={"type": "spc_t"})),
    "selinux-user": ("seLinuxOptions.user", lambda p: p["spec"]["securityContext"].update(
        seLinuxOptions={"user": "system_u"})),
    "proc-mount": ("procMount", lambda p: _context(p).update(procMount="Unmasked")),
    "seccomp-unconfined": ("seccompProfile.type: Unconfined", lambda p: _context(p).update(
        seccompProfile={"type": "Unconfined"})),
    "seccomp-unset": ("seccompProfile", _drop_pod_seccomp),
    "unsafe-sysctl": ("kernel.msgmax", lambda p: p["spec"]["securityContext"].update(
        sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    "runAsNonRoot-unset": ("runAsNonRoot", lambda p: (
        p["spec"]["securityContext"].pop("runAsNonRoot"), _context(p).pop("runAsNonRoot"))),
    "runAsNonRoot-false": ("runAsNonRoot", lambda p: _context(p).update(runAsNonRoot=False)),
    "root-user": ("runAsUser: 0", lambda p: _context(p).update(runAsUser=0)),
    "root-user-on-the-pod": ("spec.securityContext.runAsUser", lambda p: p["spec"][
        "securityContext"].update(runAsUser=0)),
    "privilege-escalation": ("allowPrivilegeEscalation", lambda p: _context(p).update(
        allowPrivilegeEscalation=True)),
    "privilege-escalation-unset": ("allowPrivilegeEscalation", lambda p: _context(p).pop(
        "allowPrivilegeEscalation")),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_the_checker_refuses_a_violating_pod(case: str) -> None:
    """A deliberately bad copy of the cache node's pod fails, naming what is wrong."""
    named, breaks = VIOLATIONS[case]
    pod = _good_pod()
    assert restricted_violations(pod) == []
    breaks(pod)
    problems = restricted_violations(pod)
    assert problems, case
    assert any(named in problem for problem in problems), problems


def test_the_checker_allows_what_the_standard_allows() -> None:
    pod = _good_pod()
    _context(pod)["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    _context(pod)["seccompProfile"] = {"type": "Localhost", "localhostProfile": "p.json"}
    pod["spec"]["securityContext"]["sysctls"] = [{"name": "net.ipv4.tcp_syncookies",
                                                  "value": "1"}]
    pod["spec"]["securityContext"]["seLinuxOptions"] = {"type": "container_t", "level": "s0"}
    pod["metadata"]["annotations"] = {
        "container.apparmor.security.beta.kubernetes.io/cache-node": "runtime/default"}
    pod["spec"]["volumes"].append({"name": "c", "configMap": {"name": "x"}})
    init = _init_container(pod)
    assert restricted_violations(pod) == []
    # container-level settings may stand in for the pod's
    del pod["spec"]["securityContext"]["runAsNonRoot"]
    _drop_pod_seccomp(pod)
    init["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    _context(pod)["runAsNonRoot"] = True
    assert restricted_violations(pod) == []


# ------------------------------------------------------------ disruption budget and network


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches ``labels`` (an empty one matches all)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get(
            "values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def pod_labels(kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = find(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def test_a_disruption_budget_covers_the_cache_nodes() -> None:
    sts = find("StatefulSet", "weightcache-node")
    labels = pod_labels("StatefulSet", "weightcache-node")
    budgets = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"
               and selects(d["spec"]["selector"], labels)]
    assert len(budgets) == 1
    (budget,) = budgets
    assert budget["spec"]["selector"] == sts["spec"]["selector"]
    # one node at a time, and a drain is always possible (minAvailable: replicas never is)
    if "maxUnavailable" in budget["spec"]:
        assert budget["spec"]["maxUnavailable"] == 1
    else:
        assert budget["spec"]["minAvailable"] < sts["spec"]["replicas"]
    for other in ("vllm-llama-8b", "weightcache-redis"):
        assert not selects(budget["spec"]["selector"], pod_labels("Deployment", other))


def _policies_for(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == "NetworkPolicy"
            and selects(d["spec"]["podSelector"], labels)]


def _rule_ports(rule: dict[str, Any], container: dict[str, Any]) -> set[int]:
    """A rule's ports as container port numbers (a name resolves through the container)."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    numbers = {p["containerPort"] for p in container["ports"]}
    ports = set()
    for port in rule["ports"]:
        assert port.get("protocol", "TCP") == "TCP"
        value = port["port"]
        number = by_name[value] if isinstance(value, str) else value
        assert number in numbers, f"{value} is no port of {container['name']}"
        ports.add(number)
    return ports


def test_network_policy_admits_only_replicas_peers_and_prometheus() -> None:
    labels = pod_labels("StatefulSet", "weightcache-node")
    container = only_container(find("StatefulSet", "weightcache-node"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (policy,) = _policies_for(labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admitted: dict[str, set[int]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits everyone"
        assert rule.get("ports"), "a rule without 'ports' admits every port"
        rule_ports = _rule_ports(rule, container)
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer.get("podSelector"), "a peer must name its pods"
            if selects(peer["podSelector"], pod_labels("Deployment", "vllm-llama-8b")):
                assert "namespaceSelector" not in peer
                admitted["replicas"] = rule_ports
            elif selects(peer["podSelector"], labels):
                assert "namespaceSelector" not in peer  # this namespace's nodes, no others
                admitted["peers"] = rule_ports
            elif peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}:
                assert peer["namespaceSelector"]["matchLabels"]
                admitted["prometheus"] = rule_ports
            else:
                pytest.fail(f"unexpected peer {peer}")
    # the allowed ports are exactly the container's; metrics are scraped on the API port
    assert admitted == {
        "replicas": set(ports.values()),
        "peers": set(ports.values()),
        "prometheus": {ports["api"]},
    }
    (monitor,) = load_docs(K8S / "servicemonitor.yaml")
    assert {ports[e["port"]] for e in monitor["spec"]["endpoints"]} == admitted["prometheus"]
    # the vLLM Deployment carries the label; Redis does not (it has no business there)
    assert not selects(policy["spec"]["ingress"][0]["from"][0]["podSelector"],
                       pod_labels("Deployment", "weightcache-redis"))


def test_network_policy_admits_only_cache_nodes_to_redis() -> None:
    labels = pod_labels("Deployment", "weightcache-redis")
    redis = only_container(find("Deployment", "weightcache-redis"))
    (policy,) = _policies_for(labels)
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert selects(peer["podSelector"], pod_labels("StatefulSet", "weightcache-node"))
    assert not selects(peer["podSelector"], pod_labels("Deployment", "vllm-llama-8b"))
    assert _rule_ports(rule, redis) == {p["containerPort"] for p in redis["ports"]}


def test_tokens_secret_is_mounted_so_that_updates_reach_the_node() -> None:
    """A Secret mounted with subPath never changes in the pod: rotating a token would then need
    a restart. A directory mount is updated in place, and the node re-reads the file."""
    container = only_container(find("StatefulSet", "weightcache-node"))
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tokens"]
    assert "subPath" not in mount
    assert mount.get("readOnly") is True


# ----------------------------------------------------------------------- pinned images


#: Projects whose releases are numbered MAJOR.MINOR: their exact version has two parts.
TWO_PART_RELEASES = {"chrislusf/seaweedfs"}
OUR_IMAGES = {"weightcache-node": "Dockerfile", "vllm-weightcache": "Dockerfile.replica"}


def project_version() -> str:
    text = (INFRA.parent / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.M)
    assert match is not None
    return match.group(1)


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """``(repository, tag, digest)`` of an image reference."""
    name, _, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def is_pinned(reference: str) -> bool:
    """A digest, or an exact release: never untagged, never ``latest`` or a moving ``7.4``."""
    name, tag, digest = split_image(reference)
    if digest is not None:
        return re.fullmatch(r"sha256:[0-9a-f]{64}", digest) is not None
    if tag is None:
        return False
    if name in OUR_IMAGES:
        return tag == project_version()
    parts = 2 if name in TWO_PART_RELEASES else 3
    return re.match(r"v?\d+" + r"\.\d+" * (parts - 1) + r"(?![.\d])", tag) is not None


def every_image() -> list[tuple[str, str]]:
    """``(where, reference)`` for every image the manifests, compose file and Dockerfiles use."""
    images = []
    for where, pod in pod_templates():
        images += [(f"{where}/{c['name']}", c["image"]) for c in containers_of(pod)]
    for name, service in compose()["services"].items():
        images.append((f"compose/{name}", compose_value(service["image"])))
    for dockerfile_name in ("Dockerfile", "Dockerfile.replica"):
        pairs = dockerfile(dockerfile_name)
        args = dict(rest.split("=", 1) for key, rest in pairs if key == "ARG" and "=" in rest)
        for key, rest in pairs:
            if key == "FROM":
                base = rest.split()[0]
                for arg, default in args.items():
                    base = base.replace(f"${{{arg}}}", default)
                images.append((f"{dockerfile_name}/FROM", base))
    return images


@pytest.mark.parametrize(("where", "image"), every_image(), ids=lambda v: str(v))
def test_every_image_is_pinned(where: str, image: str) -> None:
    assert is_pinned(image), f"{where}: {image} is not an exact version or a digest"


@pytest.mark.parametrize(
    ("reference", "pinned"),
    [
        ("redis", False),
        ("redis:latest", False),
        ("redis:7.4-alpine", False),
        ("python:3.11-slim", False),
        ("registry.local:5000/redis", False),
        ("weightcache-node:latest", False),
        ("weightcache-node:0.0.9", False),
        ("chrislusf/seaweedfs:4", False),
        ("redis@sha256:abc", False),
        ("redis:7.4.2-alpine", True),
        ("registry.local:5000/python:3.11.11-slim-bookworm", True),
        ("vllm/vllm-openai:v0.32.0", True),
        ("chrislusf/seaweedfs:4.48", True),
        ("redis@sha256:" + "a" * 64, True),
    ],
)
def test_what_counts_as_pinned(reference: str, pinned: bool) -> None:
    assert is_pinned(reference) is pinned


def _user_of(pairs: list[tuple[str, str]]) -> tuple[int, int]:
    user, _, group = instruction(pairs, "USER").partition(":")
    return int(user), int(group)


@pytest.mark.parametrize("image", sorted(OUR_IMAGES))
def test_images_create_the_user_the_manifests_run_as(image: str) -> None:
    pairs = dockerfile(OUR_IMAGES[image])
    uid, gid = _user_of(pairs)  # numeric: runAsNonRoot can only check a number
    assert uid > 0
    assert gid > 0
    runs = " ".join(rest for key, rest in pairs if key == "RUN")
    assert re.search(rf"useradd\b[^&]*--uid {uid} --gid {gid}\b", runs)
    assert re.search(rf"groupadd\b[^&]*--gid {gid}\b", runs)
    users = []
    for where, pod in pod_templates():
        pod_context = pod["spec"]["securityContext"]
        for container in containers_of(pod):
            if split_image(container["image"])[0] == image:
                context = {**pod_context, **container.get("securityContext", {})}
                users.append((where, context["runAsUser"], context["runAsGroup"],
                              pod_context["fsGroup"]))
    assert users, f"no manifest runs {image}"
    assert all(u[1:] == (uid, gid, gid) for u in users), users
    for name, service in compose()["services"].items():
        if split_image(service["image"])[0] == image:
            assert service["user"] == f"{uid}:{gid}", name


# --------------------------------------------------------------------- compose schemas


SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "compose_schemas"
#: ``docker-compose`` 1.x accepts these version strings (compose/config/config.py).
COMPOSE_V1_VERSION = re.compile(r"^[1-3]+(\.\d+)?$")
_PORT_SPEC = re.compile(
    r"^(?:(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?(?:\d+(?:-\d+)?)?:)?"
    r"\d+(?:-\d+)?(?:/(?:tcp|udp|sctp))?$"
)


def _compose_v1_formats() -> dict[str, Any]:
    """The formats ``docker-compose`` 1.x checks itself (``compose/config/validation.py``)."""
    return {
        "ports": lambda value: _PORT_SPEC.match(value) is not None,
        "expose": lambda value: re.match(r"^\d+(\-\d+)?(\/[a-zA-Z]+)?$", value) is not None,
        "subnet_ip_address": lambda value: "/" in value,
    }


#: (schema file, validator): Compose v1 uses a Draft 4 validator whatever ``$schema`` says.
COMPOSE_SCHEMAS = {
    "v1-format-3.8": ("compose-v1.26.2-config_schema_v3.8.json", jsonschema_rs.Draft4Validator),
    "v1.29": ("compose-v1.29.2-compose_spec.json", jsonschema_rs.Draft4Validator),
    "v2-compose-spec": ("compose-spec.json", jsonschema_rs.Draft7Validator),
}


def compose_errors(document: dict[str, Any], which: str) -> list[str]:
    """Why ``document`` fails the schema ``which`` (after interpolation, as Compose does)."""
    name, validator_class = COMPOSE_SCHEMAS[which]
    schema = json.loads((SCHEMAS / name).read_text())
    formats = _compose_v1_formats() if which.startswith("v1") else {}
    validator = validator_class(schema, formats=formats, validate_formats=bool(formats))
    return [f"{list(error.instance_path)}: {error.message}"
            for error in validator.iter_errors(_interpolated(document))]


def _interpolated(value: Any) -> Any:
    if isinstance(value, str):
        return compose_value(value)
    if isinstance(value, list):
        return [_interpolated(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolated(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("which", sorted(COMPOSE_SCHEMAS))
def test_compose_file_is_valid_for_compose_v1_and_v2(which: str) -> None:
    assert compose_errors(compose(), which) == []


def test_compose_file_version_suits_both() -> None:
    version = compose()["version"]
    assert isinstance(version, str)  # v1 refuses a number
    assert COMPOSE_V1_VERSION.match(version)
    assert version.startswith("3.")


@pytest.mark.parametrize(
    ("which", "breaks", "named"),
    [
        ("v1-format-3.8", lambda d: d.update(name="weightcache"), "name"),
        ("v1.29", lambda d: d.update(name="weightcache"), "name"),
        ("v1-format-3.8", lambda d: d.pop("version"), "version"),
        ("v1-format-3.8", lambda d: d["services"]["cache-node-1"]["ports"].append("84x0:8470"),
         "ports"),
        ("v1.29", lambda d: d["services"]["redis"].update(readonly=True), "readonly"),
        ("v2-compose-spec", lambda d: d["services"]["redis"].update(readonly=True), "readonly"),
        ("v2-compose-spec", lambda d: d["services"]["redis"].update(cap_drop="ALL"), "cap_drop"),
    ],
)
def test_compose_schemas_refuse_a_bad_copy(which: str, breaks: Any, named: str) -> None:
    document = copy.deepcopy(compose())
    breaks(document)
    errors = compose_errors(document, which)
    assert errors
    assert any(named in error for error in errors), errors


@pytest.mark.parametrize("name", sorted(compose_nodes()))
def test_compose_cache_node_is_hardened(name: str) -> None:
    node = compose_nodes()[name]
    assert node["read_only"] is True
    assert node["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in node["security_opt"]
    assert "/tmp" in node["tmpfs"]
    assert node["user"] == "10001:10001"
