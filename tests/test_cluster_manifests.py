"""cluster/: the KubeRay manifests as kustomize builds them, validated offline, and cross-checked with the repo.

* Every kustomization (cluster/base, cluster/overlays/*) is built with kustomize (`kustomize build`, or the
  copy inside `kubectl kustomize`).
* RayCluster / RayJob / RayService objects are validated against the KubeRay v1.7.0 CRD schemas in
  ../shared/kuberay-crds/, strictly: unknown fields are errors (as `kubectl --validate=strict`), which the
  CRDs alone do not give (the API server silently prunes unknown fields).
* Core objects (Namespace, Secret, ...) and every embedded pod template are validated strictly against the
  Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package (offline).
* Cross-checks: image names and tags, the Ray version, entry points (parsed by the jobs' own parsers), paths,
  the Serve config (generated from serve_apps/config.yaml), placement resources, Secrets.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu"]
#: the serve_overrides.yaml target whose serveConfigV2 each build must carry
SERVE_TARGET = {"base": "cluster/base/rayservice.yaml", "overlays/gpu": "cluster/base/rayservice.yaml",
                "overlays/dev": "cluster/overlays/dev/rayservice-serve-config.yaml"}
#: Kubernetes version whose schemas core objects are checked against (kubernetes-validate ships 1.25-1.37)
K8S_VERSION = "1.33.0"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
IMAGE_WORKDIR = "/home/ray/nvseg"
MODEL_RESOURCE, CPU_RESOURCE = "nvseg_model_node", "nvseg_cpu_node"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB each


# --------------------------------------------------------------------------------------------------------
# kustomize and the schemas
# --------------------------------------------------------------------------------------------------------


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.lru_cache(maxsize=None)
def _build(name: str) -> tuple[dict, ...]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("needs kustomize: a `kustomize` or `kubectl` (v1.14+, built-in kustomize) binary on PATH")
    done = subprocess.run([*cmd, str(CLUSTER / name)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize build cluster/{name} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def _of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in _of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@functools.lru_cache(maxsize=1)
def _crd_schemas() -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): strict openAPIV3Schema}`` of the KubeRay CRDs."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (the shared/ folder beside the repository)")
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}  # ObjectMeta: checked by the server
            out[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = _strict(schema)
    assert {k for _, k in out} >= RAY_KINDS, f"CRDs missing in {CRD_DIR}"
    return out


def _strict(schema: Any) -> Any:
    """Reject unknown fields wherever the CRD lists an object's properties and does not ask to keep unknown
    ones (x-kubernetes-preserve-unknown-fields), like `kubectl --validate=strict` / kubeconform -strict."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _crd_errors(doc: dict) -> list[str]:
    import jsonschema

    schema = _crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        return [f"no CRD schema for {doc['apiVersion']} {doc['kind']}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _core_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="core Kubernetes schemas: pip install kubernetes-validate")
    kv.validate(doc, K8S_VERSION, strict=True)


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a Ray object: head and every worker group, wherever its cluster spec sits."""
    spec = doc["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}[doc["kind"]]
    out = [("headGroupSpec", cluster["headGroupSpec"]["template"])]
    out += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _group(cluster_spec: dict, name: str) -> dict:
    return next(g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == name)


def _ray_resources(group: dict) -> dict[str, float]:
    """Custom resources a group advertises through rayStartParams.resources ('"{\\"name\\": 1}"')."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"')) if raw else {}


def _gpu_limit(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def _ray_pin() -> str:
    pins = set(re.findall(r'"ray\[[\w,]+\]==([\w.]+)"', (REPO / "pyproject.toml").read_text()))
    assert len(pins) == 1, f"pyproject.toml pins Ray inconsistently: {pins}"
    return pins.pop()


# --------------------------------------------------------------------------------------------------------
# schema validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_builds_have_the_expected_objects(name):
    docs = _build(name)
    kinds = sorted(d["kind"] for d in docs)
    assert [k for k in kinds if k in RAY_KINDS] == ["RayCluster", "RayJob", "RayJob", "RayService"]
    assert {d["metadata"]["name"] for d in _of_kind(docs, "RayJob")} == {"nvseg-batch", "nvseg-train"}
    # the component labels cluster/README.md selects with (kubectl apply -k ... -l app.kubernetes.io/component=...)
    components = {(d["kind"], d["metadata"]["name"]): d["metadata"]["labels"].get("app.kubernetes.io/component")
                  for d in docs if d["kind"] in RAY_KINDS}
    assert components == {("RayCluster", "nvseg"): "cluster", ("RayService", "nvseg-serve"): "service",
                          ("RayJob", "nvseg-batch"): "batch", ("RayJob", "nvseg-train"): "train"}
    for doc in docs:
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "nvseg-ray", doc["kind"]
        if name != "base":
            assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace"), f"{doc['kind']} has no namespace"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kuberay_objects_validate_strictly_against_the_v1_7_crds(name):
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in _build(name) if d["kind"] in RAY_KINDS
              for e in _crd_errors(d)]
    assert not errors, "\n".join(errors)


def test_the_strict_crd_validation_catches_typos_and_wrong_types():
    """The validator itself: what the API server would silently prune or reject must fail here."""
    cluster = _one(_build("base"), "RayCluster")
    assert not _crd_errors(cluster)
    cases = {
        "minReplica": lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("minReplica", 0),
        "maxReplicas: four": lambda c: c["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "four"),
        "pod template typo": lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .__setitem__("imagePullPolicyy", "Always"),
        "missing groupName": lambda c: c["spec"]["workerGroupSpecs"][1].pop("groupName"),
        "autoscaler option typo": lambda c: c["spec"]["autoscalerOptions"].__setitem__("idleTimeoutSecond", 5),
    }
    for what, mutate in cases.items():
        broken = copy.deepcopy(cluster)
        mutate(broken)
        assert _crd_errors(broken), f"not rejected: {what}"
    job = copy.deepcopy(_one(_build("base"), "RayJob", "nvseg-batch"))
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert _crd_errors(job), "not rejected: RayJob entryPoint"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_objects_and_pod_templates_validate_against_kubernetes_schemas(name):
    docs = _build(name)
    for doc in docs:
        if doc["kind"] not in RAY_KINDS:
            _core_validate(doc)
            continue
        for where, template in _pod_templates(doc):
            try:
                _core_validate({"apiVersion": "v1", "kind": "PodTemplate",
                                "metadata": {"name": "check"}, "template": template})
            except Exception as exc:  # noqa: BLE001 - report which template
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc}")
    if name == "overlays/dev":
        assert {d["kind"] for d in docs} >= {"Namespace", "Secret"}  # the core kinds were really checked


# --------------------------------------------------------------------------------------------------------
# cross-checks with the repository
# --------------------------------------------------------------------------------------------------------


def test_image_tag_ray_version_and_dockerfile_agree():
    version, ray_pin = _project_version(), _ray_pin()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_pin)}$", dockerfile, re.M), "Dockerfile Ray version"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", dockerfile, re.M), "base image"
    assert re.search(rf"^WORKDIR {IMAGE_WORKDIR}$", dockerfile, re.M)
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    sources = [s for line in copied for s in line.split()]
    assert sources, "no COPY lines"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignore = (REPO / ".dockerignore").read_text().split()
    for src in sources:
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, f".dockerignore drops {src}"
    # no weights baked in: nothing copied from models/, no checkpoint file, no download at build time
    assert not [src for src in sources if src.startswith("models") or src.endswith(".pt")], "weights copied in"
    assert "weights download" not in dockerfile and not [p for p in ignore if p.startswith("!models")]

    for name in KUSTOMIZATIONS:
        for doc in _build(name):
            if doc["kind"] not in RAY_KINDS:
                continue
            assert _cluster_spec(doc)["rayVersion"] == ray_pin, f"{name} {doc['kind']} rayVersion"
            for where, template in _pod_templates(doc):
                for container in template["spec"]["containers"]:
                    image, _, tag = container["image"].rpartition(":")
                    assert image.rsplit("/", 1)[-1] == "nvseg-ray" and tag == version, \
                        f"{name} {doc['kind']} {where}: image {container['image']} is not nvseg-ray:{version}"
                    assert container.get("workingDir") == IMAGE_WORKDIR, f"{name} {where}: workingDir"


def _parse_entrypoint(entrypoint: str):
    """(script path, parsed config) of a RayJob entrypoint, parsed by the job's own argument parser."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", f"entrypoint must run the image's python: {entrypoint}"
    script = argv[1]
    assert (REPO / script).is_file(), f"entrypoint script {script} is not in the repository"
    assert script.split("/")[0] in ("jobs",), f"{script} is not under jobs/ (which the image copies)"
    if script == "jobs/batch_segment.py":
        from nvseg_ray.batch.cli import build_parser, config_from_args
    elif script == "jobs/train.py":
        spec = importlib.util.spec_from_file_location("_nvseg_train_entry", REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        build_parser, config_from_args = module.build_parser, module.config_from_args
    else:
        pytest.fail(f"unknown entrypoint script {script}")
    args = build_parser().parse_args(argv[2:])
    if getattr(args, "config", None):
        assert (REPO / args.config).is_file(), f"--config {args.config} is not in the repository"
        assert args.config.startswith("configs/"), "configs/ is what the image copies"
    return script, args, config_from_args(args)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_job_entrypoints_parse_and_name_the_resources_the_cluster_advertises(name, monkeypatch):
    docs = _build(name)
    monkeypatch.chdir(REPO)  # the entrypoints run in the image's WORKDIR, which holds the repository's files
    batch, train = _one(docs, "RayJob", "nvseg-batch"), _one(docs, "RayJob", "nvseg-train")

    script, _, cfg = _parse_entrypoint(batch["spec"]["entrypoint"])
    assert script == "jobs/batch_segment.py"
    cluster = _cluster_spec(batch)
    cpu, gpu = _group(cluster, "cpu"), _group(cluster, "gpu")
    assert cfg.cpu_node_resource == CPU_RESOURCE and CPU_RESOURCE in _ray_resources(cpu)
    assert cfg.model_node_resource == MODEL_RESOURCE and MODEL_RESOURCE in _ray_resources(gpu)
    for other in (cpu, gpu):  # each resource is advertised by exactly one group, and never by the head
        assert (CPU_RESOURCE in _ray_resources(other)) != (MODEL_RESOURCE in _ray_resources(other))
    assert not _ray_resources(cluster["headGroupSpec"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must do no Ray work"
    assert cfg.model_gpus is not None, "state --model-gpus: autoscaled GPU pods may not exist when the job starts"
    assert cfg.model_gpus <= _gpu_limit(gpu), f"--model-gpus {cfg.model_gpus} but the gpu group has {_gpu_limit(gpu)}"
    per_pod = int(_gpu_limit(gpu) // cfg.model_gpus) if cfg.model_gpus else 1
    assert cfg.max_actors <= gpu["maxReplicas"] * per_pod, "--max-actors exceeds what the gpu group can hold"
    cpus = float(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cfg.model_cpus <= cpus, "a model actor asks for more CPUs than a gpu pod has"

    script, args, train_cfg = _parse_entrypoint(train["spec"]["entrypoint"])
    assert script == "jobs/train.py" and args.config == "configs/train_finetune.yaml"
    if train_cfg.use_gpu:
        assert _gpu_limit(_group(_cluster_spec(train), "gpu")) >= 1
        assert train_cfg.num_workers <= _group(_cluster_spec(train), "gpu")["maxReplicas"] * _gpu_limit(gpu)
    for job in (batch, train):
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


def _without_serve_auth(cluster_spec: dict) -> dict:
    """``cluster_spec`` less the tokens volume that cluster/transformers/serve-auth-secret.yaml adds to the service."""
    out = copy.deepcopy(cluster_spec)
    for group in [out["headGroupSpec"], *out["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] != "serve-auth"]
        for container in pod["containers"]:
            container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m["name"] != "serve-auth"]
    return out


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_ray_object_runs_the_same_cluster_shape(name):
    docs = _build(name)
    shape = _one(docs, "RayCluster", "nvseg")["spec"]
    for doc in docs:
        if doc["kind"] in ("RayJob", "RayService"):
            spec = _without_serve_auth(_cluster_spec(doc)) if doc["kind"] == "RayService" else _cluster_spec(doc)
            assert spec == shape, f"{doc['kind']}/{doc['metadata']['name']} drifted from the RayCluster"
    assert shape["enableInTreeAutoscaling"] is True
    assert shape.get("authOptions", {}).get("mode") == "token"
    for group in shape["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0].get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"group {group['groupName']}: no memory-backed /dev/shm for the object store"
    gpu = _group(shape, "gpu")
    if name != "overlays/dev":
        assert _gpu_limit(gpu) >= 1, "the gpu group must request nvidia.com/gpu"
        tolerations = gpu["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    assert _gpu_limit(_group(shape, "cpu")) == 0 and "nvidia.com/gpu" not in json.dumps(shape["headGroupSpec"])


def test_serve_config_blocks_are_generated_from_serve_apps_config():
    spec = importlib.util.spec_from_file_location("_render_serve_config", CLUSTER / "render_serve_config.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    done = subprocess.run([sys.executable, str(CLUSTER / "render_serve_config.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    source = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    for target in render.targets():
        merged = render.serve_config(target)
        assert render.embedded((REPO / target).read_text()) == merged
        # the overrides only add/replace what they list: every other setting is serve_apps/config.yaml's
        app, src_app = merged["applications"][0], source["applications"][0]
        assert app["import_path"] == src_app["import_path"] and app["route_prefix"] == src_app["route_prefix"]
        assert [d["name"] for d in app["deployments"]] == [d["name"] for d in src_app["deployments"]]
        assert {k: v for k, v in merged.items() if k != "applications"} == \
               {k: v for k, v in source.items() if k != "applications"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rayservice_serve_config_is_valid_and_placed(name):
    from ray.serve.schema import ServeDeploySchema

    spec = importlib.util.spec_from_file_location("_render_serve_config", CLUSTER / "render_serve_config.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    service = _one(_build(name), "RayService", "nvseg-serve")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert config == render.serve_config(SERVE_TARGET[name]), "serveConfigV2 is not the rendered serve config"

    from nvseg_ray.serving.service import ServeSettings

    cluster = _cluster_spec(service)
    cpu_res, gpu_res = _ray_resources(_group(cluster, "cpu")), _ray_resources(_group(cluster, "gpu"))
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"import_path {app['import_path']}"
        assert module.split(".")[0] == "serve_apps", "the image copies serve_apps/ onto PYTHONPATH"
        assert re.search(rf"^def {attr}\(", (REPO / (module.replace(".", "/") + ".py")).read_text(), re.M)
        settings = ServeSettings.from_args(app["args"])
        assert settings.checkpoint.startswith("s3://"), "the image has no weights: read them from object storage"
        deployments = {d["name"]: d for d in app["deployments"]}
        gateway = deployments["Gateway"]["ray_actor_options"]
        model = deployments["Model"]["ray_actor_options"]
        assert set(gateway["resources"]) == {CPU_RESOURCE} and CPU_RESOURCE in cpu_res
        assert set(model["resources"]) == {MODEL_RESOURCE} and MODEL_RESOURCE in gpu_res
        assert model.get("num_gpus", 0) == (settings.model_gpus or 0)
        assert model.get("num_gpus", 0) <= _gpu_limit(_group(cluster, "gpu"))
    ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert config["http_options"]["port"] in ports, "the head must expose the Serve port"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_secret_references_resolve(name):
    """Credentials come from a Secret: generated by the overlay, or created by hand as cluster/README.md says."""
    docs = _build(name)
    generated = {d["metadata"]["name"] for d in _of_kind(docs, "Secret")}
    readme = (CLUSTER / "README.md").read_text()
    refs = set()
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            for _, template in _pod_templates(doc):
                for container in template["spec"]["containers"]:
                    refs |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
                refs |= {v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
    assert refs == {"nvseg-s3", "nvseg-serve-auth"}
    for ref in refs - generated:
        assert f"create secret generic {ref}" in readme, f"{name}: Secret {ref} is neither generated nor documented"
    keys = {"nvseg-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "nvseg-serve-auth": {"tokens"}}
    for secret in _of_kind(docs, "Secret"):
        assert set(secret.get("data", {})) >= keys[secret["metadata"]["name"]]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_auth_tokens_mounted_only_into_the_service(name):
    """The serve config's auth_tokens_file lies in the nvseg-serve-auth mount of every RayService pod (the Gateway
    may run on any of them); the RayJobs and the RayCluster do not get the tokens. No write-anywhere prefix."""
    from nvseg_ray.serving.service import ServeSettings

    docs = _build(name)
    for doc in docs:
        if doc["kind"] not in RAY_KINDS:
            continue
        for where, template in _pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0].get("volumeMounts", [])}
            has_tokens = any(v.get("secret", {}).get("secretName") == "nvseg-serve-auth" for v in volumes.values())
            assert has_tokens == (doc["kind"] == "RayService"), f"{doc['kind']} {where}"
            if doc["kind"] == "RayService":
                args = ServeSettings.from_args(yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
                assert args.auth_tokens_file and args.allowed_output_prefixes and not args.allow_overwrite
                mount = mounts[str(Path(args.auth_tokens_file).parent)]
                assert mount["readOnly"] and volumes[mount["name"]]["secret"]["secretName"] == "nvseg-serve-auth"


def test_cluster_readme_names_real_files_and_commands():
    readme = (CLUSTER / "README.md").read_text()
    for path in re.findall(r"`((?:cluster|jobs|configs|serve_apps|tests)/[\w./-]+)`", readme):
        assert (REPO / path).exists(), f"cluster/README.md names {path}, which does not exist"
    for name in KUSTOMIZATIONS[1:]:
        assert f"kubectl apply -k cluster/{name}" in readme


def test_serve_deployment_options_are_set_in_one_place():
    """Each Serve deployment option has one home: the @serve.deployment decorators of serve_apps/app.py own the
    per-replica options, serve_apps/config.yaml (and every RayService rendered from it) the replicas,
    autoscaling and resources. Both used to set max_ongoing_requests / max_queued_requests / num_replicas."""
    from serve_apps.app import Gateway, JobStore, ModelDeployment

    code = {d.name: d for d in (Gateway, ModelDeployment, JobStore)}
    spec = importlib.util.spec_from_file_location("_render_serve_config", CLUSTER / "render_serve_config.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    configs = {"serve_apps/config.yaml": yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())}
    configs.update({target: render.serve_config(target) for target in render.targets()})
    for where, config in configs.items():
        for entry in config["applications"][0]["deployments"]:
            in_code = code[entry["name"]]._deployment_config.user_configured_option_names - {"name"}
            both = sorted(in_code & (set(entry) - {"name"}))
            assert not both, f"{where}: {entry['name']} sets {both}, which serve_apps/app.py already sets"
    # the values the service's behaviour depends on (README "HTTP service": 503 + Retry-After beyond them)
    assert (ModelDeployment.max_ongoing_requests, ModelDeployment.max_queued_requests) == (2, 8)
    assert Gateway.max_ongoing_requests == 32
    assert JobStore.num_replicas == 1  # the job table lives in this one replica's memory
