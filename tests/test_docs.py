"""The README and docs/*.md are tested: every file they name exists, every page is linked from the README, and every
fenced block runs.

- ```python blocks are executed for real, each in a fresh namespace, in a scratch working directory that sees the
  repository's `sweeps/`.
- ```bash / ```sh / ```console blocks: every command line (`&&` chains split, `\\` continuations joined, comments
  dropped; in console blocks only the `$ ` lines) is run or explicitly accounted for by :func:`plan`:
  `sophon-ray` commands run in this process and must exit 0 (run / protect / attack with `--dry-run` appended:
  they print the plan, start nothing); the few that need a finished sweep or serve forever are parsed by the real
  argument parser instead, and what is never re-run here (installs, the test suite, cluster commands) is on an
  allow-list that says why. A command :func:`plan` does not know fails the test, so a new doc command cannot slip
  through untested.
- ```yaml blocks parse; those with an `attack:` section are merged into the quickstart spec and must validate.
- ```text blocks are shown output and are not checked. A fence with any other language, or none, fails the test.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what a run writes (not in the repository): outputs, stores, data roots
GENERATED = ("runs/", "mlflow.db", "mlartifacts", "data/", "ckpt/", "report/", "summary.md", "bad.yaml",
             "curves-", "heatmap-", ".venv", "model.json", "model.safetensors", "spec.yaml", "samples/")
CODE_FOLDERS = ("sophon_ray", "analysis", "tests", "bench")
# what a scratch working directory links from the repository (read only: specs and the cluster files)
LINKED = ("sweeps", "cluster.yaml", "kuberay-rayjob.yaml", "constraints.txt", "pyproject.toml")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
RUN_LANGS, SHELL_LANGS, SHOWN_LANGS = {"python"}, {"bash", "sh", "console"}, {"text", "yaml"}

# Commands the docs show that this test does not re-run, and why. Keyed by the program (and subcommand).
NOT_RERUN = {
    ("python", "-m", "venv"): "installs: .ci/run builds a fresh venv and installs the package the same way",
    ("pip", "install"): "installs: .ci/run installs with these constraints (-c constraints.txt -e '.[test]')",
    ("python", "-m", "pytest"): "the test suite itself: .ci/run runs exactly this command",
    ("ray", "up"): "launches an AWS cluster; cluster.yaml is validated against Ray's schema in tests/test_cluster.py",
    ("ray", "down"): "tears down that AWS cluster (tests/test_cluster.py validates cluster.yaml)",
    ("ray", "dashboard"): "port-forwards to that AWS cluster's head (tests/test_cluster.py validates cluster.yaml)",
    ("ray", "attach"): "ssh to that AWS cluster's head (tests/test_cluster.py validates cluster.yaml)",
    ("mlflow", "server"): "serves until stopped: tests/test_rest.py starts it under gunicorn (--gunicorn-opts "
                          "'--timeout 120') and writes runs through it; bench/writer.py measures it",
    ("ray", "job", "submit"): "submits to a running cluster: the -m slow two-node test in tests/test_faults.py runs "
                              "`ray job submit`; the sophon-ray command after `--` is dry-run here",
}
# sophon-ray subcommands that are parsed by the real parser (arguments and options checked, spec must exist) but not
# run here, and why
PARSED_ONLY = {
    "ui": "serves until Ctrl-C: tests/test_ui.py serves a real store and tests/test_browser.py opens its link",
    "report": "needs a finished sweep's MLflow runs: tests/test_integration.py and tests/test_analysis.py draw reports",
}
DRY_RUN = ("run", "protect", "attack")   # appended --dry-run: prints the plan, starts nothing
AS_IS = ("validate", "ls", "sync")       # fast; sync with nothing journaled says so and exits 0


@dataclass(frozen=True)
class Block:
    doc: Path
    number: int
    lang: str
    body: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}#{self.number}-{self.lang or 'bare'}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        for number, match in enumerate(FENCE.finditer(doc.read_text()), 1):
            found.append(Block(doc, number, match.group(1).strip(), match.group(2)))
    return found


BLOCKS = blocks()


def of(langs: set[str]) -> list:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.lang in langs]


# --------------------------------------------------------------------------------------------- commands
def command_lines(block: Block) -> list[str]:
    """The command lines of a shell block: console blocks' `$ ` lines; continuations joined."""
    lines = block.body.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [line for line in (j.strip() for j in joined + [pending]) if line and not line.startswith("#")]


def simple_commands(line: str) -> list[list[str]]:
    """A command line as its simple commands: `&&`, `;`, `||` and `|` split it; a trailing `&` and `VAR=value`
    prefixes are dropped; `.venv/bin/x` is `x`, python3 is python."""
    tokens = shlex.split(line, comments=True)
    commands, current = [], []
    for token in [*tokens, "&&"]:
        if token in ("&&", ";", "||", "&", "|"):
            if current:
                commands.append(current)
            current = []
            continue
        current.append(token)
    out = []
    for command in commands:
        while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
            command = command[1:]
        if command:
            program = command[0].rsplit("/", 1)[-1] if command[0].startswith((".venv/", "/")) else command[0]
            out.append([{"python3": "python"}.get(program, program), *command[1:]])
    return out


@dataclass(frozen=True)
class Step:
    """What the test does with one simple command: 'cli' (run sophon-ray in this process with ``argv``), 'parse'
    (parse ``argv`` with sophon-ray's parser), or 'skip' (``why``)."""

    kind: str
    argv: tuple[str, ...] = ()
    why: str = ""


def plan(command: list[str]) -> list[Step]:
    """The steps that account for one simple command; raise LookupError for a command the test cannot run."""
    for key, why in NOT_RERUN.items():
        if tuple(command[:len(key)]) == key:
            steps = [Step("skip", tuple(command), why)]
            if "--" in command and key == ("ray", "job", "submit"):
                steps += plan(command[command.index("--") + 1:])
            return steps
    if command[0] == "sophon-ray":
        argv = [a for a in command[1:] if a not in ("-v", "--verbose")]
        sub = argv[0] if argv else ""
        if sub in DRY_RUN:
            return [Step("cli", tuple(argv if "--dry-run" in argv else [*argv, "--dry-run"]))]
        if sub in AS_IS:
            return [Step("cli", tuple(argv))]
        if sub in PARSED_ONLY:
            return [Step("parse", tuple(argv), PARSED_ONLY[sub])]
    raise LookupError(f"the docs test does not know how to run {shlex.join(command)!r}: run it in test_docs.plan() "
                      f"(in-process, --dry-run or a tiny --set), or add it to NOT_RERUN with the reason")


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A working directory that sees the repository's specs and cluster files, and nothing else."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def expand(argv: tuple[str, ...]) -> list[str]:
    """Shell globbing, as the shell in the docs would do it (relative to the working directory)."""
    out = []
    for arg in argv:
        matches = sorted(glob.glob(arg)) if any(c in arg for c in "*?[") and not arg.startswith("-") else []
        out.extend(matches or [arg])
    return out


@pytest.mark.parametrize("block", of(SHELL_LANGS))
def test_every_shell_command_runs_or_is_accounted_for(block, scratch, monkeypatch):
    import ray

    from sophon_ray.cli import build_parser, main

    def no_ray(*args, **kwargs):
        raise AssertionError("a docs command started Ray; give it --dry-run in test_docs.plan()")

    monkeypatch.setattr(ray, "init", no_ray)
    lines = command_lines(block)
    assert lines, f"{block.id}: a shell block with no command"
    for line in lines:
        for command in simple_commands(line):
            for step in plan(command):
                argv = expand(step.argv)
                if step.kind == "skip":
                    continue
                if step.kind == "parse":
                    args = build_parser().parse_args(argv)
                    assert args.spec is None or Path(args.spec).is_file(), f"{line!r}: no spec {args.spec}"
                    continue
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    status = main(argv)
                assert status == 0, f"{block.id}: `sophon-ray {shlex.join(argv)}` exited {status}:\n{err.getvalue()}"
                assert out.getvalue().strip(), f"{block.id}: `sophon-ray {shlex.join(argv)}` printed nothing"
    for written in ("runs", "mlflow.db", "mlartifacts"):
        assert not (scratch / written).exists(), f"{block.id}: a docs command wrote {written}"


def test_a_command_the_test_does_not_know_fails():
    with pytest.raises(LookupError, match="does not know"):
        plan(["curl", "https://example.com"])
    with pytest.raises(LookupError):
        plan(["sophon-ray", "frobnicate"])
    assert [s.kind for s in plan(simple_commands(".venv/bin/sophon-ray run sweeps/quickstart.yaml")[0])] == ["cli"]
    line = "RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- sophon-ray run sweeps/quickstart.yaml"
    steps = plan(simple_commands(line)[0])
    assert [s.kind for s in steps] == ["skip", "cli"] and steps[1].argv[-1] == "--dry-run"


def test_the_readme_keeps_the_two_setup_commands_and_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200, "the README is a front door: at most 200 lines; move reference text to docs/"
    setup = next(b for b in BLOCKS if b.doc.name == "README.md" and b.lang == "bash")
    assert ".venv/bin/pip install -c constraints.txt -e . && .venv/bin/sophon-ray run sweeps/quickstart.yaml" in setup.body
    assert '-m pytest -m "not slow" -n 2 --dist loadfile' in setup.body
    assert 'python -m pytest -m "not slow" -n 2 --dist loadfile' in (ROOT / ".ci" / "run").read_text()


# --------------------------------------------------------------------------------------------- python
@pytest.mark.parametrize("block", of(RUN_LANGS))
def test_every_python_block_runs(block, scratch, capsys):
    first = block.body.splitlines()[0]
    if first.startswith("# file: "):  # a file of the repository, shown whole: it must be that file, as it is
        shown = ROOT / first.removeprefix("# file: ").strip()
        assert shown.is_file() and block.body.strip() == shown.read_text().strip(), (
            f"{block.id} shows {shown.name} but differs from it: copy the file into the block again")
        return
    exec(compile(block.body, block.id, "exec"), {"__name__": "__docs__"})  # noqa: S102 - our own docs
    capsys.readouterr()


# --------------------------------------------------------------------------------------------- the rest
@pytest.mark.parametrize("block", of({"yaml"}))
def test_every_yaml_block_parses_and_attack_sections_validate(block, tmp_path):
    data = yaml.safe_load(block.body)
    assert isinstance(data, dict), block.id
    if "attack" in data:
        from sophon_ray import load_spec

        spec = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
        spec["attack"] = {**spec["attack"], **data["attack"]}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        load_spec(tmp_path / "spec.yaml")


def test_every_fence_has_a_language_the_test_handles():
    known = RUN_LANGS | SHELL_LANGS | SHOWN_LANGS
    unknown = [b.id for b in BLOCKS if b.lang not in known]
    assert not unknown, f"fenced blocks the docs test does not handle (use python, bash, console, text or yaml): {unknown}"
    assert any(b.lang == "python" for b in BLOCKS) and any(b.lang in SHELL_LANGS for b in BLOCKS)


def referenced_paths(text: str) -> set[str]:
    """Relative file paths in backticks or markdown links: a name with an extension, optionally in folders."""
    tokens = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    pattern = re.compile(r"^[\w.-]+(/[\w.-]+)*\.(py|yaml|yml|md|png|txt|sh|toml|json)$")
    return {t for t in tokens if pattern.match(t) and not t.startswith("http")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_file_the_docs_name_exists(doc):
    paths = referenced_paths(doc.read_text())
    bases = (ROOT, doc.parent, *(ROOT / f for f in CODE_FOLDERS))
    missing = [p for p in sorted(paths) if not any(g in p for g in GENERATED)
               and not any((base / p).exists() for base in bases)]
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


def test_the_readme_links_every_docs_page_and_the_images_are_shown():
    readme = (ROOT / "README.md").read_text()
    assert "docs/quickstart-heatmap-direct-all.png" in referenced_paths(readme)
    assert "sweeps/quickstart.yaml" in referenced_paths(readme)
    pages = [p for p in DOCS if p.parent.name == "docs"]
    unlinked = [p.name for p in pages if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    shown = "".join(p.read_text() for p in DOCS)
    hidden = [p.name for p in sorted((ROOT / "docs").glob("*.png")) if p.name not in shown]
    assert not hidden, f"images in docs/ no page shows: {hidden}"


def test_the_recipe_settings_table_in_the_docs_is_the_recipe_table():
    from sophon_ray.recipes import OPTIMIZERS, SCHEDULES, STRATEGIES, settings_markdown

    text = (ROOT / "docs" / "attacks.md").read_text()
    assert settings_markdown() in text, ("docs/attacks.md's recipe settings table differs from the recipe table: "
                                         "paste the output of settings_markdown() into it")
    missing = [n for n in [*STRATEGIES.names(), *OPTIMIZERS.names(), *SCHEDULES.names()] if f"`{n}`" not in text]
    assert not missing, f"docs/attacks.md does not describe {missing}"
