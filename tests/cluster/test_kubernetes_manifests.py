"""cluster/kubernetes: every manifest validates strictly against the KubeRay CRDs (offline), broken copies are
rejected by the same check, and the manifests agree with each other and with the enkg-dist job they run."""

import copy
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from enkg_dist.config import load_config

pytest.importorskip("jsonschema")  # validate.py needs it

K8S = Path(__file__).resolve().parents[2] / "cluster" / "kubernetes"


def _load_validator():
    """cluster/kubernetes/validate.py as a module (it is a script beside the manifests, not a package)."""
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate = _load_validator()


def _docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


def _one(name: str, kind: str) -> dict:
    """The single document of `kind` in a manifest."""
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def test_the_expected_manifests_exist():
    names = {p.name for p in validate.manifests()}
    assert {"rayjob.yaml", "raycluster.yaml", "storage.yaml", "job-configmap.yaml"} <= names


@pytest.mark.parametrize("path", validate.manifests(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path):
    assert validate.validate_file(path) == []


def _set(path: list, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path: list):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _rename(path: list, new: str):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[new] = node.pop(path[-1])
    return mutate


WORKERS = ["spec", "rayClusterSpec", "workerGroupSpecs"]
HEAD_CONTAINER = ["spec", "headGroupSpec", "template", "spec", "containers", 0]
BROKEN = [  # (manifest, kind, mutation, JSON path of the error, words of the message)
    ("rayjob.yaml", "RayJob", _set([*WORKERS, 1, "replicas"], "two"),
     "$.spec.rayClusterSpec.workerGroupSpecs[1].replicas", "'two' is not of type 'integer'"),
    ("rayjob.yaml", "RayJob", _delete(["spec", "rayClusterSpec", "headGroupSpec", "template"]),
     "$.spec.rayClusterSpec.headGroupSpec", "'template' is a required property"),
    ("rayjob.yaml", "RayJob", _delete([*WORKERS, 0, "groupName"]),
     "$.spec.rayClusterSpec.workerGroupSpecs[0]", "'groupName' is a required property"),
    ("rayjob.yaml", "RayJob", _rename(["spec", "entrypoint"], "entrypont"),
     "$.spec", "'entrypont' was unexpected"),
    ("rayjob.yaml", "RayJob", _rename(["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinished"),
     "$.spec", "'shutdownAfterJobFinished' was unexpected"),
    ("raycluster.yaml", "RayCluster", _set(["spec", "enableInTreeAutoscaling"], "yes"),
     "$.spec.enableInTreeAutoscaling", "'yes' is not of type 'boolean'"),
    ("raycluster.yaml", "RayCluster", _rename([*HEAD_CONTAINER, "volumeMounts"], "volumeMount"),
     "$.spec.headGroupSpec.template.spec.containers[0]", "'volumeMount' was unexpected"),
    ("raycluster.yaml", "RayCluster", _set(["spec", "authOptions", "mode"], "password"),
     "$.spec.authOptions.mode", "'password' is not one of"),
    ("raycluster.yaml", "RayCluster", _rename(["metadata", "labels"], "lables"),
     "$.metadata", "'lables' was unexpected"),
    ("storage.yaml", "PersistentVolumeClaim", _delete(["spec", "resources"]),
     "$.spec", "'resources' is a required property"),
    ("storage.yaml", "PersistentVolumeClaim", _set(["spec", "accessModes"], "ReadWriteOnce"),
     "$.spec.accessModes", "is not of type 'array'"),
    ("job-configmap.yaml", "ConfigMap", _set(["data", "job.yaml"], 3),
     "$.data.job.yaml", "3 is not of type 'string'"),
    ("job-configmap.yaml", "ConfigMap", _rename(["data"], "dta"),
     "$", "'dta' was unexpected"),
]


@pytest.mark.parametrize("name, kind, mutate, where, message", BROKEN,
                         ids=[f"{b[0]}:{b[3]}:{b[4][:24]}" for b in BROKEN])
def test_a_broken_manifest_is_rejected(name, kind, mutate, where, message):
    docs = _docs(name)
    i = next(i for i, d in enumerate(docs) if d["kind"] == kind)
    docs[i] = copy.deepcopy(docs[i])
    mutate(docs[i])
    errors = validate.validate_documents(docs, name)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{name}: document {i}: {where}: ") and message in errors[0], errors


def test_an_unknown_kind_is_an_error_not_a_skip():
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
    (error,) = validate.validate_documents([doc], "svc.yaml")
    assert error.startswith("svc.yaml: document 0: $: no schema for apiVersion 'v1' kind 'Service'")


def test_strict_rejects_unknown_keys_only_where_the_schema_lists_its_keys():
    schema = {"type": "object", "properties": {
        "listed": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "free": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"b": {}}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
        "either": {"anyOf": [{"type": "object", "properties": {"d": {}}}]}}}
    out = validate.strict(schema)
    props = out["properties"]
    assert out["additionalProperties"] is False and props["listed"]["additionalProperties"] is False
    assert "additionalProperties" not in props["free"]
    assert props["map"]["additionalProperties"]["additionalProperties"] is False
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left alone


def test_the_command_line_prints_one_line_per_error_and_fails(tmp_path, capsys):
    job = _one("rayjob.yaml", "RayJob")
    job["spec"]["backoffLimit"] = "two"
    job["spec"]["entrypont"] = job["spec"].pop("entrypoint")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all([_one("job-configmap.yaml", "ConfigMap"), job]))
    assert validate.main([str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{broken}: document 1: $.spec: Additional properties are not allowed ('entrypont' was "
                     "unexpected)",
                     f"{broken}: document 1: $.spec.backoffLimit: 'two' is not of type 'integer'"]
    assert validate.main([]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def _group_resources(group: dict) -> dict:
    """A worker group's Ray resources: custom ones from rayStartParams, GPUs from the container limits."""
    text = group.get("rayStartParams", {}).get("resources", '"{}"')
    resources = json.loads(json.loads(text))  # KubeRay's quoting: a JSON string holding the JSON object
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {**resources, "GPU": int(limits.get("nvidia.com/gpu", 0))}


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_the_job_in_the_configmap_is_a_valid_enkg_job_that_fits_the_cluster(name, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(_one("job-configmap.yaml", "ConfigMap")["data"]["job.yaml"])
    cfg = load_config(job_file)
    ex = cfg.execution
    assert ex.backend == "ray" and ex.address == "auto"
    doc = _one(name, "RayJob" if name == "rayjob.yaml" else "RayCluster")
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    capacity = {}
    for group in cluster["workerGroupSpecs"]:
        for key, amount in _group_resources(group).items():
            capacity[key] = capacity.get(key, 0) + group["maxReplicas"] * amount
    for key, amount in ex.worker_resources.items():
        assert capacity.get(key, 0) >= ex.num_workers * amount, (key, capacity)
    assert capacity["GPU"] >= ex.prior_actors * ex.prior_gpus


def test_the_rayjob_runs_the_mounted_job_and_writes_to_the_claimed_volume():
    spec = _one("rayjob.yaml", "RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["enkg-dist", "run"] and argv[argv.index("--address") + 1] == "auto"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    configmap = _one("job-configmap.yaml", "ConfigMap")
    assert volumes["job"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert argv[2] == f"{mounts['job']}/job.yaml" and "job.yaml" in configmap["data"]
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == _one("storage.yaml", "PersistentVolumeClaim")[
        "metadata"]["name"]
    assert argv[argv.index("--run-dir") + 1].startswith(mounts["runs"] + "/")  # a retry resumes from the volume
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
