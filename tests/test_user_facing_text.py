"""What users read speaks of their world: the tracked user-facing files (README, docs, configs,
examples, BENCHMARKS.md, bench scripts, the package's docstrings, messages and --help texts)
never cite internal planning documents, issue numbers, development history or the paths of a
development machine; and every link in the README resolves to a file of the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

USER_FACING = ("README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml")
USER_FACING_DIRS = ("docs", "configs", "examples", "src", "bench")

INTERNAL = {
    "an internal reference document": re.compile(
        r"(REFERENCE|ARCHITECTURE|STYLE|DEVELOPERS)\.md|REFERENCE §|§ ?\d"
    ),
    "the experiment plan called 'the seed'": re.compile(r"(?i)\bthe seed\b|\bseed bugs\b"),
    "an issue number": re.compile(r"\b[Ii]ssues? \d+\b|\(issue \d+\)"),
    "a development machine's path": re.compile(r"/work/|\.\./shared\b|/root/"),
    "development history": re.compile(r"\bno GPU (was|is|has been) lent\b|\blent\b"),
}


def tracked_user_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", *USER_FACING, *USER_FACING_DIRS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def test_user_facing_files_have_no_internal_references() -> None:
    files = tracked_user_files()
    assert any(f.name == "README.md" for f in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files (images) have no prose
        for number, line in enumerate(text.splitlines(), start=1):
            for what, pattern in INTERNAL.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()[:100]}")
    assert not found, "internal references in user-facing files:\n" + "\n".join(found)


def test_readme_links_resolve() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://|mailto:", link)]
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def _gpu_section_commands() -> list[list[str]]:
    """The `reasonguard ...` command lines of the README's "With a GPU" section (continuation
    lines joined, comments cut)."""
    import shlex

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## With a GPU", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "reasonguard":
                commands.append(words[1:])
    return commands


def test_readme_gpu_section_commands_parse(cli, capsys) -> None:
    """Every command of the GPU section parses with the arguments shown: the dry runs and
    `plan` run (they need no GPU), the others parse up to `--help`."""
    from reasonguard.cli import main

    commands = _gpu_section_commands()
    verbs = {c[0] for c in commands}
    assert {"plan", "train", "evaluate", "compare", "hsdpo", "benchmarks"} <= verbs, verbs
    for argv in commands:
        if argv[0] == "plan" or "--dry-run" in argv:
            code, _, err = cli(*argv)
            assert code == 0, (argv, err)
        elif argv[:2] == ["train", "sft"]:
            code, _, err = cli(*argv, "--dry-run")
            assert code == 0, (argv, err)
        else:
            try:
                main([*argv, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, (argv, capsys.readouterr().err)
            else:
                raise AssertionError(f"{argv}: --help did not exit")


def test_package_metadata_uses_an_spdx_license() -> None:
    # A `license = {text = ...}` table made setuptools print a deprecation warning on every
    # `make setup`; an SPDX expression is the current form.
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert any(req.startswith("setuptools>=77") for req in build["requires"])
