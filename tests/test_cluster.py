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
