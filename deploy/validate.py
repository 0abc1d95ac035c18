"""Render and validate the qsmdask Kubernetes deployment, offline.

What is checked (every failure is reported, the exit status is 1 when any):

* each kustomize overlay renders (``kubectl kustomize``);
* every core object validates strictly against the Kubernetes OpenAPI schemas of
  ``--k8s-version`` (package ``kubernetes-validate``);
* ``DaskCluster`` / ``DaskAutoscaler`` validate against the CRD schemas that the
  dask-kubernetes operator ships (``openAPIV3Schema``), and the pod and service specs
  embedded in a ``DaskCluster`` validate strictly as core ``PodSpec`` / ``ServiceSpec``;
* the Prefect work-pool base job template renders (placeholders -> defaults) to a Job that
  validates strictly;
* policy: every pod runs as non-root uid 10001 with RuntimeDefault seccomp, every container
  drops ALL capabilities, forbids privilege escalation, has a read-only root filesystem
  with /tmp on an emptyDir, and requests and limits CPU and memory; no Secret objects and no
  literal credentials; Dask workers declare ``--resources MEMORY=<bytes>`` no larger than
  their container memory limit; one image reference across manifests, job template and prefect.yaml;
  the Prefect deployment's entrypoint, parameters, cron schedule and work pool are coherent.

Usage (from the repository root)::

    python deploy/validate.py                       # all overlays
    python deploy/validate.py --overlay dev --k8s-version 1.29.0 --out /tmp/rendered
    python deploy/validate.py --crd-dir DIR         # CRDs not from an installed dask_kubernetes

The CRD directory is, in order: ``--crd-dir``, ``$QSMDASK_DASK_CRDS``, the
``dask_kubernetes`` package when installed (found without importing it).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_DIR = DEPLOY_DIR.parent
OVERLAYS = ("dev", "production")
K8S_VERSION = "1.29.0"
RUN_AS_USER = 10001
CRD_SUBDIR = Path("operator/deployment/helm/dask-kubernetes-operator/crds")
CRD_FILES = ("daskcluster.yaml", "daskautoscaler.yaml")  # the kinds deploy/ uses
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~0.3 MB each
SECRET_NAME_RE = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|AUTH_STRING|CREDENTIAL)", re.I)
_PLACEHOLDER_RE = re.compile(r"^\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")
_INLINE_PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


# --------------------------------------------------------------------------- rendering
def render_overlay(path: Path) -> list[dict]:
    """``kubectl kustomize PATH`` parsed into a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found: it renders kustomize overlays offline "
                           "(apt-get install kubectl, or any kubectl >= 1.27)")
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_job_template(template: dict, overrides: dict | None = None) -> dict:
    """The Job manifest of a Prefect Kubernetes base job template with every ``{{ var }}``
    replaced by the variable's value (``overrides``, else its default). A key whose whole
    value is a placeholder without value is dropped, as Prefect does."""
    values = {name: prop.get("default")
              for name, prop in template["variables"]["properties"].items()}
    values.update(overrides or {})

    def sub(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                value = sub(value)
                if value is not None:
                    out[key] = value
            return out
        if isinstance(node, list):
            return [v for v in (sub(x) for x in node) if v is not None]
        if isinstance(node, str):
            whole = _PLACEHOLDER_RE.match(node)
            if whole:
                return values.get(whole.group(1))
            return _INLINE_PLACEHOLDER_RE.sub(lambda m: str(values.get(m.group(1)) or "x"), node)
        return node

    return sub(copy.deepcopy(template["job_configuration"]["job_manifest"]))


# --------------------------------------------------------------------------- schemas
def find_crd_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Directory holding the dask-kubernetes operator CRDs, or None."""
    candidates = [explicit, os.environ.get("QSMDASK_DASK_CRDS")]
    spec = importlib.util.find_spec("dask_kubernetes")  # does not import the package
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / CRD_SUBDIR for p in spec.submodule_search_locations]
    for c in candidates:
        if c and (Path(c) / "daskcluster.yaml").is_file():
            return Path(c)
    return None


def load_crd_schemas(crd_dir: Path, files=CRD_FILES) -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): openAPIV3Schema}`` from the CRD ``files`` in ``crd_dir``."""
    schemas = {}
    for path in (Path(crd_dir) / f for f in files):
        crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate_core(obj: dict, k8s_version: str) -> list[str]:
    """Strict schema validation of one core object; list of problems."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "<root>"
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def _as_pod(spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "embedded"}, "spec": spec}


def validate_custom(obj: dict, crd_schemas: dict | None, k8s_version: str) -> list[str]:
    """A Dask custom resource against its CRD schema (skipped when ``crd_schemas`` is None)
    and the pod and service specs embedded in a DaskCluster strictly as core objects (the
    CRD schema does not reject unknown fields, the core schemas do)."""
    problems = []
    if crd_schemas is not None:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in crd_schemas:
            return [f"no CRD schema for {key}"]
        validator = jsonschema.Draft7Validator(crd_schemas[key])
        problems += [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}"
                     for e in validator.iter_errors(obj)]
    if obj.get("kind") == "DaskCluster":
        spec = obj.get("spec", {})
        for role in ("scheduler", "worker"):
            pod_spec = spec.get(role, {}).get("spec")
            if pod_spec is not None:
                problems += [f"spec/{role}/spec as PodSpec: {p}"
                             for p in validate_core(_as_pod(pod_spec), k8s_version)]
        service = spec.get("scheduler", {}).get("service")
        if service is not None:
            svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "embedded"},
                   "spec": service}
            problems += [f"spec/scheduler/service as ServiceSpec: {p}"
                         for p in validate_core(svc, k8s_version)]
    return problems


# --------------------------------------------------------------------------- policy
def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodSpec) for every pod an object would create."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return [("spec/template/spec", spec["template"]["spec"])]
    if kind == "CronJob":
        return [("spec/jobTemplate/spec/template/spec", spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [("spec", spec)]
    if kind == "DaskCluster":
        return [(f"spec/{r}/spec", spec[r]["spec"]) for r in ("scheduler", "worker") if r in spec]
    if kind == "DaskWorkerGroup":
        return [("spec/worker/spec", spec["worker"]["spec"])]
    return []


def check_pod_security(pod: dict) -> list[str]:
    """Restricted-profile and qsmdask rules for one PodSpec; list of problems."""
    problems = []
    psc = pod.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        problems.append("securityContext.runAsNonRoot must be true")
    if psc.get("runAsUser") != RUN_AS_USER:
        problems.append(f"securityContext.runAsUser must be {RUN_AS_USER}")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("securityContext.seccompProfile.type must be RuntimeDefault")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{flag} must not be set")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        name = c.get("name", "?")
        csc = c.get("securityContext") or {}
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name}: allowPrivilegeEscalation must be false")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"container {name}: readOnlyRootFilesystem must be true")
        if csc.get("privileged"):
            problems.append(f"container {name}: privileged must not be set")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"container {name}: capabilities.drop must contain ALL")
        if (csc.get("capabilities") or {}).get("add"):
            problems.append(f"container {name}: capabilities.add must be empty")
        if "runAsUser" in csc and csc["runAsUser"] in (0, "0"):
            problems.append(f"container {name}: runAsUser 0")
        resources = c.get("resources") or {}
        for section in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if not (resources.get(section) or {}).get(res):
                    problems.append(f"container {name}: resources.{section}.{res} missing")
        tmp = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            problems.append(f"container {name}: /tmp must be an emptyDir mount "
                            "(the root filesystem is read-only)")
        for env in c.get("env") or []:
            if SECRET_NAME_RE.search(env.get("name", "")) and "value" in env:
                problems.append(f"container {name}: env {env['name']} is a literal; "
                                "take it from a Secret (valueFrom.secretKeyRef)")
    return problems


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(q) -> int:
    """Bytes of a Kubernetes memory quantity (``8Gi``, ``4G``, ``512Mi``, ``1000``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|M|G|T)?\s*", str(q))
    if not m:
        raise ValueError(f"not a memory quantity: {q!r}")
    return int(float(m.group(1)) * _QUANTITY[m.group(2) or ""])


def check_worker_memory_resource(obj: dict) -> list[str]:
    """Dask workers must declare ``--resources MEMORY=<bytes>`` within their memory limit
    (the participant flow's memory-aware scheduling; a worker without it runs no annotated task)."""
    if obj.get("kind") not in ("DaskCluster", "DaskWorkerGroup"):
        return []
    pod = (obj.get("spec") or {}).get("worker", {}).get("spec") or {}
    problems = []
    for c in pod.get("containers") or []:
        args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        name = c.get("name", "?")
        declared = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--resources"]
        memory = [int(r.split("=", 1)[1]) for d in declared for r in d.replace(",", " ").split()
                  if r.startswith("MEMORY=") and r.split("=", 1)[1].isdigit()]
        if not memory:
            problems.append(f"container {name}: worker args lack --resources MEMORY=<bytes>")
            continue
        limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        if limit is not None and memory[0] > parse_quantity(limit):
            problems.append(f"container {name}: MEMORY={memory[0]} exceeds the memory limit {limit}")
    return problems


def container_images(obj: dict) -> set[str]:
    return {c["image"] for _, pod in pod_specs(obj)
            for c in (pod.get("initContainers") or []) + (pod.get("containers") or [])}


# --------------------------------------------------------------------------- prefect
def flow_parameters(entrypoint: str, root: Path = REPO_DIR) -> list[str] | None:
    """Parameter names of the flow function named by ``path.py:function`` (parsed with
    ``ast``, not imported); None when the file does not exist yet."""
    file_part, func = entrypoint.rsplit(":", 1)
    path = root / file_part
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            a = node.args
            return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    raise ValueError(f"{entrypoint}: no function {func!r} in {path}")


def check_prefect_yaml(prefect: dict, *, work_pool: str, image: str | None,
                       root: Path = REPO_DIR) -> list[str]:
    """Coherence of a prefect.yaml with the manifests; list of problems."""
    from cronsim import CronSim, CronSimError
    from datetime import datetime, timezone

    problems = []
    deployments = prefect.get("deployments") or []
    if not deployments:
        problems.append("prefect.yaml declares no deployment")
    for dep in deployments:
        name = dep.get("name", "?")
        entry = dep.get("entrypoint", "")
        if not re.fullmatch(r"[\w./-]+\.py:\w+", entry):
            problems.append(f"{name}: entrypoint {entry!r} is not 'path.py:function'")
            continue
        try:
            params = flow_parameters(entry, root)
        except (ValueError, SyntaxError) as e:
            problems.append(f"{name}: {e}")
            params = None
        if params is not None:
            unknown = set(dep.get("parameters") or {}) - set(params)
            if unknown:
                problems.append(f"{name}: parameters {sorted(unknown)} not in the flow's "
                                f"signature {params}")
        schedules = dep.get("schedules") or []
        if not schedules:
            problems.append(f"{name}: no schedule")
        for s in schedules:
            if "cron" not in s:
                problems.append(f"{name}: schedule {s} has no cron")
                continue
            try:
                CronSim(s["cron"], datetime(2026, 1, 1, tzinfo=timezone.utc))
            except CronSimError as e:
                problems.append(f"{name}: invalid cron {s['cron']!r}: {e}")
        pool = dep.get("work_pool") or {}
        if pool.get("name") != work_pool:
            problems.append(f"{name}: work pool {pool.get('name')!r} != {work_pool!r} "
                            "(PREFECT_WORK_POOL of the ConfigMap)")
        dep_image = (pool.get("job_variables") or {}).get("image")
        if image is not None and dep_image != image:
            problems.append(f"{name}: job image {dep_image!r} != manifests' {image!r}")
    return problems


# --------------------------------------------------------------------------- driver
def validate_objects(objs: list[dict], *, crd_schemas: dict | None, k8s_version: str) -> list[str]:
    """Schema + policy problems of rendered objects, each prefixed with Kind/name.
    ``crd_schemas=None`` skips only the CRD-schema step of the Dask resources."""
    problems = []
    for obj in objs:
        label = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        api = obj.get("apiVersion", "")
        if api.startswith("kubernetes.dask.org/"):
            problems += [f"{label}: {p}" for p in validate_custom(obj, crd_schemas, k8s_version)]
        else:
            problems += [f"{label}: {p}" for p in validate_core(obj, k8s_version)]
        if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{label}: literal Secret in the manifests; create it out of band")
        for where, pod in pod_specs(obj):
            problems += [f"{label} {where}: {p}" for p in check_pod_security(pod)]
        problems += [f"{label} spec/worker/spec: {p}" for p in check_worker_memory_resource(obj)]
    return problems


def validate_all(overlays=OVERLAYS, *, k8s_version=K8S_VERSION, crd_dir=None,
                 out_dir: Path | None = None, log=print) -> list[str]:
    crd = find_crd_dir(crd_dir)
    crd_schemas = load_crd_schemas(crd) if crd else None
    log(f"kubernetes {k8s_version}; dask CRDs: {crd or 'NOT FOUND'}")
    problems: list[str] = []
    if crd_schemas is None:
        problems.append("dask-kubernetes CRD schemas not found (--crd-dir, $QSMDASK_DASK_CRDS, "
                        "or `pip install --no-deps --target DIR dask-kubernetes`)")
    images: set[str] = set()
    configmaps: dict[str, dict] = {}
    for overlay in overlays:
        objs = render_overlay(DEPLOY_DIR / "overlays" / overlay)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))
        found = validate_objects(objs, crd_schemas=crd_schemas, k8s_version=k8s_version)
        log(f"overlay {overlay}: {len(objs)} objects "
            f"({', '.join(sorted({o['kind'] for o in objs}))}): "
            f"{'OK' if not found else f'{len(found)} problem(s)'}")
        problems += [f"[{overlay}] {p}" for p in found]
        for o in objs:
            images |= container_images(o)
            if o["kind"] == "ConfigMap":
                configmaps[overlay] = o["data"]

    template = json.loads((DEPLOY_DIR / "prefect" / "base-job-template.json").read_text())
    # the worker splits `command` into a list (shlex) before it lands in the manifest
    job = render_job_template(template, {"name": "cohort-run",
                                         "command": ["prefect", "flow-run", "execute"]})
    # the API server names it from generateName; tools that key objects by name need one
    job["metadata"].setdefault("name", job["metadata"].get("generateName", "job-") + "example")
    if out_dir is not None:
        (out_dir / "flow-run-job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    found = validate_core(job, k8s_version) + [
        f"{w}: {p}" for w, pod in pod_specs(job) for p in check_pod_security(pod)]
    job_image = template["variables"]["properties"]["image"].get("default")
    images.add(job_image)
    log(f"work-pool base job template: {'OK' if not found else f'{len(found)} problem(s)'}")
    problems += [f"[base-job-template] {p}" for p in found]

    prefect = yaml.safe_load((DEPLOY_DIR / "prefect" / "prefect.yaml").read_text())
    pools = {cm.get("PREFECT_WORK_POOL") for cm in configmaps.values()}
    if len(images) != 1:
        problems.append(f"image references differ: {sorted(images)}")
    if len(pools) != 1:
        problems.append(f"PREFECT_WORK_POOL differs between overlays: {sorted(map(str, pools))}")
    found = check_prefect_yaml(prefect, work_pool=next(iter(pools)), image=job_image)
    log(f"prefect.yaml: {'OK' if not found else f'{len(found)} problem(s)'}")
    problems += [f"[prefect.yaml] {p}" for p in found]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--overlay", action="append", choices=OVERLAYS,
                   help="overlay to check (repeatable; default: all)")
    p.add_argument("--k8s-version", default=K8S_VERSION)
    p.add_argument("--crd-dir", help="directory with the dask-kubernetes CRD yaml files")
    p.add_argument("--out", type=Path, help="also write the rendered manifests here")
    args = p.parse_args(argv)
    problems = validate_all(args.overlay or OVERLAYS, k8s_version=args.k8s_version,
                            crd_dir=args.crd_dir, out_dir=args.out)
    for prob in problems:
        print("FAIL", prob)
    print("manifests: " + ("all valid" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
