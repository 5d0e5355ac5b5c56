"""The Kubernetes manifests (`k8s/`) and the `Dockerfile`, checked offline.

No cluster, kustomize binary or Docker engine is needed. The kustomize base is rendered
here from its `resources:` (plus the two transformations it uses, `namespace` and
`labels`; compared with `kubectl kustomize` where kubectl exists), every object is
validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships, and the
rules that make the router safe to run are asserted: least-privilege RBAC, probes on the
right endpoints, a drain that fits in the grace period, a non-root read-only container,
and arguments the router really accepts.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router import config
from router.config import Config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_LABEL = {"app.kubernetes.io/name": "warmpool-router"}
# The oldest release the base is meant for (preStop `sleep` is on by default from 1.30)
# and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Kustomization fields `render()` applies; anything else would be silently ignored here.
RENDERED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources"}
# Room, after preStop and --shutdown-timeout, for the router's post-SIGTERM grace window
# and for the process to exit before the kubelet's SIGKILL.
DRAIN_HEADROOM_SECONDS = 5
MEMORY_PER_WORKER = 256 * 1024**2

Manifest = dict[str, Any]


# -- rendering the kustomize base --


@cache
def kustomization() -> Manifest:
    loaded: Manifest = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


@cache
def _rendered() -> tuple[Manifest, ...]:
    base = kustomization()
    objects: list[Manifest] = []
    for name in base["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    for obj in objects:
        if "namespace" in base:
            obj["metadata"]["namespace"] = base["namespace"]
        for entry in base.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = obj.get("spec", {}).get("template")
            if template is not None and entry.get("includeTemplates"):
                template.setdefault("metadata", {}).setdefault("labels", {})
                template["metadata"]["labels"].update(entry["pairs"])
    return tuple(objects)


def render() -> list[Manifest]:
    """What `kustomize build k8s` produces, as far as this base uses kustomize."""
    return copy.deepcopy(list(_rendered()))


def one(kind: str) -> Manifest:
    matches = [obj for obj in render() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def pod_spec() -> Manifest:
    spec: Manifest = one("Deployment")["spec"]["template"]["spec"]
    return spec


def router_container() -> Manifest:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def router_options() -> Config:
    """The Deployment's arguments (and environment) as the router itself parses them."""
    container = router_container()
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return config.load(container.get("args", []), env=env)
    except SystemExit:
        pytest.fail(f"the router rejects the Deployment's args: {errors.getvalue().strip()}")


def container_port(name: str) -> int:
    ports = {port["name"]: int(port["containerPort"]) for port in router_container()["ports"]}
    return ports[name]


def resolve_port(port: int | str) -> int:
    """A probe or Service `port`/`targetPort`: a number, or the name of a container port."""
    return port if isinstance(port, int) else container_port(port)


def effective_security(field: str) -> Any:
    """A container security setting, falling back to the pod's as Kubernetes does."""
    container_context = router_container().get("securityContext", {})
    if field in container_context:
        return container_context[field]
    return pod_spec().get("securityContext", {}).get(field)


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match and match.group(2) in {"", *units}, f"unexpected quantity {quantity!r}"
    return int(match.group(1)) * units.get(match.group(2), 1)


# -- the objects themselves --


def test_kustomization_lists_every_manifest_in_k8s() -> None:
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization()["resources"]) == sorted(manifests)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
def test_render_is_what_kubectl_kustomize_builds() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True,
                           text=True, timeout=30, check=False)
    assert built.returncode == 0, built.stderr

    def identity(obj: Manifest) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted(objects, key=identity) == sorted(render(), key=identity)


def test_kustomization_uses_only_what_this_test_renders() -> None:
    assert set(kustomization()) <= RENDERED_FIELDS
    for entry in kustomization().get("labels", []):
        # Selectors stay as written: a Deployment's selector is immutable.
        assert not entry.get("includeSelectors", False)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(version: str) -> None:
    for obj in render():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {error.message}")


def test_every_object_carries_the_app_label_and_the_namespace() -> None:
    for obj in render():
        assert APP_LABEL.items() <= obj["metadata"]["labels"].items(), obj["kind"]
        assert obj["metadata"]["namespace"] == kustomization()["namespace"], obj["kind"]


def test_role_grants_only_get_list_watch_on_pods() -> None:
    rules = one("Role")["rules"]
    assert [(rule["apiGroups"], rule["resources"], sorted(rule["verbs"])) for rule in rules] == [
        ([""], ["pods"], ["get", "list", "watch"])
    ]
    assert not any(set(rule) - {"apiGroups", "resources", "verbs"} for rule in rules)
    assert not [obj for obj in render() if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_rolebinding_binds_the_role_to_the_deployments_service_account() -> None:
    binding = one("RoleBinding")
    account = one("ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": one("Role")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": kustomization()["namespace"]}
    ]
    assert pod_spec()["serviceAccountName"] == account
    assert pod_spec().get("automountServiceAccountToken", True)


# -- the router's options --


def test_every_argument_is_a_router_option() -> None:
    options = router_options()
    assert not options.static, "the Deployment must list pods from Kubernetes"


def test_container_ports_are_the_ports_the_router_listens_on() -> None:
    options = router_options()
    assert container_port("http") == options.port
    assert container_port("metrics") == options.metrics_port


def test_image_is_the_documented_placeholder() -> None:
    assert router_container()["image"] == "warmpool-router:0.1.0"


# -- probes and drain --


# The slowest probe answer on the metrics port in bench/probes.py, rounded up (seconds).
SLOWEST_PROBE_ANSWER = 0.5


def test_liveness_probe_hits_healthz_on_the_metrics_port() -> None:
    probe = router_container()["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert resolve_port(probe["port"]) == container_port("metrics")
    assert router_options().metrics_port == container_port("metrics")  # so it is served


def test_readiness_probe_hits_ready_on_the_metrics_port() -> None:
    probe = router_container()["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    assert resolve_port(probe["port"]) == container_port("metrics")


@pytest.mark.parametrize("kind", ["readinessProbe", "livenessProbe"])
def test_a_busy_router_never_trips_its_probes(kind: str) -> None:
    """A timeout with margin over the slowest answer measured under overload, and more
    than one failure needed: one slow answer must not take a replica out."""
    probe = router_container()[kind]
    assert probe["timeoutSeconds"] >= 4 * SLOWEST_PROBE_ANSWER
    assert probe["failureThreshold"] >= 3


def test_an_unready_router_leaves_the_service_within_seconds() -> None:
    """A lost pod list; the drain needs no probe (a terminating pod leaves the
    EndpointSlices at once)."""
    probe = router_container()["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 10


def test_a_sandboxs_dns_name_is_looked_up_as_given_first() -> None:
    """The pinned DNS form (router/proxy.py) has more dots than the pod's `ndots`: the
    resolver tries it as given before the search list (three NXDOMAINs under ndots:5)."""
    options = {option["name"]: option.get("value")
               for option in pod_spec().get("dnsConfig", {}).get("options", [])}
    name = f"sandbox.ns.svc.{router_options().cluster_domain}"
    assert name.count(".") >= int(options.get("ndots", "5"))


def test_termination_grace_outlasts_prestop_and_shutdown_timeout() -> None:
    pre_stop = router_container().get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    needed = sleep + router_options().shutdown_timeout + DRAIN_HEADROOM_SECONDS
    assert pod_spec()["terminationGracePeriodSeconds"] >= needed


def test_rolling_update_never_drops_below_the_replica_count() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one("PodDisruptionBudget")["spec"]["minAvailable"] == 1


# -- selectors and the Service --


def test_selectors_match_the_pod_template() -> None:
    template_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [
        one("Deployment")["spec"]["selector"]["matchLabels"],
        one("Service")["spec"]["selector"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= template_labels.items()


def test_service_ports_target_the_named_container_ports() -> None:
    ports = {port["name"]: port for port in one("Service")["spec"]["ports"]}
    assert set(ports) == {"http", "metrics"}
    assert ports["http"]["port"] == 80
    for name, port in ports.items():
        assert port["targetPort"] == name
    assert one("Service")["spec"]["type"] == "ClusterIP"


# -- the container's sandbox --


def test_container_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    assert effective_security("runAsNonRoot") is True
    assert effective_security("runAsUser") == 10001
    assert effective_security("readOnlyRootFilesystem") is True
    assert effective_security("allowPrivilegeEscalation") is False
    assert effective_security("capabilities") == {"drop": ["ALL"]}
    assert effective_security("seccompProfile") == {"type": "RuntimeDefault"}


def test_tmp_is_a_writable_empty_dir() -> None:
    mounts = {mount["mountPath"]: mount["name"] for mount in router_container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_memory_limit_leaves_room_for_every_worker() -> None:
    resources = router_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= MEMORY_PER_WORKER * router_options().workers


# -- the Dockerfile (no engine here to build it: its text is checked instead) --


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, `\\` continuations joined."""
    joined = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", text))
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ") if " AS " in args else args.partition(" as ")
            stages.append(Stage(base.strip(), name.strip() or None, []))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def final_stage() -> Stage:
    return dockerfile_stages(DOCKERFILE.read_text())[-1]


def test_dockerfile_builds_in_one_stage_and_runs_from_another() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    builder = stages[0]
    assert builder.name
    assert any("pip wheel" in run for run in builder.all("RUN"))
    copies = final_stage().all("COPY")
    assert any(f"--from={builder.name}" in copy_args for copy_args in copies)
    assert all("--from=" in copy_args for copy_args in copies), "no source in the final image"


def test_final_image_runs_the_router_as_the_deployments_non_root_user() -> None:
    users = final_stage().all("USER")
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so the kubelet can check runAsNonRoot"
    assert int(uid) == effective_security("runAsUser")
    assert final_stage().all("ENTRYPOINT") == ['["warmpool-router"]']


def test_final_image_exposes_the_container_ports() -> None:
    exposed = {int(port.split("/")[0]) for line in final_stage().all("EXPOSE")
               for port in line.split()}
    assert exposed == {container_port("http"), container_port("metrics")}
    assert any("PYTHONUNBUFFERED=1" in env for env in final_stage().all("ENV"))


def test_final_image_installs_no_build_tools() -> None:
    for run in final_stage().all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|build-essential)\b", run), run


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    ignored = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "tests", "bench/results"} <= ignored
    assert any("__pycache__" in pattern for pattern in ignored)
    builder = dockerfile_stages(DOCKERFILE.read_text())[0]
    for copy_args in builder.all("COPY"):
        *sources, _destination = shlex.split(copy_args)
        assert not set(sources) & ignored, f"COPY {copy_args} needs an ignored path"
