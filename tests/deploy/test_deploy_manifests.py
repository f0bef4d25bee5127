"""Deployment files: schema validity and the wiring that matters.

Schemas come from installed packages (no network at test time):
- docker-compose.yml: the Compose Specification JSON schema vendored by `check-jsonschema`
  (check_jsonschema/builtin_schemas/vendor/compose-spec.json);
- deploy/k8s/*.yaml: the Kubernetes JSON schemas shipped by `kubernetes-validate`, strict variant
  (unknown fields rejected), for an older and the newest Kubernetes version it ships;
- the KEDA ScaledObject: the JSON schema of `cloudcoil-models-keda`'s ScaledObject model, which is generated
  from KEDA's ScaledObject CRD (OpenAPI v3), made strict the same way.
"""

from __future__ import annotations

import copy
import importlib
import ipaddress
import itertools
import json
import re
import shlex
import subprocess
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.queue import make_celery
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
DOCKERFILE_API = ROOT / "deploy" / "Dockerfile.api"
DOCKERFILE_WORKER = ROOT / "deploy" / "Dockerfile.worker"
K8S_VERSIONS = ("1.30.0", "1.37.0")
KLEIN_SETTINGS = {f"KLEIN_{name.upper()}" for name in Settings.model_fields}


# -- loading ---------------------------------------------------------------------------------------------


def _errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _strict(schema: Any) -> Any:
    """Reject unknown fields, as kubectl --validate=strict does: additionalProperties false wherever a
    schema lists properties and says nothing about others."""
    if isinstance(schema, dict):
        for value in schema.values():
            _strict(value)
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@cache
def keda_validator() -> jsonschema.protocols.Validator:
    models = importlib.import_module("cloudcoil.models.keda.v1alpha1")
    schema = _strict(models.ScaledObject.model_json_schema(by_alias=True))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """The manifests of `kubectl apply -k deploy/k8s`: its own files and the worker pool's."""
    docs = []
    paths = [*K8S_DIR.glob("*.yaml"), *(K8S_DIR / "worker-pool").glob("*.yaml")]
    for path in sorted(p for p in paths if p.name != "kustomization.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def config_data() -> dict[str, str]:
    return dict(k8s("ConfigMap", "klein-config")["data"])


def run_commands(dockerfile: Path) -> list[str]:
    """Each shell command of each RUN instruction (continuations joined, split on && and ;)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    commands: list[str] = []
    for line in text.splitlines():
        if line.strip().upper().startswith("RUN "):
            commands += [c.strip() for c in re.split(r"&&|;", line.strip()[4:]) if c.strip()]
    return commands


def pip_installs(dockerfile: Path) -> list[str]:
    return [c for c in run_commands(dockerfile) if re.match(r"(python3? -m )?pip install\b", c)]


def base_images(dockerfile: Path) -> list[str]:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], ref) for ref in re.findall(r"^FROM (\S+)", text, re.M)]


# -- schemas ---------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    assert _errors(compose_validator(), compose()) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    checked = set()
    for filename, doc in k8s_docs():
        if doc["apiVersion"].startswith(("keda.sh/", "kustomize.config.k8s.io/")):
            continue  # not Kubernetes API types: checked below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{filename}: {doc['kind']} at {'/'.join(map(str, e.path))}: {e.message}")
        checked.add(doc["kind"])
    assert {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "Job"} <= checked


def test_scaled_object_matches_the_keda_crd_schema() -> None:
    scaled = k8s("ScaledObject", "klein-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert _errors(keda_validator(), scaled) == []


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files | {"worker-pool"})
    pool = yaml.safe_load((K8S_DIR / "worker-pool" / "kustomization.yaml").read_text())
    assert sorted(pool["resources"]) == ["worker-deployment.yaml", "worker-scaledobject.yaml"]
    images = {image["name"] for image in kustomization["images"]}
    used = {container(doc)["image"] for _, doc in k8s_docs() if doc["kind"] in ("Deployment", "Job")}
    assert used == images == {"klein-serve-api", "klein-serve-worker"}


def kustomize(folder: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k folder` would apply, rendered offline by kubectl's own kustomize."""
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def test_the_base_model_has_its_own_worker_pool_scaled_on_its_own_queue() -> None:
    """deploy/k8s/base-model: the worker pool renamed, on the base model's weights and queue, its own selector."""
    default = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S_DIR)}
    base = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S_DIR / "base-model")}
    assert set(base) == {("Deployment", "klein-worker-base"), ("ScaledObject", "klein-worker-base")}
    deployment, pool = base[("Deployment", "klein-worker-base")], default[("Deployment", "klein-worker")]
    worker = container(deployment)
    assert worker["command"][4:6] == ["-Q", "$(KLEIN_QUEUE_NAME).flux-klein-4b-base"]
    assert container(pool)["command"][4:6] == ["-Q", "$(KLEIN_QUEUE_NAME)"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["KLEIN_MODEL_ID"] == "flux-klein-4b-base" and env["KLEIN_MODEL_PATH"].startswith("/models/")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector != pool["spec"]["selector"]["matchLabels"]  # the pools never adopt each other's pods
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
    scaled = base[("ScaledObject", "klein-worker-base")]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "klein-worker-base"
    lists = [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]]
    assert lists == ["klein.flux-klein-4b-base"] + [f"klein.flux-klein-4b-base\x06\x16{p}" for p in (3, 6, 8, 9)]
    assert _errors(keda_validator(), scaled) == []
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _forwarded_trust(container: dict[str, Any]) -> list[str]:
    """Whom a container's uvicorn believes proxy headers from: `--forwarded-allow-ips` and FORWARDED_ALLOW_IPS."""
    words = [str(word) for word in [*container.get("command", []), *container.get("args", [])]]
    found = [value for flag, value in itertools.pairwise(words) if flag == "--forwarded-allow-ips"]
    found += [word.split("=", 1)[1] for word in words if word.startswith("--forwarded-allow-ips=")]
    env = container.get("env", {})
    pairs = env.items() if isinstance(env, dict) else ((e["name"], e.get("value", "")) for e in env)
    return found + [str(value) for name, value in pairs if name == "FORWARDED_ALLOW_IPS"]


def test_no_deployment_trusts_proxy_headers_from_everyone() -> None:
    """`--forwarded-allow-ips "*"` let any client pose as any address with X-Forwarded-For (and so guess admin
    keys without end, one made-up address each). The API believes only its ingress: a range, never `*`."""
    rendered = [
        doc
        for folder in (K8S_DIR, K8S_DIR / "base-model", K8S_DIR / "monitoring")
        for doc in kustomize(folder)
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet", "ConfigMap")
    ]
    trusted: dict[str, list[str]] = {}
    for doc in rendered:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            trusted[name] = [v for k, v in doc.get("data", {}).items() if k == "FORWARDED_ALLOW_IPS"]
            continue
        for spec in doc["spec"]["template"]["spec"]["containers"]:
            trusted[f"{name}/{spec['name']}"] = _forwarded_trust(spec)
    for name, service in compose()["services"].items():
        command = service.get("command", [])
        words = shlex.split(command) if isinstance(command, str) else command
        trusted[f"compose/{name}"] = _forwarded_trust({"command": words, "env": service.get("environment", {})})
    assert {name: values for name, values in trusted.items() if any("*" in v for v in values)} == {}
    (api,) = trusted["Deployment/klein-api/api"]
    assert all(ipaddress.ip_network(part.strip()).prefixlen >= 8 for part in api.split(","))
    assert "FORWARDED_ALLOW_IPS" in compose()["services"]["api"]["environment"]


def test_the_validators_reject_broken_copies() -> None:
    broken_compose = copy.deepcopy(compose())
    broken_compose["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken_deployment = copy.deepcopy(k8s("Deployment", "klein-worker"))
    broken_deployment["spec"]["replicas"] = "one"
    broken_scaled = copy.deepcopy(k8s("ScaledObject", "klein-worker"))
    broken_scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4  # trigger metadata is string → string
    broken_scaled["spec"]["scaleTargetRef"]["nmae"] = "typo"
    assert _errors(compose_validator(), broken_compose)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken_deployment, K8S_VERSIONS[-1], strict=True)
    assert len(_errors(keda_validator(), broken_scaled)) == 2


# -- images ----------------------------------------------------------------------------------------------


def test_api_image_has_no_worker_extra_and_no_torch() -> None:
    installs = pip_installs(DOCKERFILE_API)
    assert installs, "the API image installs the project"
    for command in installs:
        assert "--no-cache-dir" in command
        assert "worker" not in command and "torch" not in command, command
    assert any(shlex.split(command)[-1] == "." for command in installs)


def test_worker_image_installs_the_worker_extra() -> None:
    installs = pip_installs(DOCKERFILE_WORKER)
    assert any(".[worker]" in command for command in installs)
    assert all("--no-cache-dir" in command for command in installs)
    (base,) = base_images(DOCKERFILE_WORKER)
    assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "runtime" in base


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_WORKER], ids=["api", "worker"])
def test_images_are_pinned_and_run_as_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for image in base_images(dockerfile):
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    if dockerfile == DOCKERFILE_API:
        assert base_images(dockerfile)[0].startswith("python:3.11") and "slim" in base_images(dockerfile)[0]
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "PYTHONDONTWRITEBYTECODE=1" in text


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_API, DOCKERFILE_WORKER], ids=["api", "worker"])
def test_images_hold_every_package_and_the_revision_they_were_built_from(dockerfile: Path) -> None:
    """Every package the project installs is copied in (pip would install without one, the process fail to
    start); KLEIN_REVISION, a build argument, reaches the processes' klein_build_info."""
    text = dockerfile.read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, re.M))
    assert {package.rstrip("*") for package in packages} <= copied
    assert re.search(r"^ARG KLEIN_REVISION=unknown$", text, re.M)
    assert re.search(r"^ENV KLEIN_REVISION=\$\{KLEIN_REVISION\}$", text, re.M)
    services = compose()["services"]
    assert (
        services["api"]["build"]["args"]
        == services["worker"]["build"]["args"]
        == {"KLEIN_REVISION": "${KLEIN_REVISION:-unknown}"}
    )


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".data", ".git", "**/__pycache__", ".mypy_cache", ".pytest_cache"} <= ignored


# -- compose wiring --------------------------------------------------------------------------------------


def test_compose_services_come_up_in_order() -> None:
    services = compose()["services"]
    core = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "webhooks"}
    more_gpus = {f"worker-gpu{i}" for i in range(1, 8)}  # the `gpus-N` profiles
    observability = {"prometheus", "alertmanager", "grafana"}
    profiles = observability | more_gpus | {"worker-base"}  # observability, gpus-N, base-model
    assert set(services) == core | profiles
    conditions = {
        name: {dep: spec["condition"] for dep, spec in s.get("depends_on", {}).items()} for name, s in services.items()
    }
    assert conditions["minio-init"] == {"minio": "service_healthy"}
    assert conditions["migrate"] == {"postgres": "service_healthy"}
    assert conditions["webhooks"] == {"redis": "service_healthy", "migrate": "service_completed_successfully"}
    assert services["webhooks"]["image"] == services["api"]["image"], "CPU only: the API's image, no torch"
    for tier in ("api", "worker"):
        assert conditions[tier]["migrate"] == "service_completed_successfully"
        assert conditions[tier]["minio-init"] == "service_completed_successfully"
        assert conditions[tier]["redis"] == "service_healthy"
    for name, deps in conditions.items():
        for dep, condition in deps.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no check"


def test_compose_healthchecks() -> None:
    services = compose()["services"]

    def check(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])

    assert "pg_isready" in check("postgres")
    assert "redis-cli ping" in check("redis")
    assert "mc ready local" in check("minio")
    assert "/readyz" in check("api")
    assert "klein-outputs" in " ".join(services["minio-init"]["command"])
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]


def test_compose_images_and_gpu() -> None:
    services = compose()["services"]
    assert services["api"]["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert services["migrate"]["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert any(volume.endswith(":/models") for volume in services["worker"]["volumes"])
    assert services["worker"]["environment"]["HF_HOME"].startswith("/models")
    assert "KLEIN_MODEL_PATH" in services["worker"]["environment"]


def test_compose_runs_one_worker_per_gpu_each_pinned_to_its_own() -> None:
    """`--profile gpus-N` starts N workers (`worker` plus N-1), on devices 0 … N-1, configured alike."""
    services = compose()["services"]
    for count in (2, 4, 8):
        names = ["worker"] + [n for n, s in services.items() if f"gpus-{count}" in s.get("profiles", [])]
        devices = [services[n]["deploy"]["resources"]["reservations"]["devices"] for n in names]
        assert sorted(d[0]["device_ids"][0] for d in devices) == [str(i) for i in range(count)]
        assert all(len(d) == 1 and len(d[0]["device_ids"]) == 1 for d in devices)
        assert all(services[n]["environment"] == services["worker"]["environment"] for n in names)
        assert all(services[n]["image"] == services["worker"]["image"] for n in names)


def test_compose_runs_the_base_model_as_a_pool_of_its_own() -> None:
    """`--profile base-model`: a worker for flux-klein-4b-base, configured as the others but for its model."""
    services = compose()["services"]
    base, default = services["worker-base"], services["worker"]
    assert base["profiles"] == ["base-model"] and base["image"] == default["image"]
    assert base["environment"]["KLEIN_MODEL_ID"] == "flux-klein-4b-base"
    assert base["environment"]["KLEIN_MODEL_PATH"] != default["environment"]["KLEIN_MODEL_PATH"]
    same = {k: v for k, v in base["environment"].items() if k not in ("KLEIN_MODEL_ID", "KLEIN_MODEL_PATH")}
    assert same == {k: v for k, v in default["environment"].items() if k != "KLEIN_MODEL_PATH"}
    assert "KLEIN_SERVED_MODELS" in services["api"]["environment"]


def test_compose_settings_are_real_settings() -> None:
    services = compose()["services"]
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        names = {key for key in env if key.startswith("KLEIN_")}
        assert names <= KLEIN_SETTINGS, names - KLEIN_SETTINGS
        assert {
            "KLEIN_DATABASE_URL",
            "KLEIN_REDIS_URL",
            "KLEIN_S3_ENDPOINT_URL",
            "KLEIN_S3_BUCKET",
            "KLEIN_S3_ACCESS_KEY_ID",
            "KLEIN_S3_SECRET_ACCESS_KEY",
        } <= names
        assert env["KLEIN_S3_BUCKET"] == "klein-outputs"


# -- kubernetes wiring -----------------------------------------------------------------------------------


def test_k8s_manifests_are_namespace_less() -> None:
    for filename, doc in k8s_docs():
        assert "namespace" not in doc.get("metadata", {}), filename
    assert "namespace" not in yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def test_k8s_settings_split_between_configmap_and_secret() -> None:
    config = config_data()
    secret = k8s("Secret", "klein-secrets")["stringData"]
    assert set(config) <= KLEIN_SETTINGS and set(secret) <= KLEIN_SETTINGS
    secrets = {"KLEIN_DATABASE_URL", "KLEIN_S3_ACCESS_KEY_ID", "KLEIN_S3_SECRET_ACCESS_KEY", "KLEIN_URL_SIGNING_KEY"}
    assert secrets | {"KLEIN_ADMIN_API_KEY"} <= set(secret)
    assert not set(config) & set(secret)
    for kind, name in (("Deployment", "klein-api"), ("Deployment", "klein-worker"), ("Job", "klein-migrate")):
        sources = container(k8s(kind, name))["envFrom"]
        assert {"configMapRef": {"name": "klein-config"}} in sources
        assert {"secretRef": {"name": "klein-secrets"}} in sources


def test_api_probes_service_and_autoscaler() -> None:
    api = container(k8s("Deployment", "klein-api"))
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (port,) = api["ports"]
    assert port["containerPort"] == 8000
    assert api["livenessProbe"]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert api["readinessProbe"]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    assert api["resources"]["requests"]["cpu"]  # the HPA's CPU utilization is relative to this

    deployment = k8s("Deployment", "klein-api")
    service = k8s("Service", "klein-api")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])

    hpa = k8s("HorizontalPodAutoscaler", "klein-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "klein-api"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_worker_has_a_gpu_a_liveness_ping_and_a_warm_shutdown() -> None:
    deployment = k8s("Deployment", "klein-worker")
    worker = container(deployment)
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1

    command = worker["command"]
    assert command[:4] == ["celery", "-A", "worker.app", "worker"]
    assert command[command.index("-Q") + 1] == "$(KLEIN_QUEUE_NAME)"
    node = command[command.index("-n") + 1]
    assert node.endswith("@%h")
    for probe in ("startupProbe", "livenessProbe"):
        ping = " ".join(worker[probe]["exec"]["command"])
        assert "inspect ping" in ping
        assert f'-d "{node.removesuffix("%h")}$HOSTNAME"' in ping  # %h is the pod's hostname
    liveness = worker["livenessProbe"]
    time_limit = int(config_data()["KLEIN_TASK_TIME_LIMIT_S"])
    # The solo pool answers pings only between predictions: tolerate one as long as the lease.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > time_limit
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= time_limit
    mounts = {mount["mountPath"] for mount in worker["volumeMounts"]}
    assert "/models" in mounts


def test_keda_scales_the_worker_on_the_queue_lists() -> None:
    scaled = k8s("ScaledObject", "klein-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == k8s("Deployment", "klein-worker")["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert k8s("Deployment", "klein-worker")["metadata"]["name"] not in {
        doc["spec"]["scaleTargetRef"]["name"] for _, doc in k8s_docs() if doc["kind"] == "HorizontalPodAutoscaler"
    }  # KEDA owns the worker's HPA

    config = config_data()
    queue = config["KLEIN_QUEUE_NAME"]
    redis_url = urlsplit(config["KLEIN_REDIS_URL"])
    # Celery's Redis transport: priority p > 0 lives in the list "<queue>\x06\x16<p>".
    options = make_celery(Settings(queue_name=queue)).conf.broker_transport_options
    steps = options.get("priority_steps", [0, 3, 6, 9])
    lists = [queue] + [f"{queue}\x06\x16{step}" for step in steps if step]
    triggers = scaled["triggers"]
    assert [trigger["metadata"]["listName"] for trigger in triggers] == lists
    for trigger in triggers:
        assert trigger["type"] == "redis"
        metadata = trigger["metadata"]
        assert metadata["address"] == f"{redis_url.hostname}:{redis_url.port or 6379}"
        assert metadata["databaseIndex"] == (redis_url.path.strip("/") or "0")
        assert int(metadata["listLength"]) >= 1


def test_migration_job_runs_alembic() -> None:
    job = k8s("Job", "klein-migrate")
    assert container(job)["command"] == ["alembic", "upgrade", "head"]
    assert container(job)["image"] == container(k8s("Deployment", "klein-api"))["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_the_apis_temporary_directory_is_bounded_and_holds_a_few_requests_loras() -> None:
    """The API spools LoRAs being checked (and uploads) to /tmp, an emptyDir that had no size limit: requests
    naming large LoRAs could fill the node's disk. It is bounded, with room for a few requests' worth."""
    (api,) = [d for d in kustomize(K8S_DIR) if d["kind"] == "Deployment" and d["metadata"]["name"] == "klein-api"]
    (mount,) = [m for m in container(api)["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    limit = re.fullmatch(r"(\d+)(Mi|Gi)", volume["emptyDir"]["sizeLimit"])
    assert limit is not None, volume
    size = int(limit[1]) * {"Mi": 2**20, "Gi": 2**30}[limit[2]]
    env = {e["name"]: e.get("value") for e in container(api).get("env", [])}
    assert "KLEIN_MAX_LORAS" not in env and "KLEIN_MAX_LORA_BYTES" not in env  # else the bound follows them
    per_request = Settings.model_fields["max_loras"].default * Settings.model_fields["max_lora_bytes"].default
    assert 4 * per_request <= size <= 16 * per_request
