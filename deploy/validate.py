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
  with /tmp on an emptyDir, and requests (not above their limits) and limits CPU and memory;
  valid label keys and values; no Secret objects and no literal credentials;
* the flow-run Job as prefect-kubernetes' own worker code renders it (deploy/render_job.py):
  it executes ``prefect flow-run execute`` through the image's ENTRYPOINT, carries the API
  key and auth string only as Secret references, has an activeDeadlineSeconds above the
  flow timeout, and is not evicted by the autoscaler;
* wiring: Deployment/StatefulSet selectors match their templates; every Service, PDB and
  the Dask scheduler Service select a pod; every claimed PVC exists; the Prefect API URL and
  the Dask address resolve to a Service of the deployment; the NetworkPolicies allow every
  connection qsmdask needs (both directions, DNS to kube-dns and NodeLocal DNS) and keep
  the token-holding worker away from anything but the API server;
* Dask: ``--resources MEMORY=<bytes>`` (through the ConfigMap) at least 1 GiB below the
  worker's memory limit and equal to QSMDASK_WORKER_MEMORY, one ITK thread, HTTP health
  probes and a no-evict annotation on the scheduler; the Prefect worker's liveness probe has
  its health server (``--with-healthcheck``);
* storage: namespace and volumes live in deploy/storage, not in the application, on a
  storage class with ``reclaimPolicy: Retain``;
* one qsmdask image reference across manifests, job template and prefect.yaml, every image
  pinned by tag or digest; the Prefect deployment's entrypoint, parameters, cron schedule
  and work pool are coherent.

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
            if SECRET_NAME_RE.search(env.get("name", "")) and "value" in env \
                    and not re.search(r"_SECRET_(NAME|KEY)$", env["name"]):  # names of Secrets, not values
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


# --------------------------------------------------------------------------- object checks
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MEMORY_HEADROOM_BYTES = 2**30  # Dask MEMORY at least this far below the worker's memory limit
# labels the dask-kubernetes operator adds to the pods it creates (and selects them by)
DASK_OPERATOR_LABELS = {"scheduler": {"dask.org/component": "scheduler"},
                        "worker": {"dask.org/component": "worker", "dask.org/workergroup-name": "default"}}


def label_problems(labels: dict | None, where: str) -> list[str]:
    """Kubernetes label syntax: ``[prefix/]name`` keys, values of <= 63 [A-Za-z0-9-_.]."""
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix))) \
                or len(name) > 63 or not _LABEL_NAME_RE.match(name):
            problems.append(f"{where}: invalid label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            problems.append(f"{where}: invalid label value {key}={value!r}")
    return problems


def _label_maps(obj: dict) -> list[tuple[str, dict]]:
    """(where, labels or selector map) of every label map of an object."""
    out = [("metadata.labels", (obj.get("metadata") or {}).get("labels"))]
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "PodDisruptionBudget"):
        out.append(("spec.selector.matchLabels", (spec.get("selector") or {}).get("matchLabels")))
    if "template" in spec:
        out.append(("spec.template.metadata.labels", (spec["template"].get("metadata") or {}).get("labels")))
    if kind == "Service":
        out.append(("spec.selector", spec.get("selector")))
    if kind == "DaskCluster":
        for role in ("scheduler", "worker"):
            out.append((f"spec.{role}.metadata.labels", (spec.get(role, {}).get("metadata") or {}).get("labels")))
        out.append(("spec.scheduler.service.selector", (spec.get("scheduler", {}).get("service") or {}).get("selector")))
    return [(w, m) for w, m in out if m]


def check_labels(obj: dict) -> list[str]:
    return [p for where, labels in _label_maps(obj) for p in label_problems(labels, where)]


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def parse_cpu(q) -> float:
    m = _CPU.fullmatch(str(q).strip())
    if not m:
        raise ValueError(f"not a CPU quantity: {q!r}")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def check_requests_within_limits(pod: dict) -> list[str]:
    problems = []
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        for name in set(req) & set(lim):
            parse = parse_cpu if name == "cpu" else parse_quantity
            try:
                if parse(req[name]) > parse(lim[name]):
                    problems.append(f"container {c.get('name')}: {name} request {req[name]} exceeds "
                                    f"its limit {lim[name]}")
            except ValueError as e:
                problems.append(f"container {c.get('name')}: {e}")
    return problems


def pods_of(objs: list[dict]) -> list[dict]:
    """Every pod the objects would create: {owner, role, namespace, labels, spec}, with the
    labels the Dask operator adds to its pods."""
    out = []
    for obj in objs:
        meta, spec, kind = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("kind")
        ns = meta.get("namespace", "default")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            labels = dict((spec["template"].get("metadata") or {}).get("labels") or {})
            out.append({"owner": f"{kind}/{meta.get('name')}", "namespace": ns, "labels": labels,
                        "spec": spec["template"]["spec"]})
        elif kind == "DaskCluster":
            for role in ("scheduler", "worker"):
                if role in spec:
                    labels = dict((spec[role].get("metadata") or {}).get("labels") or {})
                    labels.update({"dask.org/cluster-name": meta.get("name"), **DASK_OPERATOR_LABELS[role]})
                    out.append({"owner": f"DaskCluster/{meta.get('name')} {role}", "namespace": ns,
                                "labels": labels, "spec": spec[role]["spec"]})
    return out


def _matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a plain map against labels."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_selectors(objs: list[dict], pods: list[dict]) -> list[str]:
    """Workload selectors match their own template; Services and PodDisruptionBudgets
    select at least one pod of the deployment."""
    problems = []
    for obj in objs:
        kind, name, spec = obj.get("kind"), obj["metadata"].get("name"), obj.get("spec") or {}
        label = f"{kind}/{name}"
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            tpl = (spec["template"].get("metadata") or {}).get("labels") or {}
            if not _matches(spec.get("selector"), tpl):
                problems.append(f"{label}: spec.selector does not match its pod template labels {tpl}")
        if kind == "Service" and spec.get("selector"):
            if not any(_matches(spec["selector"], p["labels"]) for p in pods):
                problems.append(f"{label}: selector {spec['selector']} matches no pod of the deployment")
        if kind == "PodDisruptionBudget":
            if not any(_matches(spec.get("selector"), p["labels"]) for p in pods):
                problems.append(f"{label}: selector matches no pod of the deployment")
        if kind == "DaskCluster":
            sel = ((spec.get("scheduler") or {}).get("service") or {}).get("selector")
            sched = [p for p in pods if p["owner"] == f"DaskCluster/{name} scheduler"]
            if sel and not any(_matches(sel, p["labels"]) for p in sched):
                problems.append(f"{label}: spec.scheduler.service.selector {sel} does not select the "
                                f"scheduler pod {sched[0]['labels'] if sched else {}}")
    return problems


def check_volumes(pods: list[dict], pvcs: set[str]) -> list[str]:
    """Every claim a pod mounts exists; every volumeMount names a volume of its pod."""
    problems = []
    for p in pods:
        vols = {v["name"]: v for v in p["spec"].get("volumes") or []}
        for v in vols.values():
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim is not None and claim not in pvcs:
                problems.append(f"{p['owner']}: volume {v['name']} claims {claim!r}, which is not a "
                                f"PersistentVolumeClaim of the deployment {sorted(pvcs)}")
        templates = {t["metadata"]["name"] for t in p.get("claim_templates", [])}
        for c in p["spec"].get("containers") or []:
            for m in c.get("volumeMounts") or []:
                if m["name"] not in vols and m["name"] not in templates:
                    problems.append(f"{p['owner']}: container {c['name']} mounts unknown volume {m['name']!r}")
    return problems


def effective_argv(container: dict, image_entrypoint: list[str]) -> list[str]:
    """What the container executes: ``command`` replaces the image ENTRYPOINT, ``args``
    follow it (Kubernetes semantics)."""
    command = container.get("command") or image_entrypoint
    return [str(x) for x in command + (container.get("args") or [])]


def dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.M)
    return json.loads(found[-1]) if found else []


def check_flow_run_job(job: dict, *, entrypoint: list[str], secret_values: list[str],
                       flow_timeout_s: float | None) -> list[str]:
    """The Job the Prefect worker creates: runs ``prefect flow-run execute``, carries no
    credential as a literal, ends by itself."""
    problems = []
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    argv = effective_argv(c, entrypoint)
    run = argv[1:] if argv and argv[0] in ("env", "/usr/bin/env") else argv
    if run[:3] != ["prefect", "flow-run", "execute"]:
        problems.append(f"flow-run container executes {' '.join(argv)!r}, not `prefect flow-run "
                        f"execute` (image ENTRYPOINT {entrypoint}, command {c.get('command')}, "
                        f"args {c.get('args')})")
    text = json.dumps(job)
    for value in secret_values:
        if value and value in text:
            problems.append("a credential of the worker is copied into the Job as a literal value")
    for env in c.get("env") or []:
        if env["name"] in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING") and "valueFrom" not in env:
            problems.append(f"env {env['name']} is a literal in the Job, not a secretKeyRef")
    deadline = job["spec"].get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or deadline <= 0:
        problems.append("the Job has no activeDeadlineSeconds: a hung run holds the concurrency slot forever")
    elif flow_timeout_s is not None and flow_timeout_s >= deadline:
        problems.append(f"flow timeout {flow_timeout_s} s is not below the Job's activeDeadlineSeconds {deadline}")
    if flow_timeout_s is None:
        problems.append("QSMDASK_FLOW_TIMEOUT_S is not set in the ConfigMap")
    ann = (job["spec"]["template"].get("metadata") or {}).get("annotations") or {}
    if ann.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
        problems.append("flow-run pod lacks the annotation cluster-autoscaler.kubernetes.io/safe-to-evict: 'false'")
    return problems


def check_prefect_worker(objs: list[dict]) -> list[str]:
    """The worker's health probe needs its health server; Jobs get credentials by reference."""
    problems = []
    for obj in objs:
        if obj.get("kind") != "Deployment":
            continue
        for c in obj["spec"]["template"]["spec"].get("containers") or []:
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            if argv[:3] != ["prefect", "worker", "start"]:
                continue
            probe = (c.get("livenessProbe") or {}).get("httpGet")
            if probe and "--with-healthcheck" not in argv:
                problems.append(f"Deployment/{obj['metadata']['name']}: liveness probe on "
                                f"{probe.get('path')} but the worker runs without --with-healthcheck "
                                "(no health server: the probe kills it in a loop)")
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            if probe:
                port = probe.get("port")
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
                number = ports.get(port, port)
                if str(env.get("PREFECT_WORKER_WEBSERVER_PORT", "8080")) != str(number):
                    problems.append(f"Deployment/{obj['metadata']['name']}: probe port {port} != "
                                    "PREFECT_WORKER_WEBSERVER_PORT")
            for var in ("API_KEY_SECRET_NAME", "API_KEY_SECRET_KEY", "API_AUTH_STRING_SECRET_NAME",
                        "API_AUTH_STRING_SECRET_KEY"):
                if not env.get(f"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_{var}"):
                    problems.append(f"Deployment/{obj['metadata']['name']}: PREFECT_INTEGRATIONS_KUBERNETES_"
                                    f"WORKER_{var} unset: the worker copies its credential into every Job")
    return problems


def _configmap(objs, name="qsmdask-config") -> dict:
    found = [o for o in objs if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name]
    return (found[0].get("data") or {}) if found else {}


def _expand(value: str, env: dict) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), m.group(0))), str(value))


def check_dask(objs: list[dict]) -> list[str]:
    """Dask pods: MEMORY with headroom, one ITK thread, HTTP health probes on the scheduler,
    a flow-side capacity for when the cluster has no worker."""
    problems = []
    cm = _configmap(objs)
    for obj in objs:
        if obj.get("kind") != "DaskCluster":
            continue
        label = f"DaskCluster/{obj['metadata']['name']}"
        spec = obj["spec"]
        for c in spec["worker"]["spec"].get("containers") or []:
            env = dict(cm, DASK_WORKER_NAME="worker-0", DASK_SCHEDULER_ADDRESS="tcp://scheduler:8786")
            env.update({e["name"]: e["value"] for e in c.get("env") or [] if "value" in e})
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("resourceFieldRef")
                if ref:
                    env[e["name"]] = str(_render_job().resource_value(c, ref))
            if env.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") != "1":
                problems.append(f"{label} worker: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS must be '1' "
                                "(registration reproducibility)")
            args = [_expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
            if any("$(" in a for a in args):
                problems.append(f"{label} worker: unresolved variable in args {args}")
            declared = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--resources"]
            memory = [r.split("=", 1)[1] for d in declared for r in d.replace(",", " ").split()
                      if r.startswith("MEMORY=")]
            if not memory or not memory[0].isdigit():
                problems.append(f"{label} worker: args lack --resources MEMORY=<bytes>")
                continue
            limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
            dask_limit = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--memory-limit"]
            if limit is not None and dask_limit != [str(parse_quantity(limit))]:
                problems.append(f"{label} worker: --memory-limit {dask_limit} is not the container's memory "
                                f"limit {limit} in bytes (Dask would pause/restart the worker elsewhere)")
            if limit is not None and int(memory[0]) > parse_quantity(limit) - MEMORY_HEADROOM_BYTES:
                problems.append(f"{label} worker: MEMORY={memory[0]} leaves less than "
                                f"{MEMORY_HEADROOM_BYTES >> 20} MiB of the memory limit {limit} to the worker")
            fallback = cm.get("QSMDASK_WORKER_MEMORY")
            if fallback != memory[0]:
                problems.append(f"{label} worker: ConfigMap QSMDASK_WORKER_MEMORY={fallback} != MEMORY="
                                f"{memory[0]}: flow runs that start with zero workers annotate tasks wrongly")
        for c in spec["scheduler"]["spec"].get("containers") or []:
            for probe in ("readinessProbe", "livenessProbe"):
                get = (c.get(probe) or {}).get("httpGet") or {}
                if get.get("path") != "/health":
                    problems.append(f"{label} scheduler: {probe} must be httpGet /health")
        ann = (spec["scheduler"].get("metadata") or {}).get("annotations") or {}
        if ann.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
            problems.append(f"{label} scheduler: annotation cluster-autoscaler.kubernetes.io/safe-to-evict "
                            "must be 'false'")
    return problems


def _service_pods(svc: dict, pods: list[dict]) -> list[dict]:
    ns = svc["metadata"].get("namespace", "default")
    return [p for p in pods if p["namespace"] == ns and _matches(svc["spec"].get("selector"), p["labels"])]


def _target_port(svc_port: dict, pod: dict) -> int | None:
    target = svc_port.get("targetPort", svc_port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for c in pod["spec"].get("containers") or []:
        for port in c.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


def resolve_cluster_url(url: str, objs: list[dict], pods: list[dict]):
    """``(problem, [(pod, port)])`` for an in-cluster URL ``scheme://svc.ns.svc...:port``;
    ``(None, None)`` for an address outside the cluster."""
    m = re.match(r"^[a-z]+://([^/:]+)(?::(\d+))?", url)
    if not m:
        return f"cannot parse {url!r}", []
    host, port = m.group(1), int(m.group(2) or (443 if url.startswith("https") else 80))
    parts = host.split(".")
    if not (host.endswith(".svc") or ".svc." in host):
        return None, None
    name, ns = parts[0], parts[1] if len(parts) > 1 else "default"
    services = {(o["metadata"]["name"], o["metadata"].get("namespace")): o for o in objs if o.get("kind") == "Service"}
    # Services the Dask operator makes: <cluster>-scheduler, selecting the scheduler pod
    for o in objs:
        if o.get("kind") == "DaskCluster":
            svc = copy.deepcopy(o["spec"]["scheduler"]["service"])
            services[(f"{o['metadata']['name']}-scheduler", o["metadata"].get("namespace"))] = {
                "metadata": {"name": f"{o['metadata']['name']}-scheduler",
                             "namespace": o["metadata"].get("namespace")}, "spec": svc}
    svc = services.get((name, ns))
    if svc is None:
        return (f"{url}: no Service {name!r} in namespace {ns!r} (Services: "
                f"{sorted(f'{n}.{s}' for n, s in services)})"), []
    ports = [p for p in svc["spec"].get("ports") or [] if p["port"] == port]
    if not ports:
        return f"{url}: Service {name} has no port {port}", []
    targets = _service_pods(svc, pods)
    if not targets:
        return f"{url}: Service {name} selects no pod", []
    return None, [(p, _target_port(ports[0], p)) for p in targets]


# ----------------------------------------------------------------- network policy evaluation
def _policy_types(policy: dict) -> set[str]:
    types = policy["spec"].get("policyTypes")
    if types:
        return set(types)
    return {"Ingress"} | ({"Egress"} if "egress" in policy["spec"] else set())


def _peer_matches(peer: dict, other: dict, policy_ns: str) -> bool:
    """``other``: {"namespace", "labels"} for a pod, {"ip"} for an address."""
    import ipaddress

    if "ipBlock" in peer:
        if "ip" not in other:
            return False  # pod addresses are cluster-internal: policies select pods by label
        ip = ipaddress.ip_address(other["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    if "ip" in other:
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None and other["namespace"] != policy_ns:
        return False
    if ns_sel is not None and not _matches(ns_sel, {"kubernetes.io/metadata.name": other["namespace"]}):
        return False
    return pod_sel is None or _matches(pod_sel, other["labels"])


def _port_matches(ports: list | None, port: int, proto: str, named: dict) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != proto:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str) and not want.isdigit():
            if named.get(want) == port:
                return True
            continue
        if int(want) <= port <= int(p.get("endPort", want)):
            return True
    return False


def connection_allowed(policies: list[dict], src: dict, dst: dict, port: int, proto: str = "TCP") -> bool:
    """Whether the NetworkPolicies let ``src`` open ``port``/``proto`` to ``dst`` (both sides:
    the source's egress and the destination's ingress). Pods: {"namespace", "labels",
    "ports": {name: number}}; outside addresses: {"ip"}."""
    for side, me, peer_obj, direction, key in (("egress", src, dst, "Egress", "to"),
                                               ("ingress", dst, src, "Ingress", "from")):
        if "ip" in me:
            continue  # no policy governs an address outside the cluster
        selecting = [p for p in policies if p["metadata"].get("namespace", "default") == me["namespace"]
                     and direction in _policy_types(p) and _matches(p["spec"].get("podSelector") or {}, me["labels"])]
        if not selecting:
            continue
        named = dst.get("ports", {})
        if not any((not rule.get(key) or any(_peer_matches(peer, peer_obj, pol["metadata"].get("namespace", "default"))
                                            for peer in rule[key]))
                   and _port_matches(rule.get("ports"), port, proto, named)
                   for pol in selecting for rule in pol["spec"].get(side) or []):
            return False
    return True


def check_network(objs: list[dict], pods: list[dict]) -> list[str]:
    """Every connection qsmdask needs is allowed by the NetworkPolicies; the pod holding a
    Kubernetes API token reaches nothing beyond the API server."""
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    if not policies:
        return []
    def by_component(name):
        return [p for p in pods if p["labels"].get("app.kubernetes.io/component") == name]
    def node(p):
        ports = {port.get("name"): port["containerPort"] for c in p["spec"].get("containers") or []
                 for port in c.get("ports") or []}
        return {"namespace": p["namespace"], "labels": p["labels"], "ports": ports}
    problems = []
    cm = _configmap(objs)
    need = []  # (description, src pods, dst node, port, proto)
    problem, api = resolve_cluster_url(cm.get("PREFECT_API_URL", ""), objs, pods)
    if problem:
        problems.append(f"PREFECT_API_URL: {problem}")
    clients = [p for c in ("prefect-worker", "flow-run", "dask-scheduler", "dask-worker") for p in by_component(c)]
    if api:
        need += [("Prefect API", clients, node(p), port, "TCP") for p, port in api]
    elif api is None:  # outside the cluster (e.g. Prefect Cloud): HTTPS
        need.append(("Prefect API (external)", clients, {"ip": "203.0.113.20"}, 443, "TCP"))
    problem, sched = resolve_cluster_url(cm.get("QSMDASK_DASK_ADDRESS", "").replace("tcp://", "tcp://"), objs, pods)
    if problem:
        problems.append(f"QSMDASK_DASK_ADDRESS: {problem}")
    for p, port in sched or []:
        need.append(("Dask scheduler", by_component("flow-run") + by_component("dask-worker"), node(p), port, "TCP"))
    for w in by_component("dask-worker"):
        need.append(("Dask worker (ephemeral port)", by_component("dask-scheduler") + by_component("dask-worker")
                     + by_component("flow-run"), node(w), 40123, "TCP"))
    for db in by_component("prefect-db"):
        need.append(("Prefect database", by_component("prefect-server"), node(db), 5432, "TCP"))
    operator = {"namespace": "dask-operator", "labels": {"app.kubernetes.io/name": "dask-kubernetes-operator"}}
    for s in by_component("dask-scheduler"):
        if not connection_allowed(policies, operator, node(s), 8786):
            problems.append("NetworkPolicy: the dask-kubernetes operator cannot reach the scheduler on 8786")
    kube_dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}, "ports": {}}
    node_local_dns = {"ip": "169.254.20.10"}
    for p in pods:
        for dns, what in ((kube_dns, "kube-dns pods"), (node_local_dns, "a NodeLocal DNS cache (169.254.20.10)")):
            if not connection_allowed(policies, node(p), dns, 53, "UDP"):
                problems.append(f"NetworkPolicy: {p['owner']} cannot resolve names through {what} (UDP 53)")
    for what, srcs, dst, port, proto in need:
        if not srcs:
            problems.append(f"no pod of the deployment uses the {what}")
        for s in srcs:
            if not connection_allowed(policies, node(s), dst, port, proto):
                problems.append(f"NetworkPolicy: {s['owner']} cannot reach the {what} on {proto} {port}")
    for p in pods:  # API tokens: only the Prefect worker, and it reaches only the API server
        sa_automount = p["spec"].get("automountServiceAccountToken")
        if sa_automount is not False and p["labels"].get("app.kubernetes.io/component") != "prefect-worker":
            problems.append(f"{p['owner']}: mounts a service-account token (automountServiceAccountToken)")
    for w in by_component("prefect-worker"):
        if connection_allowed(policies, node(w), {"ip": "203.0.113.99"}, 443):
            problems.append("NetworkPolicy: the Prefect worker (it holds an API token) may reach any "
                            "address on 443; allow only the API server")
    return problems


def check_storage(app: list[dict], storage: list[dict]) -> list[str]:
    """Data outlives the application: namespace and volumes are not in the app kustomization,
    and every volume's storage class retains its data."""
    problems = []
    for o in app:
        if o.get("kind") in ("Namespace", "PersistentVolumeClaim", "StorageClass", "PersistentVolume"):
            problems.append(f"{o['kind']}/{o['metadata']['name']} is in the application kustomization: "
                            "`kubectl delete -k` of the application would delete it (move it to deploy/storage)")
    classes = {o["metadata"]["name"]: o for o in storage if o.get("kind") == "StorageClass"}
    claims = [o for o in storage if o.get("kind") == "PersistentVolumeClaim"]
    claims += [dict(t, kind="volumeClaimTemplate") for o in app if o.get("kind") == "StatefulSet"
               for t in o["spec"].get("volumeClaimTemplates") or []]
    for c in claims:
        sc = (c.get("spec") or {}).get("storageClassName")
        if sc not in classes or classes[sc].get("reclaimPolicy") != "Retain":
            problems.append(f"{c['kind']}/{c['metadata']['name']}: storage class {sc!r} is not a Retain "
                            f"class of deploy/storage ({sorted(classes)})")
    return problems


_IMAGE_RE = re.compile(r"^[\w.-]+(?::\d+)?(/[\w.-]+)+(:[\w.-]+|@sha256:[0-9a-f]{64})$")


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
            problems += [f"{label} {where}: {p}" for p in check_pod_security(pod) + check_requests_within_limits(pod)]
        problems += [f"{label}: {p}" for p in check_labels(obj)]
    return problems


# fake credentials the worker pod gets in the render: none may reach the Job as a literal
RENDER_SECRETS = {("qsmdask-prefect-api", "PREFECT_API_KEY"): "pnu_render_check_api_key_0000",
                  ("qsmdask-prefect-api", "PREFECT_API_AUTH_STRING"): "admin:render-check-auth-0000"}
_JOB_CACHE: dict[str, dict] = {}


def _render_job():
    sys.path.insert(0, str(DEPLOY_DIR))
    try:
        import render_job
    finally:
        sys.path.remove(str(DEPLOY_DIR))
    return render_job


def render_flow_run_job(objs: list[dict], template_path: Path, prefect_yaml: Path) -> dict:
    """The flow-run Job from prefect-kubernetes' own code (deploy/render_job.py, run in its
    own process since Prefect reads the worker's environment at import); cached on its inputs."""
    import hashlib
    import tempfile

    render_job = _render_job()
    # the render reads only the worker pod's environment, the template and the job variables
    worker_env = render_job.worker_environment(objs, RENDER_SECRETS)
    key = hashlib.sha256(json.dumps(
        [worker_env, template_path.read_text(), prefect_yaml.read_text()], sort_keys=True).encode()).hexdigest()
    if key not in _JOB_CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            manifests = Path(tmp) / "manifests.yaml"
            manifests.write_text(yaml.safe_dump_all(objs))
            cmd = [sys.executable, str(DEPLOY_DIR / "render_job.py"), "--manifests", str(manifests),
                   "--template", str(template_path), "--prefect-yaml", str(prefect_yaml),
                   "--flow-run-id", "00000000-0000-4000-8000-000000000001"]
            cmd += [f"--secret={n}/{k}={v}" for (n, k), v in RENDER_SECRETS.items()]
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"rendering the flow-run Job failed:\n{res.stderr[-3000:]}")
            _JOB_CACHE[key] = json.loads(res.stdout)
    return copy.deepcopy(_JOB_CACHE[key])


def site_paths(deploy_dir: Path, site: str) -> tuple[Path, Path]:
    return deploy_dir / "overlays" / site, deploy_dir / "storage" / "overlays" / site


def validate_site(site: str, *, deploy_dir: Path = DEPLOY_DIR, k8s_version: str = K8S_VERSION,
                  crd_schemas: dict | None, out_dir: Path | None = None, log=print) -> list[str]:
    """Every check of one site (application overlay + storage overlay + the flow-run Job)."""
    app_dir, storage_dir = site_paths(deploy_dir, site)
    app, storage = render_overlay(app_dir), render_overlay(storage_dir)
    template_path = deploy_dir / "prefect" / "base-job-template.json"
    prefect_path = deploy_dir / "prefect" / "prefect.yaml"
    job = render_flow_run_job(app + storage, template_path, prefect_path)
    job["metadata"].setdefault("name", job["metadata"].get("generateName", "job-") + "example")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{site}.yaml").write_text(yaml.safe_dump_all(app, sort_keys=False))
        (out_dir / f"storage-{site}.yaml").write_text(yaml.safe_dump_all(storage, sort_keys=False))
        (out_dir / f"flow-run-job-{site}.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    objs = app + storage
    problems = validate_objects(objs + [job], crd_schemas=crd_schemas, k8s_version=k8s_version)
    pods = pods_of(objs + [job])
    for o in app:
        if o.get("kind") == "StatefulSet":
            for p in pods:
                if p["owner"] == f"StatefulSet/{o['metadata']['name']}":
                    p["claim_templates"] = o["spec"].get("volumeClaimTemplates") or []
    pvcs = {o["metadata"]["name"] for o in objs if o.get("kind") == "PersistentVolumeClaim"}
    cm = _configmap(objs)
    timeout = cm.get("QSMDASK_FLOW_TIMEOUT_S")
    problems += check_selectors(objs, pods)
    problems += check_volumes(pods, pvcs)
    problems += check_prefect_worker(app)
    problems += check_dask(app)
    problems += check_network(objs, pods)
    problems += check_storage(app, storage)
    problems += [f"flow-run Job: {p}" for p in check_flow_run_job(
        job, entrypoint=dockerfile_entrypoint(deploy_dir.parent / "Dockerfile"),
        secret_values=list(RENDER_SECRETS.values()),
        flow_timeout_s=float(timeout) if timeout else None)]
    images = set()
    for o in objs + [job]:
        images |= container_images(o)
    for image in sorted(images):
        if not _IMAGE_RE.match(image):
            problems.append(f"image {image!r} is not pinned (registry/name:tag or @sha256:digest)")
    log(f"site {site}: {len(app)} application objects, {len(storage)} storage objects, flow-run Job: "
        f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return problems


def qsmdask_images(objs: list[dict]) -> set[str]:
    return {i for o in objs for i in container_images(o) if "postgres" not in i.rsplit("/", 1)[-1]}


def validate_all(overlays=OVERLAYS, *, k8s_version=K8S_VERSION, crd_dir=None, deploy_dir: Path = DEPLOY_DIR,
                 out_dir: Path | None = None, log=print) -> list[str]:
    crd = find_crd_dir(crd_dir)
    crd_schemas = load_crd_schemas(crd) if crd else None
    log(f"kubernetes {k8s_version}; dask CRDs: {crd or 'NOT FOUND'}")
    problems: list[str] = []
    if crd_schemas is None:
        problems.append("dask-kubernetes CRD schemas not found (--crd-dir, $QSMDASK_DASK_CRDS, "
                        "or `pip install --no-deps --target DIR dask-kubernetes`)")
    images: set[str] = set()
    pools = set()
    for site in overlays:
        problems += [f"[{site}] {p}" for p in validate_site(
            site, deploy_dir=deploy_dir, k8s_version=k8s_version, crd_schemas=crd_schemas,
            out_dir=out_dir, log=log)]
        app = render_overlay(site_paths(deploy_dir, site)[0])
        images |= qsmdask_images(app)
        pools.add(_configmap(app).get("PREFECT_WORK_POOL"))

    template = json.loads((deploy_dir / "prefect" / "base-job-template.json").read_text())
    job_image = template["variables"]["properties"]["image"].get("default")
    images.add(job_image)
    prefect = yaml.safe_load((deploy_dir / "prefect" / "prefect.yaml").read_text())
    if len(images) != 1:
        problems.append(f"qsmdask image references differ: {sorted(images)}")
    if len(pools) != 1:
        problems.append(f"PREFECT_WORK_POOL differs between overlays: {sorted(map(str, pools))}")
    found = check_prefect_yaml(prefect, work_pool=next(iter(pools)), image=job_image, root=deploy_dir.parent)
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
