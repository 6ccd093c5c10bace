"""Validate Kubernetes manifests offline, strictly: KubeRay kinds against their CRD's openAPIV3Schema, core kinds
(ConfigMap, PersistentVolumeClaim, Secret) against a minimal schema of the fields we use; unknown fields are errors.

    python cluster/kubernetes/validate.py [MANIFEST.yaml ...] [--crds DIR]

Without files it checks every *.yaml beside this script. Prints one line per error (file, document index, JSON path,
message) and exits 1 when there is any. Importable: `validate_file`, `validate_documents`.
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path

import yaml
from jsonschema import Draft7Validator

HERE = Path(__file__).resolve().parent
CRD_DIR = HERE / "crds"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB: the C parser reads them in ~1 s

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE])?$"}]}
_METADATA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
    "required": ["name"],
}
_CORE = {
    ("v1", "ConfigMap"): {"data": _STRINGS, "binaryData": _STRINGS, "immutable": {"type": "boolean"}},
    ("v1", "Secret"): {"data": _STRINGS, "stringData": _STRINGS, "type": {"type": "string"},
                       "immutable": {"type": "boolean"}},
    ("v1", "PersistentVolumeClaim"): {"spec": {
        "type": "object",
        "required": ["accessModes", "resources"],
        "properties": {
            "accessModes": {"type": "array", "minItems": 1, "items": {
                "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "resources": {"type": "object", "required": ["requests"], "properties": {
                "requests": {"type": "object", "required": ["storage"], "properties": {"storage": _QUANTITY}},
                "limits": {"type": "object", "properties": {"storage": _QUANTITY}}}},
            "storageClassName": {"type": "string"},
            "volumeMode": {"enum": ["Filesystem", "Block"]},
            "volumeName": {"type": "string"},
        }}},
}


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which every object schema with `properties` rejects other keys."""
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    return out


def _with_metadata(schema: dict) -> dict:
    """The document schema with our ObjectMeta check in place of the CRDs' free-form `metadata`."""
    props = {**schema.get("properties", {}), "metadata": _METADATA}
    return {**schema, "properties": props, "required": sorted({*schema.get("required", []), "metadata"})}


def _core_schema(fields: dict) -> dict:
    """A document schema for a core kind with the given top-level fields."""
    return {"type": "object", "required": ["apiVersion", "kind", "metadata"],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, **fields}}


@lru_cache(maxsize=4)
def schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], Draft7Validator]:
    """Strict validators by (apiVersion, kind): every served version of every CRD in `crd_dir`, and the core kinds."""
    found = {key: _core_schema(fields) for key, fields in _CORE.items()}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                found[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return {key: Draft7Validator(strict(_with_metadata(s))) for key, s in found.items()}


def json_path(parts) -> str:
    """A jsonschema error path as `$.spec.workerGroupSpecs[0].replicas`."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def validate_documents(docs: list, source: str, crd_dir: Path = CRD_DIR) -> list[str]:
    """Errors of the documents of one manifest, one line each: 'SOURCE: document I: PATH: message'."""
    known = schemas(Path(crd_dir))
    errors = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{source}: document {i}"
        if not isinstance(doc, dict):
            errors.append(f"{where}: $: a manifest must be a mapping, got {type(doc).__name__}")
            continue
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in known:
            kinds = ", ".join(f"{v}/{k}" for v, k in sorted(known))
            errors.append(f"{where}: $: no schema for apiVersion {key[0]!r} kind {key[1]!r} (known: {kinds})")
            continue
        for err in sorted(known[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            errors.append(f"{where}: {json_path(err.absolute_path)}: {err.message}")
    return errors


def validate_file(path: Path, crd_dir: Path = CRD_DIR) -> list[str]:
    """Errors of every document of a (multi-document) YAML manifest."""
    try:
        docs = list(yaml.load_all(Path(path).read_text(), Loader=_LOADER))
    except yaml.YAMLError as e:
        return [f"{path}: $: not valid YAML ({str(e).splitlines()[0]})"]
    return validate_documents(docs, str(path), crd_dir)


def manifests(folder: Path = HERE) -> list[Path]:
    """The manifests of a folder (its *.yaml files; the CRDs live in a subfolder)."""
    return sorted(Path(folder).glob("*.yaml"))


def main(argv: list[str] | None = None) -> int:
    """Validate the given manifests (default: those beside this script); 1 when any error was printed."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("files", nargs="*", type=Path, help="manifests (default: cluster/kubernetes/*.yaml)")
    parser.add_argument("--crds", type=Path, default=CRD_DIR, help="folder of CRD YAMLs (default: %(default)s)")
    args = parser.parse_args(argv)
    files = args.files or manifests()
    errors = [e for f in files for e in validate_file(f, args.crds)]
    print("\n".join(errors) if errors else f"ok: {len(files)} manifests valid (strict)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
