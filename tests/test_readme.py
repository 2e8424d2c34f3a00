"""The README refers only to files that are in the repository (outputs of a run excepted)."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
# what a run writes (not in the repository): outputs, stores, data roots
GENERATED = ("runs/", "mlflow.db", "mlartifacts", "data/", "ckpt/", "report/", "summary.md", "bad.yaml",
             "curves-", "heatmap-", ".venv", "model.json", "model.safetensors", "spec.yaml", "samples/")


def referenced_paths(text: str) -> set[str]:
    """Relative file paths in backticks or markdown links: a name with an extension, optionally in folders."""
    tokens = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    pattern = re.compile(r"^[\w.-]+(/[\w.-]+)*\.(py|yaml|yml|md|png|txt|sh|toml|json)$")
    return {t for t in tokens if pattern.match(t) and not t.startswith("http")}


def test_every_file_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    paths = referenced_paths(text)
    assert "sweeps/quickstart.yaml" in paths and "docs/quickstart-heatmap-direct-all.png" in paths
    missing = [p for p in sorted(paths) if not any(g in p for g in GENERATED) and not (ROOT / p).exists()
               and not any((ROOT / folder / p).exists() for folder in ("sophon_ray", "analysis", "tests", "bench"))]
    assert not missing, f"README names files that are not in the repository: {missing}"
