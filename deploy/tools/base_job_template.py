"""Write deploy/prefect/base-job-template.json: the Kubernetes work-pool template of qsmdask.

Starts from prefect-kubernetes' own default (so the variables schema stays Prefect's) and
hardens the Job for the "restricted" Pod Security Standard of the qsmdask namespace:
non-root uid 10001, read-only root filesystem with an emptyDir on /tmp, no privilege
escalation, all capabilities dropped, RuntimeDefault seccomp; mounts the shared PVC on
/data, takes site settings from the ConfigMap and object-store credentials from a Secret,
labels the pod for the NetworkPolicies. Regenerate after upgrading prefect-kubernetes::

    prefect work-pool get-default-base-job-template --type kubernetes \\
        | python deploy/tools/base_job_template.py > deploy/prefect/base-job-template.json
"""
import json
import sys

IMAGE = "ghcr.io/qsmdask/qsmdask:0.1.0"

DEFAULTS = {
    "namespace": "qsmdask",
    "image": IMAGE,
    "service_account_name": "qsmdask-flow-run",
    "image_pull_policy": "IfNotPresent",
    "backoff_limit": 0,
    "finished_job_ttl": 86400,
    "cpu_request": "1",
    "cpu_limit": "2",
    "memory_request": "4Gi",
    "memory_limit": "4Gi",
}

# A hung run must not hold the deployment's concurrency-1 slot forever: Kubernetes ends the
# Job after this many seconds (the flow's own timeout, QSMDASK_FLOW_TIMEOUT_S in the
# ConfigMap, is shorter so Prefect records the run as timed out first).
ACTIVE_DEADLINE_S = 86400
NEW_VARIABLES = {
    "active_deadline_seconds": {
        "title": "Active deadline (s)",
        "description": "Kubernetes stops the flow-run Job after this many seconds.",
        "type": "integer",
        "default": ACTIVE_DEADLINE_S,
    },
}

POD_LABELS = {
    "app.kubernetes.io/name": "qsmdask",
    "app.kubernetes.io/part-of": "qsmdask",
    "app.kubernetes.io/component": "flow-run",
}


def secret_env(name, secret, key):
    return {"name": name,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


def harden(template):
    conf = template["job_configuration"]
    job = conf["job_manifest"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    # the upstream default puts Job fields into the pod spec; they belong to the Job
    for key in ("completions", "parallelism"):
        spec[key] = pod.pop(key, 1)
    spec["activeDeadlineSeconds"] = "{{ active_deadline_seconds }}"
    # the cluster autoscaler must not evict a running cohort run to pack nodes
    spec["template"]["metadata"] = {
        "labels": dict(POD_LABELS),
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    }
    pod["automountServiceAccountToken"] = False
    pod["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of the 2 TiB volume per run
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod["volumes"] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "qsmdask-data"}},
    ]
    container = pod["containers"][0]
    # The worker fills only `args` (`prefect flow-run execute`); the image's ENTRYPOINT is
    # `qsmdask`, which would make that `qsmdask prefect flow-run execute`. `env` runs its
    # arguments as the command, so the pod runs `prefect flow-run execute`.
    container["command"] = ["/usr/bin/env"]
    container["envFrom"] = [{"configMapRef": {"name": "qsmdask-config"}}]
    # A list here makes the worker prepend the run's own variables (see
    # prefect_kubernetes.worker._populate_env_in_manifest); secrets stay references.
    container["env"] = [
        secret_env("AWS_ACCESS_KEY_ID", "qsmdask-object-store", "AWS_ACCESS_KEY_ID"),
        secret_env("AWS_SECRET_ACCESS_KEY", "qsmdask-object-store", "AWS_SECRET_ACCESS_KEY"),
        secret_env("PREFECT_API_KEY", "qsmdask-prefect-api", "PREFECT_API_KEY"),
        secret_env("PREFECT_API_AUTH_STRING", "qsmdask-prefect-api", "PREFECT_API_AUTH_STRING"),
    ]
    # /tmp (an emptyDir) counts against ephemeral storage: reserve it, cap it at the sizeLimit
    container["resources"]["requests"]["ephemeral-storage"] = "2Gi"
    container["resources"]["limits"]["ephemeral-storage"] = "10Gi"
    container["securityContext"] = {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "data", "mountPath": "/data"},
    ]
    props = template["variables"]["properties"]
    props.update(NEW_VARIABLES)
    for name, value in DEFAULTS.items():
        props[name]["default"] = value
    return template


if __name__ == "__main__":
    json.dump(harden(json.load(sys.stdin)), sys.stdout, indent=2)
    sys.stdout.write("\n")
