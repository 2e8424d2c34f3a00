from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)  # raises jsonschema.ValidationError on any unknown or mistyped field
    assert config["head_node_type"] in config["available_node_types"]
    assert any("mlflow server --host 127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_every_sweep_opens_with_purpose_command_and_cost():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        header = "\n".join(line for line in path.read_text().splitlines()[:12] if line.startswith("#"))
        assert "Command:" in header and "Cost:" in header, path.name


def test_kuberay_rayjob_has_the_fields_kuberay_documents():
    """KubeRay's RayJob (ray.io/v1): entrypoint, rayClusterSpec with a head group and worker groups whose pod
    templates have containers; services of ours bind 127.0.0.1 inside the pod."""
    job = yaml.safe_load((ROOT / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "sophon-ray run sweeps/" in spec["entrypoint"] and "--host 127.0.0.1" in spec["entrypoint"]
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    assert head["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:")
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" in container["resources"]["limits"]
    # the sweep the job runs exists and validates
    from sophon_ray.run.validate import load_spec

    sweep = spec["entrypoint"].split("sophon-ray run ")[1].split()[0]
    load_spec(ROOT / sweep)
