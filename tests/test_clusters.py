"""Cluster configs in clusters/: valid for the Ray installed here, and closed to the internet.

Cluster-launcher YAMLs go through the offline part of `ray up`: `prepare_config` (merge with the provider's
defaults) then `validate_config` (Ray's own `ray/autoscaler/ray-schema.json` plus its cross-field checks).
The cloud part of `ray up` (AWS look-ups, launching) is not exercised here. The KubeRay manifest is checked
for the fields the RayCluster CRD requires.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# EC2 families whose instances carry NVIDIA GPUs.
GPU_FAMILIES = {"g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6"}
WORLD = ("0.0.0.0/0", "::/0")
DASHBOARD_ANYWHERE = re.compile(r"--dashboard-host[= ]+0\.0\.0\.0")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _is_k8s_manifest(cfg: dict[str, Any]) -> bool:
    return "apiVersion" in cfg and "kind" in cfg


ALL_YAMLS = sorted(CLUSTERS.glob("*.yaml"))
LAUNCHER_YAMLS = [p for p in ALL_YAMLS if not _is_k8s_manifest(_load(p))]
K8S_YAMLS = [p for p in ALL_YAMLS if _is_k8s_manifest(_load(p))]
ids = [p.name for p in ALL_YAMLS]


def _prepared(path: Path) -> dict[str, Any]:
    """The config as `ray up` holds it just before validating: the YAML merged over the provider defaults."""
    return prepare_config(copy.deepcopy(_load(path)))


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def exposure_problems(cfg: dict[str, Any]) -> list[str]:
    """What in a parsed config (values, not comments) would open a port to the whole internet."""
    strings = list(_strings(cfg))
    problems = [f"opens to the world: {s!r}" for s in strings if any(w in s for w in WORLD)]
    problems += [f"dashboard on every interface: {s!r}" for s in strings if DASHBOARD_ANYWHERE.search(s)]
    if _is_k8s_manifest(cfg):
        head = cfg["spec"]["headGroupSpec"]
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"head Service type {head['serviceType']} is reachable from outside the cluster")
        if head.get("enableIngress"):
            problems.append("head Ingress enabled")
    return problems


def test_every_kind_of_config_is_present():
    names = {p.name for p in ALL_YAMLS}
    assert {"gpu.yaml", "local.yaml", "kuberay.yaml"} <= names
    assert {p.name for p in LAUNCHER_YAMLS} >= {"gpu.yaml", "local.yaml"}
    assert [p.name for p in K8S_YAMLS] == ["kuberay.yaml"]


# ---------------------------------------------------------------- Ray's cluster-config schema


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
def test_launcher_config_validates_against_rays_schema(path):
    raw = _load(path)
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    prepared = _prepared(path)
    validate_config(prepared)  # raises on any schema or cross-field error
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _drop_provider(c):
    del c["provider"]


def _max_workers_as_text(c):
    c["max_workers"] = "8"


def _fractional_gpu(c):
    next(iter(c["available_node_types"].values()))["resources"] = {"GPU": 0.5}


def _misspelt_key(c):
    c["head_node_typo"] = c.pop("head_node_type")


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
@pytest.mark.parametrize(
    "breakage, expected",
    [
        (_drop_provider, "'provider' is a required property"),
        (_max_workers_as_text, "is not of type 'integer'"),
        (_fractional_gpu, "is not of type 'integer'"),
        (_misspelt_key, "Additional properties are not allowed"),
    ],
    ids=["no-provider", "max_workers-text", "fractional-gpu", "misspelt-key"],
)
def test_a_broken_copy_fails_validation(path, breakage, expected):
    broken = _prepared(path)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(expected)):
        validate_config(broken)


# ---------------------------------------------------------------- nothing open to the internet


@pytest.mark.parametrize("path", ALL_YAMLS, ids=ids)
def test_no_port_open_to_the_world(path):
    cfg = _load(path)
    assert exposure_problems(cfg) == []
    if not _is_k8s_manifest(cfg):
        # Ray's AWS defaults start the dashboard with --dashboard-host=0.0.0.0 when the YAML leaves the head
        # start commands out; the merged config must not carry it either.
        assert exposure_problems(_prepared(path)) == []


def test_exposure_check_catches_open_configs():
    cfg = _prepared(CLUSTERS / "gpu.yaml")
    cfg["provider"]["security_group"] = {
        "GroupName": "wide-open",
        "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ],
    }
    cfg["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    assert len(exposure_problems(cfg)) == 2

    k8s = _load(CLUSTERS / "kuberay.yaml")
    k8s["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert len(exposure_problems(k8s)) == 1


def test_aws_node_types_all_name_their_security_groups():
    # A node type without SecurityGroupIds makes the launcher create a group with SSH open to 0.0.0.0/0.
    cfg = _load(CLUSTERS / "gpu.yaml")
    assert "security_group" not in cfg["provider"]
    for name, node_type in cfg["available_node_types"].items():
        node = node_type["node_config"]
        assert node.get("SecurityGroupIds"), f"{name} has no SecurityGroupIds"
        assert node.get("SubnetIds"), f"{name} has no SubnetIds"
        assert node.get("IamInstanceProfile"), f"{name} has no IamInstanceProfile (S3 results need one)"
        # Without an ImageId Ray falls back to an old Deep Learning AMI whose driver predates CUDA 13.
        assert node.get("ImageId", "").lower() not in ("", "latest_dlami"), name


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
def test_launcher_configs_turn_token_auth_on_on_every_node(path):
    cfg = _prepared(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# ---------------------------------------------------------------- GPUs, images, pins


def test_gpu_yaml_head_is_cpu_only_and_workers_have_gpus():
    cfg = _load(CLUSTERS / "gpu.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    assert head["node_config"]["InstanceType"].split(".")[0] not in GPU_FAMILIES

    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    gpus = []
    for name, t in workers.items():
        family = t["node_config"]["InstanceType"].split(".")[0]
        assert family in GPU_FAMILIES, f"{name}: {t['node_config']['InstanceType']} is not a GPU instance"
        assert t["resources"].get("GPU", 0) >= 1, f"{name} declares no GPU"
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        gpus.append(t["resources"]["GPU"])
    assert 1 in gpus and 8 in gpus, "want a 1-GPU type for search and an 8-GPU type for ImageNet training"
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_images_match_the_installed_ray():
    cfg = _load(CLUSTERS / "gpu.yaml")
    docker = cfg["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [
        t["docker"]["worker_image"]
        for t in cfg["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    k8s = _load(CLUSTERS / "kuberay.yaml")["spec"]
    pods = [k8s["headGroupSpec"]["template"]] + [g["template"] for g in k8s["workerGroupSpecs"]]
    images += [c["image"] for pod in pods for c in pod["spec"]["containers"]]
    assert images
    for image in images:
        assert f":{ray.__version__}-" in image, f"{image} is not tagged for ray {ray.__version__}"
    assert k8s["rayVersion"] == ray.__version__


def test_gpu_yaml_installs_the_pinned_torch_and_ray():
    setup = " ".join(_load(CLUSTERS / "gpu.yaml")["setup_commands"])
    torch_v, vision_v = (version(p).split("+")[0] for p in ("torch", "torchvision"))
    assert f"torch=={torch_v}" in setup and f"torchvision=={vision_v}" in setup
    assert f"=={ray.__version__}" in setup
    assert "pip install --quiet -e ~/oodray" in setup
    assert _load(CLUSTERS / "gpu.yaml")["file_mounts"]["~/oodray"] == "."


# ---------------------------------------------------------------- KubeRay manifest


def test_kuberay_manifest_has_the_fields_kuberay_requires():
    cfg = _load(CLUSTERS / "kuberay.yaml")
    assert cfg["apiVersion"] == "ray.io/v1" and cfg["kind"] == "RayCluster"
    assert cfg["metadata"]["name"]
    spec = cfg["spec"]
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams take strings"
    assert head["template"]["spec"]["containers"][0]["image"]

    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
        limits = containers[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{g['groupName']} has no GPU limit"
    assert {
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups
    } >= {1, 8}
