"""Run the Kubernetes pods of qsmdask for real, as containers of the built images.

No Kubernetes API server can run on the CI machines, so this runs what the kubelet would
run: for each pod of the rendered dev site (``kubectl kustomize deploy/overlays/dev`` and
``deploy/storage/overlays/dev``) a container of the locally built image with the pod's
exact command and args (``$(VAR)`` expanded), environment (ConfigMap, Secrets, field refs,
and what the Dask operator injects), user and groups, read-only root filesystem, dropped
capabilities, no-new-privileges, CPU and memory limits, and volumes (emptyDirs and the
PVCs as fresh host directories owned by the fsGroup). Readiness is awaited through each
pod's own readiness probe. Service names resolve to the containers through ``--add-host``
on a private Docker network.

Sequence: PostgreSQL (StatefulSet) -> Prefect server (on PostgreSQL) -> Dask scheduler ->
two Dask workers -> work pool + deployment registered from deploy/prefect (``prefect
deploy``) -> one flow run -> the flow-run Job rendered by prefect-kubernetes' own worker
code (deploy/render_job.py) for that run, started as a container. A simulated cohort goes
through the participant and group levels; one Dask worker is killed mid-run. Checks: the
flow run completes, 0 ROI rows lost or duplicated, every map byte-identical to a
single-process run of the same image, the group level and the permutations ran on the
Dask workers.

Usage (root, Docker engine running, images built by .ci/docker.sh)::

    python3 .ci/pods.py --image qsmdask:ci --postgres-image qsmdask-postgres:ci
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))
import render_job  # noqa: E402  (deploy/render_job.py: pod environments, the Job render)
import validate  # noqa: E402

DOCKER = shutil.which("docker", path="/usr/bin") or shutil.which("docker")
NS = "qsmdask"
CLUSTER_DOMAIN = f"{NS}.svc.cluster.local"
UID = 10001


def log(msg):
    print(f"[pods {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd, check=True, capture=True, env=None, timeout=None):
    res = subprocess.run([str(c) for c in cmd], capture_output=capture, text=True, env=env, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:300]} failed ({res.returncode}):\n"
                           f"{(res.stdout or '')[-2000:]}\n{(res.stderr or '')[-3000:]}")
    return res


class Pods:
    def __init__(self, work: Path, images: dict[str, str], keep: bool = False):
        self.work = work
        self.images = images
        self.keep = keep
        self.tag = f"qsmdask-pods-{os.getpid()}"
        self.subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.network = self.tag
        self.containers: list[str] = []
        self.hosts: dict[str, str] = {}
        self.next_ip = 10

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        sh(DOCKER, "network", "create", "--subnet", f"{self.subnet}.0/24", self.network)
        return self

    def __exit__(self, *exc):
        for name in reversed(self.containers):
            if exc[0] is not None or self.keep:
                res = sh(DOCKER, "logs", "--tail", "40", name, check=False)
                print(f"----- last log lines of {name} -----\n{res.stdout[-4000:]}{res.stderr[-4000:]}")
            sh(DOCKER, "rm", "-f", name, check=False)
        sh(DOCKER, "network", "rm", self.network, check=False)

    def ip(self) -> str:
        self.next_ip += 1
        return f"{self.subnet}.{self.next_ip}"

    # ------------------------------------------------------------------ pod -> docker run
    def run_pod(self, name: str, pod: dict, env: dict[str, str], *, volumes: dict[str, Path],
                ip: str, hostname: str | None = None, extra_env: dict | None = None) -> str:
        """Start ``pod``'s first container like the kubelet would; returns the container name."""
        spec_sc = pod.get("securityContext") or {}
        c = pod["containers"][0]
        csc = c.get("securityContext") or {}
        env = {**env, **(extra_env or {})}
        image = self.images[c["image"].split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]]
        args = [DOCKER, "run", "-d", "--name", f"{self.tag}-{name}", "--hostname", hostname or name,
                "--network", self.network, "--ip", ip]
        for host, addr in self.hosts.items():
            args += ["--add-host", f"{host}:{addr}"]
        user = csc.get("runAsUser", spec_sc.get("runAsUser"))
        group = csc.get("runAsGroup", spec_sc.get("runAsGroup"))
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if spec_sc.get("fsGroup") is not None:
            args += ["--group-add", str(spec_sc["fsGroup"])]
        if csc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for cap in (csc.get("capabilities") or {}).get("drop") or []:
            args += ["--cap-drop", cap]
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            args += ["--memory", str(validate.parse_quantity(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", str(validate.parse_cpu(limits["cpu"]))]
        pod_volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            host_dir = volumes.get(m["name"])
            if host_dir is None:
                if "emptyDir" not in pod_volumes.get(m["name"], {}):
                    raise KeyError(f"{name}: no host directory for volume {m['name']}")
                host_dir = self.work / "emptydir" / name / m["name"]
                host_dir.mkdir(parents=True, exist_ok=True)
                os.chown(host_dir, UID, spec_sc.get("fsGroup", UID))
                host_dir.chmod(0o2775)
            args += ["-v", f"{host_dir}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        expand = lambda xs: [render_job.re.sub(r"\$\((\w+)\)", lambda mm: env.get(mm.group(1), mm.group(0)), str(x))
                             for x in xs]
        command, cargs = expand(c.get("command") or []), expand(c.get("args") or [])
        if command:
            args += ["--entrypoint", command[0], image, *command[1:], *cargs]
        else:
            args += [image, *cargs]
        log(f"start {name}: {' '.join(command + cargs) or '(image entrypoint)'}")
        sh(*args)
        self.containers.append(f"{self.tag}-{name}")
        return f"{self.tag}-{name}"

    def wait_ready(self, container: str, probe: dict, ip: str, timeout_s: float = 300):
        """Poll the container's readiness probe (httpGet to its IP, or exec in it)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            state = sh(DOCKER, "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container).stdout.split()
            if state[0] != "true":
                raise RuntimeError(f"{container} exited ({state[1]}) before it was ready")
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = get["port"]
                if not str(port).isdigit():
                    port = probe["_ports"][port]
                try:
                    with urllib.request.urlopen(f"http://{ip}:{port}{get.get('path', '/')}", timeout=5) as r:
                        if 200 <= r.status < 400:
                            log(f"{container} ready ({time.monotonic() - t0:.0f} s)")
                            return
                except OSError:
                    pass
            elif "exec" in probe:
                if sh(DOCKER, "exec", container, *probe["exec"]["command"], check=False).returncode == 0:
                    log(f"{container} ready ({time.monotonic() - t0:.0f} s)")
                    return
            time.sleep(2)
        raise TimeoutError(f"{container} not ready after {timeout_s} s")


def probe_of(container: dict) -> dict:
    probe = dict(container.get("readinessProbe") or {})
    probe["_ports"] = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    return probe


def tree_digests(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern)) if p.is_file()}


def roi_table(tables: Path):
    import pandas as pd

    files = sorted((tables / "roi").glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="qsmdask:ci")
    p.add_argument("--postgres-image", default="qsmdask-postgres:ci")
    p.add_argument("--subjects", type=int, default=4, help="simulated subjects (>= 4 for the voxel-wise level)")
    p.add_argument("--voxel-size", type=float, default=4.0, help="isotropic voxel size (mm) of the simulation")
    p.add_argument("--n-perm", type=int, default=200)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=2400, help="seconds for the flow run")
    p.add_argument("--keep", action="store_true", help="print every container's log at the end")
    p.add_argument("--reuse-reference", type=Path, default=None,
                   help="scratch folder of an earlier run with the same image: take its simulated BIDS "
                        "dataset and single-process reference instead of computing them again")
    args = p.parse_args(argv)
    t_start = time.monotonic()

    work = Path(args.work or tempfile.mkdtemp(prefix="qsmdask-pods-"))
    if work.exists() and any(work.iterdir()):
        if not (work / ".qsmdask-pods").exists():
            sys.exit(f"{work} is not empty and not a pods.py scratch folder: refusing to clear it")
        shutil.rmtree(work)  # a fresh cluster: volumes of an earlier run would be skipped as done
    work.mkdir(parents=True, exist_ok=True)
    (work / ".qsmdask-pods").write_text("scratch folder of .ci/pods.py\n")
    images = {"qsmdask": args.image, "qsmdask-postgres": args.postgres_image}

    # ---------------------------------------------------------------- rendered manifests
    app = validate.render_overlay(REPO / "deploy/overlays/dev")
    storage = validate.render_overlay(REPO / "deploy/storage/overlays/dev")
    objs = app + storage
    manifests = work / "dev.yaml"
    manifests.write_text(yaml.safe_dump_all(objs))
    one = lambda kind, name: [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name][0]
    db_pw = secrets.token_hex(16)
    # the Secrets a site creates (deploy/README.md, step 4); this server has no auth: empty values
    secret_values = {
        ("qsmdask-prefect-api", "PREFECT_API_KEY"): "",
        ("qsmdask-prefect-api", "PREFECT_API_AUTH_STRING"): "",
        ("qsmdask-prefect-db", "POSTGRES_PASSWORD"): db_pw,
        ("qsmdask-prefect-db", "PREFECT_API_DATABASE_CONNECTION_URL"):
            f"postgresql+asyncpg://prefect:{db_pw}@qsmdask-prefect-db.{CLUSTER_DOMAIN}:5432/prefect",
    }

    def env_of(kind, name, role=None):
        obj = one(kind, name)
        pod = obj["spec"][role]["spec"] if role else obj["spec"]["template"]["spec"]
        return pod, render_job.pod_env(pod, pod["containers"][0], objs, secret_values, NS)

    # ---------------------------------------------------------------- data: a simulated cohort
    data = work / "pvc-qsmdask-data"
    pgdata = work / "pvc-pgdata"
    ref_out = work / "reference"
    for d in (data, pgdata, ref_out):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, UID, UID)
    hardened = [DOCKER, "run", "--rm", "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--network", "none", "--tmpfs", "/tmp:rw,exec,size=2g"]
    if args.reuse_reference:
        src = args.reuse_reference
        shutil.copytree(src / "pvc-qsmdask-data" / "bids", data / "bids")
        shutil.rmtree(ref_out)
        shutil.copytree(src / "reference", ref_out)
        for d in (data / "bids", ref_out):
            sh("chown", "-R", f"{UID}:{UID}", d)
        args.subjects = len(list((data / "bids").glob("sub-*")))
        log(f"reusing the cohort ({args.subjects} subjects) and the reference of {src}")
    t0 = time.monotonic()
    if not args.reuse_reference:
        log(f"simulate a cohort of {args.subjects} subjects into the data volume")
        sh(*hardened, "-v", f"{data}:/data", args.image, "simulate", "/data/bids", "--subjects", str(args.subjects),
           "--sessions", "1", "--seed", "3", "--effect-ppm", "0.05", "--voxel-size", *[str(args.voxel_size)] * 3)

    # ---------------------------------------------------------------- single-process reference
    reference = (
        "from qsmdask.config import PipelineConfig\n"
        "from qsmdask.workflows.cohort import plan_participants, writer_for\n"
        "from qsmdask.workflows import participant as wf\n"
        "cfg = PipelineConfig.from_dict({})\n"
        "writer_for('/ref', '/data/bids', cfg, None)\n"
        "plan = plan_participants('/data/bids', '/ref', cfg, None)\n"
        "assert plan.todo and not plan.invalid, plan.invalid\n"
        "for ss, key in plan.todo:\n"
        "    wf.process_subject_session(ss, '/ref', cfg)\n"
        "print('reference:', len(plan.todo), 'subject-sessions')\n")
    if not args.reuse_reference:
        log("reference: every subject-session in one process (same image, no Dask)")
        sh(*hardened, "-v", f"{data}:/data:ro", "-v", f"{ref_out}:/ref", "-e", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1",
           "-e", "OMP_NUM_THREADS=1", "-e", "OPENBLAS_NUM_THREADS=1", "-e", "MKL_NUM_THREADS=1",
           "--entrypoint", "python", args.image, "-c", reference)
    t_ref = time.monotonic() - t0
    log(f"reference done in {t_ref:.0f} s")

    with Pods(work, images, keep=args.keep) as pods:
        ips = {svc: pods.ip() for svc in ("db", "server", "scheduler", "worker-0", "worker-1", "job")}
        pods.hosts = {f"qsmdask-prefect-db.{CLUSTER_DOMAIN}": ips["db"],
                      f"qsmdask-prefect-server.{CLUSTER_DOMAIN}": ips["server"],
                      f"qsmdask-scheduler.{CLUSTER_DOMAIN}": ips["scheduler"]}

        # PostgreSQL (StatefulSet, volumeClaimTemplate pgdata)
        pod, env = env_of("StatefulSet", "qsmdask-prefect-db")
        db = pods.run_pod("prefect-db-0", pod, env, volumes={"pgdata": pgdata}, ip=ips["db"])
        pods.wait_ready(db, probe_of(pod["containers"][0]), ips["db"], 180)

        # Prefect server on PostgreSQL
        pod, env = env_of("Deployment", "qsmdask-prefect-server")
        server = pods.run_pod("prefect-server", pod, env, volumes={}, ip=ips["server"])
        pods.wait_ready(server, probe_of(pod["containers"][0]), ips["server"], 300)
        db_url = sh(DOCKER, "exec", server, "sh", "-c", "echo $PREFECT_API_DATABASE_CONNECTION_URL").stdout
        assert db_url.startswith("postgresql+asyncpg://"), "the Prefect server is not on PostgreSQL"

        # Dask scheduler and two workers (what the dask-kubernetes operator would start)
        cluster = one("DaskCluster", "qsmdask")
        pod, env = env_of("DaskCluster", "qsmdask", "scheduler")
        sched = pods.run_pod("qsmdask-scheduler", pod, env, volumes={}, ip=ips["scheduler"],
                             extra_env={"DASK_SCHEDULER_ADDRESS": f"tcp://qsmdask-scheduler.{CLUSTER_DOMAIN}:8786"})
        pods.wait_ready(sched, probe_of(pod["containers"][0]), ips["scheduler"], 180)
        pod, env = env_of("DaskCluster", "qsmdask", "worker")
        workers = []
        for i in range(2):
            wname = f"qsmdask-default-worker-{i}"
            workers.append(pods.run_pod(wname, pod, env, volumes={"data": data}, ip=ips[f"worker-{i}"],
                                        extra_env={"DASK_WORKER_NAME": wname,
                                                   "DASK_SCHEDULER_ADDRESS": f"tcp://qsmdask-scheduler.{CLUSTER_DOMAIN}:8786"}))

        from distributed import Client  # the host's Dask talks to the scheduler container
        client = Client(f"tcp://{ips['scheduler']}:8786", timeout="60s")
        client.wait_for_workers(2, timeout=180)
        info = client.scheduler_info()["workers"]
        log(f"Dask workers: {[(w['name'], w['resources']) for w in info.values()]}")
        assert all(w["resources"].get("MEMORY") == 3 * 2**30 for w in info.values()), info

        # Work pool and deployment from deploy/prefect, as an operator would register them
        api = f"http://{ips['server']}:4200/api"
        penv = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        penv.update(PREFECT_API_URL=api, PREFECT_HOME=str(work / "prefect-cli"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    QSMDASK_CLUSTER="local", PYTHONPATH=str(REPO))
        sh(sys.executable, "-m", "prefect", "work-pool", "create", "qsmdask-k8s", "--type", "kubernetes",
           "--base-job-template", REPO / "deploy/prefect/base-job-template.json", env=penv, timeout=300)
        sh(sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
           REPO / "deploy/prefect/prefect.yaml", "--all", env=penv, timeout=300)
        params = {"voxelwise": {"n_perm": args.n_perm}}
        run = sh(sys.executable, "-c",
                 "import json,sys\nfrom prefect.deployments import run_deployment\n"
                 "fr = run_deployment('qsmdask-cohort/cohort-nightly', parameters=json.loads(sys.argv[1]), timeout=0)\n"
                 "print(fr.id)", json.dumps(params), env=penv, timeout=300)
        flow_run_id = run.stdout.strip().splitlines()[-1]
        log(f"flow run {flow_run_id} created from the deployment")

        # The Job, exactly as the Kubernetes worker would create it for this run
        job = json.loads(sh(sys.executable, REPO / "deploy/render_job.py", "--manifests", manifests,
                            "--flow-run-id", flow_run_id, env={k: v for k, v in os.environ.items()
                                                               if not k.startswith("PREFECT_")}).stdout)
        (work / "flow-run-job.json").write_text(json.dumps(job, indent=2))
        jpod = job["spec"]["template"]["spec"]
        jc = jpod["containers"][0]
        log(f"flow-run Job container: command {jc.get('command')} args {jc.get('args')}")
        jenv = render_job.pod_env(jpod, jc, objs, secret_values, NS)
        t_run = time.monotonic()
        jobc = pods.run_pod("flow-run", jpod, jenv, volumes={"data": data}, ip=ips["job"])

        # kill one Dask worker while subject-sessions are in flight
        tables = data / "derivatives" / "qsmdask"
        killed = False
        deadline = min(args.timeout, job["spec"].get("activeDeadlineSeconds", args.timeout))
        while True:
            state = sh(DOCKER, "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", jobc).stdout.split()
            if state[0] != "true":
                break
            n_roi = len(list((tables / "roi").glob("*.parquet"))) if (tables / "roi").exists() else 0
            if not killed and n_roi >= 1:
                log(f"{n_roi} subject-session(s) written: killing Dask worker {workers[1]}")
                sh(DOCKER, "kill", workers[1])
                killed = True
            if time.monotonic() - t_run > deadline:
                raise TimeoutError(f"the flow-run container did not finish within {deadline} s")
            time.sleep(2)
        t_run = time.monotonic() - t_run
        out = sh(DOCKER, "logs", jobc, check=False)
        print("----- flow-run pod log (tail) -----\n" + (out.stdout + out.stderr)[-5000:])
        if state[1] != "0":
            raise RuntimeError(f"the flow-run container exited {state[1]}")
        # `prefect flow-run execute` exits 0 after a failed flow too: the API has the verdict
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=30) as r:
            fr = json.load(r)
        log(f"flow run state: {fr['state']['type']} ({fr['state']['name']}) in {t_run:.0f} s")
        assert fr["state"]["type"] == "COMPLETED", fr["state"]
        if not killed:
            raise RuntimeError("the run ended before a worker could be killed (cohort too small?)")

        # the group level and the permutations ran on the Dask workers
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        log(f"task prefixes seen by the scheduler: {prefixes}")
        # the participant stages run inside one task per subject-session (flows.participant)
        for needed in ("subject_session_task", "run_group_analysis", "run_voxelwise_on_worker"):
            assert any(needed in pfx for pfx in prefixes), (needed, prefixes)
        client.close()

    # ---------------------------------------------------------------- results
    import pandas as pd

    pods_roi, ref_roi = roi_table(tables), roi_table(ref_out)
    # one row per subject-session x acquisition entities x measure x atlas label (ROI rows of
    # the per-label level share roi/hemisphere, so the label is part of the key)
    keys = [c for c in ("participant_id", "session_id", "acq", "ce", "rec", "dir", "run", "measure", "atlas",
                        "roi", "hemisphere", "level", "label", "space") if c in ref_roi.columns]
    assert not ref_roi.duplicated(keys).any(), f"the reference ROI table is not unique on {keys}"
    dup = int(pods_roi.duplicated(keys).sum())
    merged = ref_roi[keys].merge(pods_roi[keys], how="outer", indicator=True)
    lost = int((merged["_merge"] == "left_only").sum())
    extra = int((merged["_merge"] == "right_only").sum())
    log(f"ROI rows: reference {len(ref_roi)}, pods {len(pods_roi)}; lost {lost}, duplicated {dup}, unexpected {extra}")
    assert len(ref_roi) > 0 and lost == 0 and dup == 0 and extra == 0 and len(pods_roi) == len(ref_roi)
    # the values too: every measured column equal to the single-process run (run-time columns aside)
    values = [c for c in ref_roi.columns if c not in keys and not c.startswith("qc_time_") and c != "qc_recon_seconds"]
    both = ref_roi.merge(pods_roi, on=keys, suffixes=("_ref", "_pods"))
    differing = [c for c in values
                 if not both[f"{c}_ref"].equals(both[f"{c}_pods"])
                 and not (both[f"{c}_ref"].isna() & both[f"{c}_pods"].isna()
                          | (both[f"{c}_ref"] == both[f"{c}_pods"])).all()]
    log(f"ROI values: {len(values)} columns compared, differing: {differing}")
    assert not differing, differing
    ref_maps = tree_digests(ref_out, "sub-*/**/*.nii*")
    pod_maps = tree_digests(tables, "sub-*/**/*.nii*")
    differ = sorted(k for k in ref_maps if pod_maps.get(k) != ref_maps[k])
    log(f"maps: {len(ref_maps)} in the reference, {len(pod_maps)} from the pods; differing: {len(differ)}")
    assert ref_maps and set(ref_maps) == set(pod_maps) and not differ, (differ[:5], set(ref_maps) ^ set(pod_maps))
    group = sorted(p.name for p in (tables / "group").glob("*.parquet"))
    log(f"group tables: {group}")
    assert group, "no group-level table"
    # the voxel-wise analysis finished (the flow completes with it skipped when it fails)
    vcfg = tables / "logs" / "qsmdask_voxelwise_config.json"
    assert vcfg.exists(), f"the voxel-wise analysis did not finish: no {vcfg.name}"
    power = json.loads(vcfg.read_text()).get("power") or {}
    log(f"voxel-wise: {power}")
    pd.set_option("display.width", 160)
    print(f"pods.py OK: {args.subjects} subjects, participant + group level on PostgreSQL-backed Prefect, "
          f"2 Dask workers (1 killed mid-run), flow run {t_run:.0f} s, reference {t_ref:.0f} s, "
          f"total {time.monotonic() - t_start:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
