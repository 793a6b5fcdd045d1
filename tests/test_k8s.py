"""deploy/k8s: every manifest parses and hangs together, without a cluster.

Workloads, probes, Secrets, ConfigMaps, claims and the autoscaler are cross-checked, the
commands are real ``maskmesh`` entry points, and each container's settings (its
ConfigMap file plus its environment) load through the service's own settings class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from maskmesh import brokerconf
from maskmesh.settings import REPO_ROOT, ServiceSettings, load_settings

from .test_compose import SETTINGS_CLASSES, _import, check_entry_point

K8S = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATION = REPO_ROOT / "deploy" / "kustomization.yaml"
WORKLOADS = ("Deployment", "StatefulSet")


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


DOCS = _documents()


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in DOCS if doc["kind"] == kind}


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))


def _generated_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, as kustomize's secretGenerator makes them from files."""
    return {
        gen["name"]: {Path(f.split("=")[-1]).name for f in gen["files"]}
        for gen in _kustomization()["secretGenerator"]
    }


def _containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (workload, container)
        for kind in WORKLOADS
        for workload in _of_kind(kind).values()
        for container in workload["spec"]["template"]["spec"]["containers"]
    ]


def _maskmesh_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w, c in _containers() if c["image"].startswith("maskmesh:")]


def test_every_manifest_has_kind_name_and_api_version() -> None:
    assert DOCS
    for doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    kinds = {doc["kind"] for doc in DOCS}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap"} <= kinds
    assert {"HorizontalPodAutoscaler", "PersistentVolumeClaim", "Namespace"} <= kinds


def test_kustomization_lists_every_manifest() -> None:
    listed = {Path(r).name for r in _kustomization()["resources"]}
    assert listed == {path.name for path in K8S.glob("*.yaml")}


def test_workloads_have_the_right_shape() -> None:
    statefulsets, deployments = _of_kind("StatefulSet"), _of_kind("Deployment")
    assert statefulsets["broker"]["spec"]["replicas"] == 1
    assert statefulsets["broker"]["spec"]["volumeClaimTemplates"]
    assert statefulsets["notifier"]["spec"]["replicas"] == 1
    outbox = statefulsets["notifier"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = statefulsets["notifier"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {m["name"]: m["mountPath"] for m in mounts}[outbox] == "/var/lib/maskmesh/outbox"
    assert statefulsets["inference"]["spec"]["replicas"] >= 2
    for camera in ("cam1", "cam2"):
        capture = deployments[f"capture-{camera}"]
        assert capture["spec"]["replicas"] == 1
        assert capture["spec"]["strategy"]["type"] == "Recreate"
    for name, workload in {**statefulsets, **deployments}.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        if workload["kind"] == "StatefulSet":
            assert workload["spec"]["serviceName"] in _of_kind("Service"), name


def test_inference_worker_id_is_the_pod_name() -> None:
    (container,) = _of_kind("StatefulSet")["inference"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("MASKMESH_INFERENCE__WORKER_ID", "MASKMESH_INSTANCE"):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_every_maskmesh_container_probes_healthz() -> None:
    for workload, container in _containers():
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{workload['metadata']['name']} lacks {probe}"
    for workload, container in _maskmesh_containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz"
            assert ports[get["port"]] == 9100, workload["metadata"]["name"]


def test_hpa_targets_an_existing_workload() -> None:
    for hpa in _of_kind("HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in _of_kind(target["kind"]), target
        assert target["kind"] == "StatefulSet"
        assert hpa["spec"]["minReplicas"] >= 2
        metrics = hpa["spec"]["metrics"]
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
        container = _of_kind(target["kind"])[target["name"]]["spec"]["template"]["spec"]
        assert container["containers"][0]["resources"]["requests"]["cpu"]
    inference_text = (K8S / "inference.yaml").read_text(encoding="utf-8")
    assert "maskmesh_pending" in inference_text


def _secret_refs(pod: dict[str, Any]) -> list[tuple[str, list[str]]]:
    refs: list[tuple[str, list[str]]] = []
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            items = [i["key"] for i in volume["secret"].get("items", [])]
            refs.append((volume["secret"]["secretName"], items))
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                refs.append(
                    (source["secret"]["name"], [i["key"] for i in source["secret"]["items"]])
                )
    for container in pod["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], [ref["key"]]))
    return refs


def test_referenced_secrets_configmaps_and_claims_exist() -> None:
    secrets = _generated_secrets()
    configmaps = _of_kind("ConfigMap")
    claims = _of_kind("PersistentVolumeClaim")
    for kind in WORKLOADS:
        for name, workload in _of_kind(kind).items():
            pod = workload["spec"]["template"]["spec"]
            for secret, keys in _secret_refs(pod):
                assert secret in secrets, f"{name}: no Secret {secret}"
                assert set(keys) <= secrets[secret], f"{name}: {secret} lacks {keys}"
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, name
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, name


def test_generated_secrets_are_what_maskmesh_broker_writes() -> None:
    plan = brokerconf.BrokerPlan(district="demo", cameras=("cam1", "cam2"))
    written = {f"broker-{user}" for user in brokerconf.users(plan)} | {brokerconf.PASSWD_SECRET}
    for gen in _kustomization()["secretGenerator"]:
        for entry in gen["files"]:
            assert entry.startswith("secrets/"), "Secrets come from deploy/secrets only"
    assert _generated_secrets()["maskmesh-broker"] == written
    assert _generated_secrets()["maskmesh-smtp"] == {"smtp-password"}


def test_broker_configmap_is_the_committed_broker_config() -> None:
    data = _of_kind("ConfigMap")["broker-config"]["data"]
    for name in ("mosquitto.conf", "acl"):
        assert data[name] == (REPO_ROOT / "broker" / name).read_text(encoding="utf-8"), name


@pytest.mark.parametrize("workload_name", ["capture-cam1", "capture-cam2", "inference", "notifier"])
def test_commands_are_real_entry_points(
    workload_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workload, container) = next(
        (w, c) for w, c in _maskmesh_containers() if w["metadata"]["name"] == workload_name
    )
    check_entry_point(container["command"], monkeypatch)


def _config_path(container: dict[str, Any]) -> str:
    command = container["command"]
    if "--config" in command:
        return str(command[command.index("--config") + 1])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return str(env["MASKMESH_CONFIG"])


@pytest.mark.parametrize("workload_name", ["capture-cam1", "capture-cam2", "inference", "notifier"])
def test_settings_load_from_configmap_and_environment(
    workload_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workload, container = next(
        (w, c) for w, c in _maskmesh_containers() if w["metadata"]["name"] == workload_name
    )
    pod = workload["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_path = Path(_config_path(container))
    volume = next(v for v in pod["volumes"] if "configMap" in v and mounts.get(v["name"]))
    assert config_path.parent == Path(mounts[volume["name"]])
    data = _of_kind("ConfigMap")[volume["configMap"]["name"]]["data"]
    local = tmp_path / config_path.name
    local.write_text(data[config_path.name], encoding="utf-8")

    for key in list(os.environ):
        if key.startswith("MASKMESH_"):
            monkeypatch.delenv(key)
    pod_name = f"{workload['metadata']['name']}-0"
    for env in container.get("env", []):
        if env["name"] == "MASKMESH_CONFIG":
            continue
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        elif env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
            monkeypatch.setenv(env["name"], pod_name)
    settings_cls = _import(SETTINGS_CLASSES[container["command"][1]])
    assert issubclass(settings_cls, ServiceSettings)
    settings = load_settings(settings_cls, local)

    assert settings.district == "demo"
    assert settings.broker.host == "broker" and settings.metrics_port == 9100
    assert settings.metrics_host == "0.0.0.0", "probes come from outside the pod"
    secret_dir = Path(mounts["secrets"])
    assert settings.broker.password_file is not None
    assert settings.broker.password_file.parent == secret_dir
    keys = {key for _, items in _secret_refs(pod) for key in items}
    assert settings.broker.password_file.name in keys
    assert settings.broker.password_file.name == f"broker-{settings.broker.username}"
    if workload_name == "inference":
        assert settings.inference.worker_id == pod_name
        assert settings.instance == pod_name
        # The ConfigMap's section survives next to the variable from the environment.
        assert settings.inference.max_batch == 32
        assert str(settings.inference.model_path).startswith("/opt/maskmesh/models/")
    if workload_name == "notifier":
        assert settings.notifier.smtp.password_file is not None
        assert settings.notifier.smtp.password_file.name in keys
        assert str(settings.notifier.outbox_path).startswith(mounts["outbox"] + "/")
