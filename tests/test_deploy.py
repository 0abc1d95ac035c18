"""Offline checks of the container image recipe and the Kubernetes deployment (deploy/).

Rendering needs ``kubectl`` (kustomize), schema checks need ``kubernetes-validate``; the
Dask CRD schemas come from an installed ``dask_kubernetes`` or ``$QSMDASK_DASK_CRDS``.
Each test skips cleanly when its tool is absent. No cluster, no network, no Docker.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _load_validate():
    spec = importlib.util.spec_from_file_location("qsmdask_deploy_validate", DEPLOY / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_validate()
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
needs_kv = pytest.mark.skipif(importlib.util.find_spec("kubernetes_validate") is None,
                              reason="kubernetes-validate not installed")


@pytest.fixture(scope="module")
def rendered():
    """{site: application objects + storage objects}."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    return {o: V.render_overlay(DEPLOY / "overlays" / o) + V.render_overlay(DEPLOY / "storage" / "overlays" / o)
            for o in V.OVERLAYS}


@pytest.fixture(scope="module")
def flow_run_job(rendered):
    """The dev site's flow-run Job, rendered by prefect-kubernetes' own worker code."""
    if importlib.util.find_spec("prefect_kubernetes") is None:
        pytest.skip("prefect-kubernetes not installed")
    return V.render_flow_run_job(rendered["dev"], DEPLOY / "prefect" / "base-job-template.json",
                                 DEPLOY / "prefect" / "prefect.yaml")


@pytest.fixture(scope="module")
def crd_schemas():
    crd_dir = V.find_crd_dir()
    if crd_dir is None:
        pytest.skip("dask-kubernetes CRDs not found (set QSMDASK_DASK_CRDS)")
    return V.load_crd_schemas(crd_dir)


@pytest.fixture(scope="module")
def crd_schemas_or_none():
    """The Dask CRD schemas when available; None skips only that schema step (CI's test step
    runs before .ci/docker.sh fetches them)."""
    crd_dir = V.find_crd_dir()
    return V.load_crd_schemas(crd_dir) if crd_dir else None


@pytest.fixture(scope="module")
def job_template():
    return json.loads((DEPLOY / "prefect" / "base-job-template.json").read_text())


def _one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


# --------------------------------------------------------------------------- image recipe
def _constraints():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_constraints_pin_every_runtime_dependency_within_its_range():
    pins = _constraints()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])
    # the Prefect Kubernetes worker runs from the same image
    assert "prefect-kubernetes" in pins
    # known-bad versions for prefect 3.8 (docs: ENGINEERING.md)
    assert tuple(map(int, pins["fastapi"].split(".")[:2])) < (0, 151)
    assert tuple(map(int, pins["sqlalchemy"].split(".")[:2])) < (2, 1)


def _stages(dockerfile: str):
    """[(from_line, [instructions])] with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")))
    stages, preamble = [], []
    for ln in filter(None, (x.strip() for x in text.splitlines())):
        if ln.upper().startswith("FROM "):
            stages.append((ln, []))
        elif stages:
            stages[-1][1].append(ln)
        else:
            preamble.append(ln)
    return preamble, stages


def test_dockerfile_contract():
    raw = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", raw, re.M), "a # syntax= line pulls a frontend image"
    preamble, stages = _stages(raw)
    assert "ARG BASE_IMAGE=python:3.11-slim" in preamble
    assert len(stages) >= 2 and all("${BASE_IMAGE}" in f for f, _ in stages)
    final_from, final = stages[-1]
    joined = "\n".join(final)
    assert any(i.startswith("COPY --from=builder /opt/venv") for i in final)
    assert 'ENTRYPOINT ["qsmdask"]' in final
    assert re.search(r"^USER 10001(:10001)?$", joined, re.M)
    assert "--uid 10001" in joined
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in joined
    # writable state under /tmp only, so a read-only root filesystem works
    for var in ("HOME", "MPLCONFIGDIR", "PREFECT_HOME", "XDG_CACHE_HOME"):
        assert re.search(rf"\b{var}=/tmp(/|\s|$)", joined), var
    # no compilers, no pip caches in the final image; CA only as a BuildKit secret
    assert not re.search(r"gcc|g\+\+|build-essential|python3-dev|python3-pip", joined)
    builder = "\n".join(stages[0][1])
    assert "--mount=type=secret,id=hostca" in builder and "PIP_NO_CACHE_DIR=1" in builder
    assert "-c /src/constraints.txt" in builder and "-r /src/constraints.txt" in builder
    assert "ca-certificates.crt" not in builder, "the local CA must not be copied into a layer"


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in ("pyproject.toml", "constraints.txt", "qsmdask", "flows", "README.md"):
        assert needed not in patterns
    for dropped in (".git", "tests", "deploy"):
        assert dropped in patterns


# --------------------------------------------------------------------------- manifests
@needs_kv
def test_rendered_overlays_are_schema_valid_and_hardened(rendered, crd_schemas):
    for overlay, objs in rendered.items():
        problems = V.validate_objects(objs, crd_schemas=crd_schemas, k8s_version=V.K8S_VERSION)
        assert problems == [], (overlay, problems)
        kinds = {o["kind"] for o in objs}
        assert {"DaskCluster", "DaskAutoscaler", "Deployment", "NetworkPolicy", "Role",
                "RoleBinding", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap"} <= kinds
        assert "Secret" not in kinds


@needs_kv
def test_validator_rejects_broken_objects(rendered, crd_schemas):
    objs = rendered["dev"]
    cluster = copy.deepcopy(_one(objs, "DaskCluster"))
    del cluster["spec"]["worker"]["spec"]                         # CRD: required
    cluster["spec"]["scheduler"]["spec"]["containers"][0]["imagePullPolcy"] = "x"  # typo
    problems = V.validate_custom(cluster, crd_schemas, V.K8S_VERSION)
    assert any("'spec' is a required property" in p for p in problems), problems
    assert any("imagePullPolcy" in p for p in problems), problems

    scaler = copy.deepcopy(_one(objs, "DaskAutoscaler"))
    scaler["spec"]["maximum"] = "eight"
    assert any("maximum" in p for p in V.validate_custom(scaler, crd_schemas, V.K8S_VERSION))

    worker = copy.deepcopy(_one(objs, "Deployment", "qsmdask-prefect-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert V.validate_core(worker, V.K8S_VERSION)


def test_pod_security_policy_flags_each_violation(rendered):
    pod = copy.deepcopy(_one(rendered["dev"], "DaskCluster")["spec"]["worker"]["spec"])
    assert V.check_pod_security(pod) == []
    c = pod["containers"][0]
    c["securityContext"]["readOnlyRootFilesystem"] = False
    c["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    c["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    del c["resources"]["limits"]["memory"]
    pod["securityContext"]["runAsUser"] = 0
    problems = "\n".join(V.check_pod_security(pod))
    for expected in ("readOnlyRootFilesystem", "capabilities.drop", "AWS_SECRET_ACCESS_KEY",
                     "limits.memory", "runAsUser"):
        assert expected in problems


def test_one_image_everywhere(rendered, job_template):
    images = set()
    for objs in rendered.values():
        images |= V.qsmdask_images(objs)
    prefect = yaml.safe_load((DEPLOY / "prefect" / "prefect.yaml").read_text())
    images.add(job_template["variables"]["properties"]["image"]["default"])
    images |= {d["work_pool"]["job_variables"]["image"] for d in prefect["deployments"]}
    assert len(images) == 1, images
    (image,) = images
    assert V._IMAGE_RE.fullmatch(image), image  # pinned tag or digest, not bare
    assert V._IMAGE_RE.fullmatch("ghcr.io/qsmdask/qsmdask@sha256:" + "a" * 64)
    assert not V._IMAGE_RE.fullmatch("qsmdask")


def test_dask_and_prefect_commands_use_the_image_entry_points(rendered):
    objs = rendered["production"]
    spec = _one(objs, "DaskCluster")["spec"]
    sched = spec["scheduler"]["spec"]["containers"][0]
    work = spec["worker"]["spec"]["containers"][0]
    assert sched["command"] == ["dask"] and sched["args"][0] == "scheduler"
    assert work["command"] == ["dask"] and work["args"][0] == "worker"
    assert "$(DASK_WORKER_NAME)" in work["args"]
    port = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert port["tcp-comm"] == 8786 and port["http-dashboard"] == 8787
    cm = _one(objs, "ConfigMap", "qsmdask-config")["data"]
    name = _one(objs, "DaskCluster")["metadata"]["name"]
    ns = _one(objs, "Namespace")["metadata"]["name"]
    # operator names the scheduler service "<cluster>-scheduler"
    assert cm["QSMDASK_DASK_ADDRESS"] == f"tcp://{name}-scheduler.{ns}.svc.cluster.local:8786"
    assert cm["QSMDASK_CLUSTER"] == "address"
    assert cm["PREFECT_API_URL"].startswith("http") and cm["PREFECT_API_URL"].endswith("/api")
    assert cm["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    pw = _one(objs, "Deployment", "qsmdask-prefect-worker")["spec"]["template"]["spec"]
    c = pw["containers"][0]
    assert c["command"] == ["prefect"] and c["args"][:2] == ["worker", "start"]
    assert c["args"][c["args"].index("--type") + 1] == "kubernetes"
    scaler = _one(objs, "DaskAutoscaler")["spec"]
    assert scaler["cluster"] == name and 0 <= scaler["minimum"] <= scaler["maximum"]


def test_rbac_is_namespaced_least_privilege(rendered):
    objs = rendered["production"]
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    role = _one(objs, "Role")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]
        assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate"}
    jobs = [r for r in role["rules"] if "jobs" in r["resources"]]
    assert jobs and {"create", "watch", "delete"} <= set(jobs[0]["verbs"])
    binding = _one(objs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    accounts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
    assert [s["name"] for s in binding["subjects"]] == ["qsmdask-prefect-worker"]
    # only the worker talks to the API: other identities get no token
    assert accounts["qsmdask-flow-run"]["automountServiceAccountToken"] is False
    assert accounts["qsmdask-dask"]["automountServiceAccountToken"] is False


def _selected(policy, labels):
    sel = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in (sel.get("matchLabels") or {}).items()):
        return False
    for e in sel.get("matchExpressions") or []:
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def test_network_policies_default_deny_and_cover_every_component(rendered, flow_run_job):
    objs = rendered["dev"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]
            and "egress" not in p["spec"]]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    spec = _one(objs, "DaskCluster")["spec"]
    flow_run = flow_run_job["spec"]["template"]["metadata"]  # the worker relabels the pod
    pods = {
        "scheduler": spec["scheduler"]["metadata"]["labels"],
        "worker": spec["worker"]["metadata"]["labels"],
        "prefect-worker": _one(objs, "Deployment", "qsmdask-prefect-worker")["spec"]["template"]["metadata"]["labels"],
        "flow-run": flow_run["labels"],
    }
    egress_allowed = {name: [p["metadata"]["name"] for p in policies
                             if "egress" in p["spec"] and p["spec"]["podSelector"] and _selected(p, lab)]
                      for name, lab in pods.items()}
    for name, allowed in egress_allowed.items():
        assert "allow-prefect-api" in allowed, (name, allowed)
    assert "allow-dask-egress" in egress_allowed["flow-run"]
    assert "allow-dask-egress" in egress_allowed["worker"]
    ingress = _one(objs, "NetworkPolicy", "allow-dask-ingress")
    assert _selected(ingress, pods["scheduler"]) and _selected(ingress, pods["worker"])
    assert not _selected(ingress, pods["prefect-worker"])


def test_storage_and_secrets_are_references_only(rendered):
    objs = rendered["production"]
    pvc = _one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    worker = _one(objs, "DaskCluster")["spec"]["worker"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    env = worker["containers"][0]["env"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"qsmdask-object-store"}
    # the other references are the pod's own fields (the memory limit), never a plain secret
    assert {k for e in env for k in e.get("valueFrom", {})} <= {"secretKeyRef", "resourceFieldRef", "fieldRef"}
    assert not [e["name"] for e in env if "value" in e and V.SECRET_NAME_RE.search(e["name"])]
    cm = _one(objs, "ConfigMap")["data"]
    assert not [k for k in cm if V.SECRET_NAME_RE.search(k)]


# --------------------------------------------------------------------------- prefect
def test_prefect_yaml_is_coherent_with_the_manifests(rendered, tmp_path):
    prefect = yaml.safe_load((DEPLOY / "prefect" / "prefect.yaml").read_text())
    cm = _one(rendered["dev"], "ConfigMap")["data"]
    image = next(iter(V.container_images(_one(rendered["dev"], "DaskCluster"))))
    assert V.check_prefect_yaml(prefect, work_pool=cm["PREFECT_WORK_POOL"], image=image) == []
    (dep,) = prefect["deployments"]
    assert dep["entrypoint"] == "flows/cohort.py:cohort_flow"
    assert dep["schedules"][0]["cron"]
    assert prefect["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/qsmdask"

    # the checker catches drift: unknown parameter, bad cron, other pool, other image
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "cohort.py").write_text("def cohort_flow(bids_dir, output_dir):\n    pass\n")
    bad = copy.deepcopy(prefect)
    bad["deployments"][0]["parameters"]["n_subjects"] = 3
    bad["deployments"][0]["schedules"] = [{"cron": "61 2 * * *"}]
    bad["deployments"][0]["work_pool"]["job_variables"]["image"] = "other:1"
    problems = "\n".join(V.check_prefect_yaml(bad, work_pool="elsewhere", image=image, root=tmp_path))
    for expected in ("n_subjects", "invalid cron", "work pool", "job image"):
        assert expected in problems


# --------------------------------------------------------------------------- CI step
def test_ci_docker_script_is_safe_and_runs_the_image_hardened():
    script = REPO / ".ci" / "docker.sh"
    text = script.read_text()
    if shutil.which("bash"):
        import subprocess
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert "set -euo pipefail" in text and "trap cleanup EXIT" in text
    # the engine it started is stopped by its PID, never by name
    assert 'kill -TERM "$DOCKERD_PID"' in text
    assert not re.search(r"\b(pkill|killall)\b", text)
    assert "--data-root=" in text and "--iptables=false" in text
    assert "debootstrap --variant=minbase" in text and '"$DOCKER" import - "$BASE"' in text
    assert "--secret \"id=hostca" in text and "--build-arg BASE_IMAGE=" in text
    for flag in ("--read-only", "--user 10001:10001", "--cap-drop ALL", "no-new-privileges", "--network none"):
        assert flag in text, flag
    assert "demo /tmp/out" in text and "deploy/validate.py" in text
    assert "kubernetes-validate --strict" in text
    # the pods run for real after the image and manifest steps, on both images
    assert "python3 .ci/pods.py" in text and "deploy/postgres" in text
    assert "image manifests pods" in text
    pods = (REPO / ".ci" / "pods.py").read_text()
    for piece in ("render_job.pod_env", "deploy/render_job.py", "--read-only", "--cap-drop", "no-new-privileges",
                  '"--memory"', '"--cpus"', '"--user"', '"kill"', "run_deployment", "tree_digests"):
        assert piece in pods, piece



# --------------------------------------------------------------------------- the flow-run Job
@needs_kv
def test_flow_run_job_from_prefect_kubernetes_runs_prefect_flow_run_execute(flow_run_job):
    """Defect: the worker fills only `args` (`prefect flow-run execute`); with the image's
    ENTRYPOINT ["qsmdask"] the pod ran `qsmdask prefect flow-run execute` and exited 2."""
    entrypoint = V.dockerfile_entrypoint(REPO / "Dockerfile")
    assert entrypoint == ["qsmdask"]
    c = flow_run_job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["prefect", "flow-run", "execute"]          # what the worker wrote
    assert V.effective_argv(c, entrypoint) == ["/usr/bin/env", "prefect", "flow-run", "execute"]
    assert V.check_flow_run_job(flow_run_job, entrypoint=entrypoint, secret_values=[],
                                flow_timeout_s=79200) == []
    # the pre-fix template (no command) is caught
    broken = copy.deepcopy(flow_run_job)
    del broken["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "qsmdask prefect flow-run execute" in "\n".join(V.check_flow_run_job(
        broken, entrypoint=entrypoint, secret_values=[], flow_timeout_s=79200))
    job = copy.deepcopy(flow_run_job)
    job["metadata"]["name"] = "cohort-run-1"
    assert V.validate_core(job, V.K8S_VERSION) == []
    pod = job["spec"]["template"]["spec"]
    assert V.check_pod_security(pod) == [] and V.check_requests_within_limits(pod) == []
    assert pod["serviceAccountName"] == "qsmdask-flow-run"
    assert job["spec"]["activeDeadlineSeconds"] == 86400 and job["spec"]["backoffLimit"] == 0
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "qsmdask-data"


def test_flow_run_job_takes_the_api_key_and_auth_string_from_secrets(flow_run_job):
    """Defect: the worker copied its PREFECT_API_KEY / PREFECT_API_AUTH_STRING into every Job
    as plain values (replacing the template's Secret references)."""
    env = {e["name"]: e for e in flow_run_job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
        assert "value" not in env[name], env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "qsmdask-prefect-api", "key": name}
    text = json.dumps(flow_run_job)
    for secret in V.RENDER_SECRETS.values():  # the worker pod had these values
        assert secret not in text
    # the worker pod really had them (else the check above proves nothing)
    sys_path = str(DEPLOY)
    import sys
    sys.path.insert(0, sys_path)
    try:
        import render_job
    finally:
        sys.path.remove(sys_path)
    rendered_env = render_job.worker_environment(
        V.render_overlay(DEPLOY / "overlays" / "dev"), V.RENDER_SECRETS)
    assert rendered_env["PREFECT_API_KEY"] == V.RENDER_SECRETS[("qsmdask-prefect-api", "PREFECT_API_KEY")]
    assert rendered_env["PREFECT_API_URL"].startswith("http://qsmdask-prefect-server.qsmdask.svc")


# --------------------------------------------------------------------------- wiring checks
@needs_kv
@needs_kubectl
def test_every_site_passes_every_check(crd_schemas_or_none):
    for site in V.OVERLAYS:
        assert V.validate_site(site, crd_schemas=crd_schemas_or_none, log=lambda *_: None) == [], site


def test_dask_workers_memory_threads_itk_and_scheduler_probes(rendered):
    for site, objs in rendered.items():
        assert V.check_dask(objs) == [], site
        cm = V._configmap(objs)
        c = _one(objs, "DaskCluster")["spec"]["worker"]["spec"]["containers"][0]
        limit = V.parse_quantity(c["resources"]["limits"]["memory"])
        assert limit - int(cm["QSMDASK_WORKER_MEMORY"]) == 2**30  # 1 GiB headroom
    objs = copy.deepcopy(rendered["dev"])
    cm = V._configmap(objs)
    cm["QSMDASK_WORKER_MEMORY"] = str(4 * 2**30)                   # = the limit: no headroom
    c = _one(objs, "DaskCluster")["spec"]["worker"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"]
    sched = _one(objs, "DaskCluster")["spec"]["scheduler"]["spec"]["containers"][0]
    sched["livenessProbe"] = {"tcpSocket": {"port": "tcp-comm"}}
    problems = "\n".join(V.check_dask(objs))
    for expected in ("leaves less than 1024 MiB", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
                     "livenessProbe must be httpGet /health"):
        assert expected in problems


def test_flow_capacity_comes_from_configuration_when_the_cluster_has_no_worker(rendered):
    """Dev overlay: autoscaler minimum 0, so a flow run may start before any worker exists;
    its tasks are then annotated from QSMDASK_WORKER_MEMORY (not left unannotated)."""
    from qsmdask.orchestration.cluster import ClusterConfig, worker_memory_capacity

    cm = V._configmap(rendered["dev"])
    assert _one(rendered["dev"], "DaskAutoscaler")["spec"]["minimum"] == 0
    cfg = ClusterConfig.from_env(cm)
    assert cfg.kind == "address" and cfg.worker_memory_bytes() == 3 * 2**30

    class NoWorkers:
        def scheduler_info(self, n_workers=-1):
            return {"workers": {}}
    assert worker_memory_capacity(NoWorkers(), fallback=cfg.worker_memory_bytes()) == 3 * 2**30


def test_storage_is_separate_from_the_application_and_retained(rendered):
    for site in V.OVERLAYS:
        app = V.render_overlay(DEPLOY / "overlays" / site)
        storage = V.render_overlay(DEPLOY / "storage" / "overlays" / site)
        assert not {"Namespace", "PersistentVolumeClaim", "StorageClass"} & {o["kind"] for o in app}
        assert {"Namespace", "PersistentVolumeClaim", "StorageClass"} <= {o["kind"] for o in storage}
        assert V.check_storage(app, storage) == []
        assert _one(storage, "StorageClass")["reclaimPolicy"] == "Retain"
    # the old layout (PVC in the application, Delete reclaim policy) is caught
    app = V.render_overlay(DEPLOY / "overlays" / "dev")
    storage = V.render_overlay(DEPLOY / "storage" / "overlays" / "dev")
    _one(storage, "StorageClass")["reclaimPolicy"] = "Delete"
    problems = "\n".join(V.check_storage(app + [_one(storage, "PersistentVolumeClaim")], storage))
    assert "is in the application kustomization" in problems and "not a Retain class" in problems


def test_disruption_budgets_cover_scheduler_flow_run_and_database(rendered, flow_run_job):
    objs = rendered["production"]
    pods = V.pods_of(objs + [flow_run_job])
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for owner in ("DaskCluster/qsmdask scheduler", "Job/", "StatefulSet/qsmdask-prefect-db"):
        pod = [p for p in pods if p["owner"].startswith(owner)][0]
        assert any(V._matches(b["spec"]["selector"], pod["labels"]) and b["spec"].get("maxUnavailable") == 0
                   for b in pdbs), owner


def test_network_policy_evaluator():
    pol = lambda name, sel, **spec: {"metadata": {"name": name, "namespace": "ns"},
                                     "spec": {"podSelector": sel, **spec}}
    a = {"namespace": "ns", "labels": {"c": "a"}, "ports": {}}
    b = {"namespace": "ns", "labels": {"c": "b"}, "ports": {"http": 80}}
    deny = pol("deny", {}, policyTypes=["Ingress", "Egress"])
    assert V.connection_allowed([], a, b, 80)
    assert not V.connection_allowed([deny], a, b, 80)
    egress = pol("e", {"matchLabels": {"c": "a"}}, policyTypes=["Egress"],
                 egress=[{"to": [{"podSelector": {"matchLabels": {"c": "b"}}}], "ports": [{"port": 80}]}])
    assert not V.connection_allowed([deny, egress], a, b, 80)          # ingress of b still denied
    ingress = pol("i", {"matchLabels": {"c": "b"}}, policyTypes=["Ingress"],
                  ingress=[{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}])
    assert V.connection_allowed([deny, egress, ingress], a, b, 80)
    assert not V.connection_allowed([deny, egress, ingress], a, b, 81)
    web = pol("w", {}, policyTypes=["Egress"], egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                                                          "except": ["10.0.0.0/8"]}}]}])
    assert V.connection_allowed([deny, web], a, {"ip": "203.0.113.5"}, 443)
    assert not V.connection_allowed([deny, web], a, {"ip": "10.1.2.3"}, 443)


def test_label_and_quantity_checks():
    assert V.label_problems({"app.kubernetes.io/component": "dask-worker"}, "x") == []
    assert V.label_problems({"app.kubernetes.io/component": "dask worker"}, "x")
    assert V.label_problems({"a": "-x"}, "x") and V.label_problems({"a": "x" * 64}, "x")
    assert V.label_problems({"Bad_Prefix.io/a": "x"}, "x")
    assert V.parse_cpu("500m") == 0.5 and V.parse_cpu("2") == 2
    pod = {"containers": [{"name": "c", "resources": {"requests": {"memory": "3Gi", "cpu": "3"},
                                                      "limits": {"memory": "2Gi", "cpu": "2"}}}]}
    assert len(V.check_requests_within_limits(pod)) == 2


# --------------------------------------------------------------------------- mutation tests
def _json_edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _job_container(t):
    return t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def _job_pod(t):
    return t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def _text_edit(rel, old, new, count=1, nth=None):
    def edit(root):
        path = root / rel
        text = path.read_text()
        assert text.count(old) >= (nth or 1), f"mutation target not found in {rel}: {old!r}"
        if nth is None:
            text = text.replace(old, new, count)
        else:
            i = -1
            for _ in range(nth):
                i = text.index(old, i + 1)
            text = text[:i] + new + text[i + len(old):]
        path.write_text(text)
    return edit


_WORKER_SECRET_SETTINGS = """            - name: PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME
              value: qsmdask-prefect-api
            - name: PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_KEY
              value: PREFECT_API_KEY
            - name: PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME
              value: qsmdask-prefect-api
            - name: PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY
              value: PREFECT_API_AUTH_STRING
"""
_DNS_POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-dns
spec:
  podSelector: {}
  policyTypes: ["Egress"]
  egress:
    - ports:
        - protocol: UDP
          port: 53
        - protocol: TCP
          port: 53
---
"""

def _pvc_in_app(root):
    """The old layout: the data volume in the application kustomization."""
    shutil.copy(root / "deploy/storage/base/pvc.yaml", root / "deploy/base/pvc.yaml")
    _text_edit("deploy/base/kustomization.yaml", "  - pdb.yaml\n", "  - pdb.yaml\n  - pvc.yaml\n")(root)


# (id, edit of a copy of deploy/, text expected in a reported problem)
MUTATIONS = [
    ("entrypoint-bug", lambda r: _json_edit(r / "deploy/prefect/base-job-template.json",
                                            lambda t: _job_container(t).pop("command")),
     "qsmdask prefect flow-run execute"),
    ("api-key-leak", _text_edit("deploy/base/prefect-worker.yaml", _WORKER_SECRET_SETTINGS, ""),
     "copied into the Job as a literal"),
    ("prefect-namespace-typo", _text_edit("deploy/base/configmap.yaml", "qsmdask-prefect-server.qsmdask.svc",
                                          "qsmdask-prefect-server.qsmdsak.svc"), "PREFECT_API_URL"),
    ("dns-policy-deleted", _text_edit("deploy/base/networkpolicy.yaml", _DNS_POLICY, ""), "cannot resolve names"),
    ("scheduler-service-selector-typo", _text_edit("deploy/base/dask-cluster.yaml",
                                                   "dask.org/component: scheduler", "dask.org/component: schedular"),
     "scheduler.service.selector"),
    ("memory-request-above-limit", _text_edit("deploy/base/prefect-server.yaml", "memory: 1Gi", "memory: 3Gi"),
     "memory request 3Gi exceeds its limit 2Gi"),
    ("deployment-selector-mismatch", _text_edit("deploy/base/prefect-worker.yaml",
                                                "app.kubernetes.io/component: prefect-worker",
                                                "app.kubernetes.io/component: prefect-wrker", nth=2),
     "spec.selector does not match its pod template"),
    ("invalid-label-value", _text_edit("deploy/base/dask-cluster.yaml", "app.kubernetes.io/component: dask-worker",
                                       "app.kubernetes.io/component: dask worker"), "invalid label value"),
    ("healthcheck-dropped", _text_edit("deploy/base/prefect-worker.yaml", "            - --with-healthcheck\n", ""),
     "without --with-healthcheck"),
    ("job-template-pvc-typo", lambda r: _json_edit(r / "deploy/prefect/base-job-template.json",
                                                   lambda t: _job_pod(t)["volumes"][1]["persistentVolumeClaim"]
                                                   .update(claimName="qsmdask-dta")),
     "claims 'qsmdask-dta'"),
    # the other defects of the issue, too
    ("memory-without-headroom", _text_edit("deploy/overlays/dev/kustomization.yaml",
                                           'QSMDASK_WORKER_MEMORY: "3221225472"',
                                           'QSMDASK_WORKER_MEMORY: "4294967296"'), "leaves less than"),
    ("pvc-back-in-the-app", _pvc_in_app, "is in the application kustomization"),
    ("dask-memory-limit-auto", _text_edit("deploy/base/dask-cluster.yaml", "- $(DASK_WORKER_MEMORY_LIMIT)", "- auto"),
     "is not the container's memory limit"),
    ("no-active-deadline", lambda r: _json_edit(r / "deploy/prefect/base-job-template.json",
                                                lambda t: t["job_configuration"]["job_manifest"]["spec"]
                                                .pop("activeDeadlineSeconds")), "no activeDeadlineSeconds"),
    ("kube-api-open-to-the-internet", _text_edit("deploy/overlays/dev/kustomization.yaml", "value: 10.96.0.1/32",
                                                 "value: 0.0.0.0/0"), "may reach any address on 443"),
]


@pytest.fixture(scope="module")
def baseline_problems(crd_schemas_or_none, tmp_path_factory):
    if importlib.util.find_spec("kubernetes_validate") is None or shutil.which("kubectl") is None:
        pytest.skip("kubernetes-validate or kubectl not installed")
    root = tmp_path_factory.mktemp("deploy-baseline")
    shutil.copytree(DEPLOY, root / "deploy")
    shutil.copy(REPO / "Dockerfile", root / "Dockerfile")
    return V.validate_site("dev", deploy_dir=root / "deploy", crd_schemas=crd_schemas_or_none, log=lambda *_: None)


@pytest.mark.parametrize("mutation,expected", [(m[1], m[2]) for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_validator_catches_each_breakage(mutation, expected, baseline_problems, crd_schemas_or_none, tmp_path):
    """Mutation test of the guards: every breakage of the issue (and of the other defects)
    makes deploy/validate.py report a problem, while the unbroken copy reports none."""
    assert baseline_problems == []
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    mutation(tmp_path)
    problems = V.validate_site("dev", deploy_dir=tmp_path / "deploy", crd_schemas=crd_schemas_or_none,
                               log=lambda *_: None)
    assert any(expected in p for p in problems), problems
