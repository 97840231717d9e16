"""Cluster manifests validate offline: KubeRay kinds against the CRDs' openAPIV3Schema, their
Kubernetes pod templates with kubernetes-validate, the Serve config with Ray's own schema, and
everything they reference (image build, entrypoints, import paths) exists in this repository."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

KUBERAY = REPO_ROOT.parent / "shared" / "reference" / "kuberay"
MANIFESTS = sorted((REPO_ROOT / "infra" / "k8s").glob("*.yaml"))
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}


def _documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _crd_schema(kind: str) -> dict:
    if not (KUBERAY / CRD_FILES[kind]).is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (../shared/reference/kuberay/)")
    crd = yaml.safe_load((KUBERAY / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _pod_templates(kind: str, spec: dict) -> list[dict]:
    clusters = {"RayJob": [spec.get("rayClusterSpec")], "RayService": [spec.get("rayClusterConfig")],
                "RayCluster": [spec]}[kind]
    templates = []
    for cluster in filter(None, clusters):
        templates.append(cluster["headGroupSpec"]["template"])
        templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    return templates


def test_every_stage_has_a_rayjob_and_serving_a_rayservice():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _documents()}
    for stage in ("pretrain", "align", "instruct"):
        assert ("RayJob", f"kosmos-g-{stage}") in kinds
    assert ("RayService", "kosmos-g") in kinds


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_resources_match_the_crd_schema(name, doc):
    import jsonschema

    schema = _crd_schema(doc["kind"])
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(schema).validate(doc)  # extensions (x-kubernetes-*) are ignored


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_pod_templates_are_valid_kubernetes(name, doc):
    import kubernetes_validate

    for template in _pod_templates(doc["kind"], doc["spec"]):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, "1.32", strict=True)


def test_a_broken_manifest_is_caught():
    import jsonschema
    import kubernetes_validate

    doc = next(doc for _, doc in _documents() if doc["kind"] == "RayJob")
    broken = {**doc, "spec": {**doc["spec"], "shutdownAfterJobFinishes": "yes please"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_crd_schema("RayJob")).validate(broken)
    template = _pod_templates("RayJob", doc["spec"])[0]
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
           "template": {**template, "spec": {**template["spec"], "containers": [{"image": "x"}]}}}  # no name
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.32", strict=True)


def _serve_configs() -> list[tuple[str, dict]]:
    configs = [("infra/serve/kosmos-g.yaml", yaml.safe_load((REPO_ROOT / "infra/serve/kosmos-g.yaml").read_text()))]
    configs += [(name, yaml.safe_load(doc["spec"]["serveConfigV2"])) for name, doc in _documents()
                if doc["kind"] == "RayService"]
    return configs


@pytest.mark.parametrize("name,config", _serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_configs_match_rays_schema_and_import(name, config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        module, attribute = app.import_path.split(":")
        assert hasattr(importlib.import_module(module), attribute), app.import_path
        deployments = {d.name for d in app.deployments}
        assert deployments <= {"Ingress", "Encoder", "Denoiser"}, deployments


def test_everything_the_manifests_reference_exists():
    dockerfile = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M).group(1)
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)", dockerfile, re.M))
    for name, doc in _documents():
        for template in _pod_templates(doc["kind"], doc["spec"]):
            for container in template["spec"]["containers"]:
                assert container["image"].startswith("kosmos-g:"), (name, container["image"])  # built from the Dockerfile
                assert container.get("workingDir", workdir) == workdir
        entrypoint = doc["spec"].get("entrypoint")
        if entrypoint:
            script = next(arg for arg in shlex.split(entrypoint) if arg.endswith(".py"))
            assert (REPO_ROOT / script).is_file(), script
            assert script.split("/")[0] in copied, f"{script} is not copied into the image"
