"""Render the flow-run Job exactly as the Prefect Kubernetes worker would create it.

Not a re-implementation: the Job comes from prefect-kubernetes' own code, the path a worker
takes for every flow run:

1. ``KubernetesWorkerJobConfiguration.from_template_and_values`` on the work pool's base job
   template (``deploy/prefect/base-job-template.json``) and the deployment's job variables
   (``deploy/prefect/prefect.yaml``);
2. ``prepare_for_flow_run`` (env of the worker process, flow-run id, labels, command);
3. ``KubernetesWorker._create_job`` (API key / auth string swapped for Secret references
   when the worker is configured to), with the Kubernetes ``BatchV1Api`` replaced by a
   recorder of the manifest it would send.

The worker's environment is what its pod gets: the container env of the worker Deployment
in the rendered manifests (``--manifests``, from ``kubectl kustomize``) with its ConfigMap,
field references and ``$(VAR)`` expansion; Secret values come from ``--secret
NAME/KEY=VALUE`` (a missing optional key leaves the variable unset, as Kubernetes does).
Prefect reads its settings from the environment when first imported, so this sets the
environment first and imports Prefect afterwards: run it as its own process::

    kubectl kustomize deploy/overlays/dev > /tmp/dev.yaml
    python deploy/render_job.py --manifests /tmp/dev.yaml \\
        --secret qsmdask-prefect-api/PREFECT_API_KEY=sk-example > job.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import uuid
from pathlib import Path

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
WORKER_DEPLOYMENT = "qsmdask-prefect-worker"


def pod_env(pod_spec: dict, container: dict, objs: list[dict], secrets: dict[tuple[str, str], str],
            namespace: str, field_refs: dict | None = None) -> dict[str, str]:
    """The environment Kubernetes gives ``container``: ``envFrom`` ConfigMaps, then ``env``
    (literals with ``$(VAR)`` expansion, ConfigMap/Secret key references, field references)."""
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in objs if o.get("kind") == "ConfigMap"}
    fields = {"metadata.namespace": namespace, "metadata.name": "pod-0", "status.podIP": "127.0.0.1",
              **(field_refs or {})}
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            ref = src["configMapRef"]
            if ref["name"] not in configmaps and not ref.get("optional"):
                raise KeyError(f"ConfigMap {ref['name']} not in the manifests")
            env.update(configmaps.get(ref["name"], {}))
        elif "secretRef" in src:
            name = src["secretRef"]["name"]
            env.update({k: v for (s, k), v in secrets.items() if s == name})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
            continue
        ref = item.get("valueFrom") or {}
        if "secretKeyRef" in ref:
            r = ref["secretKeyRef"]
            if (r["name"], r["key"]) in secrets:
                env[name] = secrets[(r["name"], r["key"])]
            elif not r.get("optional"):
                raise KeyError(f"Secret {r['name']}/{r['key']} needed by {name} not given (--secret)")
        elif "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            if r["key"] in configmaps.get(r["name"], {}):
                env[name] = configmaps[r["name"]][r["key"]]
        elif "fieldRef" in ref:
            env[name] = fields[ref["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in ref:
            env[name] = str(resource_value(container, ref["resourceFieldRef"]))
    return env


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def resource_value(container: dict, ref: dict) -> int:
    """What a ``resourceFieldRef`` gives (``limits.memory`` -> bytes, divisor 1)."""
    section, resource = ref["resource"].split(".", 1)
    q = str(((container.get("resources") or {}).get(section) or {})[resource])
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", q)
    if not m:
        raise ValueError(f"cannot read quantity {q!r}")
    if m.group(2) == "m":
        return int(-(-float(m.group(1)) // 1000))  # CPU millicores round up to cores
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def worker_environment(objs: list[dict], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """Environment of the Prefect worker container in the rendered manifests ``objs``."""
    dep = [o for o in objs if o.get("kind") == "Deployment" and o["metadata"]["name"] == WORKER_DEPLOYMENT]
    if len(dep) != 1:
        raise KeyError(f"Deployment {WORKER_DEPLOYMENT} not in the manifests")
    pod = dep[0]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "prefect-worker"]
    return pod_env(pod, container, objs, secrets, dep[0]["metadata"].get("namespace", "default"))


def deployment_job_variables(prefect_yaml: Path, name: str | None = None) -> dict:
    dep = yaml.safe_load(prefect_yaml.read_text())["deployments"]
    dep = [d for d in dep if name in (None, d["name"])][0]
    return dict(dep["work_pool"].get("job_variables") or {})


async def _render(template: dict, values: dict, flow_run_id: uuid.UUID, flow_run_name: str) -> dict:
    from prefect.client.schemas.objects import Flow, FlowRun
    import prefect_kubernetes.worker as pkw

    config = await pkw.KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
    flow = Flow(id=uuid.uuid4(), name="qsmdask-cohort")
    flow_run = FlowRun(id=flow_run_id, name=flow_run_name, flow_id=flow.id)
    config.prepare_for_flow_run(flow_run=flow_run, flow=flow, worker_name="qsmdask-prefect-worker")

    sent = []

    class RecordingBatchV1Api:  # stands in for the API server: records what would be created
        def __init__(self, client):
            pass

        async def create_namespaced_job(self, namespace, body):
            sent.append((namespace, json.loads(json.dumps(body))))
            return None

    original = pkw.BatchV1Api
    pkw.BatchV1Api = RecordingBatchV1Api
    try:
        worker = pkw.KubernetesWorker(work_pool_name=os.environ.get("PREFECT_WORK_POOL", "qsmdask-k8s"),
                                      name="qsmdask-prefect-worker")
        await worker._create_job(config, client=None)
    finally:
        pkw.BatchV1Api = original
    (namespace, job), = sent
    job.setdefault("metadata", {}).setdefault("namespace", namespace)
    return job


def render(template: dict, values: dict, worker_env: dict[str, str], *,
           flow_run_id: str | None = None, flow_run_name: str = "cohort-run") -> dict:
    """The Job manifest; must run in a process that has not imported Prefect yet."""
    if "prefect" in sys.modules:
        raise RuntimeError("render() sets the worker's environment before Prefect reads it: "
                           "call it in a fresh process (python deploy/render_job.py)")
    for key in [k for k in os.environ if k.startswith("PREFECT_")]:
        del os.environ[key]  # only the worker pod's settings
    os.environ.update(worker_env)
    os.environ.setdefault("PREFECT_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                       f"render-job-{os.getpid()}"))
    fid = uuid.UUID(flow_run_id) if flow_run_id else uuid.uuid4()
    return asyncio.run(_render(template, values, fid, flow_run_name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifests", type=Path, required=True, help="rendered overlay (kubectl kustomize)")
    p.add_argument("--template", type=Path, default=DEPLOY_DIR / "prefect" / "base-job-template.json")
    p.add_argument("--prefect-yaml", type=Path, default=DEPLOY_DIR / "prefect" / "prefect.yaml")
    p.add_argument("--deployment", help="deployment name in prefect.yaml (default: the first)")
    p.add_argument("--set", action="append", default=[], metavar="VAR=JSON",
                   help="override a job variable (value parsed as JSON, else a string)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME/KEY=VALUE")
    p.add_argument("--flow-run-id")
    p.add_argument("--flow-run-name", default="cohort-run")
    p.add_argument("--print-worker-env", action="store_true", help="print the worker's env (JSON) and stop")
    args = p.parse_args(argv)

    objs = [o for o in yaml.safe_load_all(args.manifests.read_text()) if o]
    secrets = {}
    for s in args.secret:
        ref, value = s.split("=", 1)
        name, key = ref.split("/", 1)
        secrets[(name, key)] = value
    env = worker_environment(objs, secrets)
    if args.print_worker_env:
        json.dump(env, sys.stdout, indent=2, sort_keys=True)
        return 0
    values = deployment_job_variables(args.prefect_yaml, args.deployment)
    for s in args.set:
        k, v = s.split("=", 1)
        try:
            values[k] = json.loads(v)
        except json.JSONDecodeError:
            values[k] = v
    template = json.loads(args.template.read_text())
    job = render(template, values, env, flow_run_id=args.flow_run_id, flow_run_name=args.flow_run_name)
    json.dump(job, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
