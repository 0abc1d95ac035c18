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
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    return {o: V.render_overlay(DEPLOY / "overlays" / o) for o in V.OVERLAYS}


@pytest.fixture(scope="module")
def crd_schemas():
    crd_dir = V.find_crd_dir()
    if crd_dir is None:
        pytest.skip("dask-kubernetes CRDs not found (set QSMDASK_DASK_CRDS)")
    return V.load_crd_schemas(crd_dir)


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

    worker = copy.deepcopy(_one(objs, "Deployment"))
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
        for o in objs:
            images |= V.container_images(o)
    prefect = yaml.safe_load((DEPLOY / "prefect" / "prefect.yaml").read_text())
    images.add(job_template["variables"]["properties"]["image"]["default"])
    images |= {d["work_pool"]["job_variables"]["image"] for d in prefect["deployments"]}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", image), image  # pinned tag, not bare


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


def test_network_policies_default_deny_and_cover_every_component(rendered, job_template):
    objs = rendered["dev"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]
            and "egress" not in p["spec"]]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    spec = _one(objs, "DaskCluster")["spec"]
    flow_run = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]
    pods = {
        "scheduler": spec["scheduler"]["metadata"]["labels"],
        "worker": spec["worker"]["metadata"]["labels"],
        "prefect-worker": _one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"],
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
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in worker["containers"][0]["env"]
            if "valueFrom" in e}
    assert refs == {"qsmdask-object-store"}
    cm = _one(objs, "ConfigMap")["data"]
    assert not [k for k in cm if V.SECRET_NAME_RE.search(k)]


# --------------------------------------------------------------------------- prefect
@needs_kv
def test_work_pool_job_template_renders_to_a_valid_hardened_job(job_template):
    job = V.render_job_template(job_template, {"name": "r", "command": ["prefect", "flow-run", "execute"]})
    job["metadata"]["name"] = "r-1"
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    assert V.validate_core(job, V.K8S_VERSION) == []
    pod = job["spec"]["template"]["spec"]
    assert V.check_pod_security(pod) == []
    assert pod["serviceAccountName"] == "qsmdask-flow-run"
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]
    # every Prefect variable the template uses is declared
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(job_template["job_configuration"])))
    assert used <= set(job_template["variables"]["properties"])


def test_render_job_template_substitutes_and_drops():
    template = {"variables": {"properties": {"a": {"default": 3}, "b": {"default": None}}},
                "job_configuration": {"job_manifest": {"x": "{{ a }}", "y": "{{ b }}",
                                                        "z": "pre-{{ a }}", "l": ["{{ b }}", 1]}}}
    assert V.render_job_template(template) == {"x": 3, "z": "pre-3", "l": [1]}
    assert V.render_job_template(template, {"b": "v"})["y"] == "v"


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


def test_dask_workers_declare_memory_within_their_limit(rendered):
    """The participant flow's memory-aware scheduling needs MEMORY on every worker."""
    base = [o for o in yaml.safe_load_all((DEPLOY / "base" / "dask-cluster.yaml").read_text()) if o]
    cluster = _one(base, "DaskCluster")
    assert V.check_worker_memory_resource(cluster) == []
    for overlay, objs in rendered.items():  # the dev overlay halves the limit and MEMORY together
        assert V.check_worker_memory_resource(_one(objs, "DaskCluster")) == [], overlay
    c = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert V.parse_quantity(c["resources"]["limits"]["memory"]) == 8 * 2**30
    c["resources"]["limits"]["memory"] = "4Gi"
    assert "exceeds the memory limit" in V.check_worker_memory_resource(cluster)[0]
    i = c["args"].index("--resources")
    del c["args"][i:i + 2]
    assert "lack --resources MEMORY" in V.check_worker_memory_resource(cluster)[0]
    assert V.parse_quantity("512Mi") == 2**29 and V.parse_quantity("4G") == 4 * 10**9
