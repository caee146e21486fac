"""Every command shown in the READMEs names a script, flags and make targets that exist."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "README.zh-CN.md"]
# Shell wrappers that pass their extra arguments on to a Python script.
WRAPPERS = {"run_multigpu_linux.sh": "train_artist_style.py", "run_multigpu.bat": "train_artist_style.py"}
SCRIPT = re.compile(r"(?:^|[\s/\\])((?:tools|bench)[/\\])?([\w-]+\.(?:py|sh|bat))\b")


def commands(text: str) -> list[str]:
    """Commands in fenced code blocks (continuation lines joined) and in inline code spans."""
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"[\\`]\s*\n\s*", " ", block)
        found += [line.split(" #")[0].strip() for line in joined.splitlines()]
    found += re.findall(r"`((?:python|torchrun|make|\./|\.\\)[^`]*)`", text)
    return [c for c in found if re.search(r"\.(py|sh|bat)\b", c) or c.startswith("make ")]


@functools.cache
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-500:]}"
    return result.stdout


def check_command(command: str) -> list[str]:
    """Problems with one command line ([] when it is fine)."""
    if command.startswith("make "):
        makefile = (ROOT / "Makefile").read_text()
        return [f"make target {t!r} missing" for t in command.split()[1:]
                if not t.startswith("-") and "=" not in t and not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    match = SCRIPT.search(command)
    if not match:
        return []
    script = (match.group(1) or "").replace("\\", "/") + match.group(2)
    if not (ROOT / script).exists():
        return [f"{script} does not exist"]
    target = WRAPPERS.get(script, script)
    if not target.endswith(".py"):
        return []
    flags = {f.split("=")[0] for f in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*(?:=\S*)?", command[match.end():])}
    text = help_text(target)
    return [f"{target} has no flag {flag}" for flag in sorted(flags) if not re.search(rf"{flag}(?![\w-])", text)]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.name)
def test_readme_commands_exist(readme):
    text = readme.read_text(encoding="utf-8")
    found = commands(text)
    assert len(found) >= 20, "the README should show the workflow's commands"
    problems = {c: p for c in found if (p := check_command(c))}
    assert not problems, "\n".join(f"{c}\n    -> {'; '.join(p)}" for c, p in problems.items())


def test_checker_catches_wrong_flags_and_scripts():
    assert check_command("python prepare_dataset.py --source-dir a --output-dir b") == []
    assert check_command("python prepare_dataset.py --source-dir a --no-such-flag") == [
        "prepare_dataset.py has no flag --no-such-flag"]
    assert check_command("python tools/missing_tool.py --x") == ["tools/missing_tool.py does not exist"]
    assert check_command("make no-such-target") == ["make target 'no-such-target' missing"]


def test_readmes_link_each_other():
    english, chinese = (p.read_text(encoding="utf-8") for p in READMES)
    assert "(README.zh-CN.md)" in english.splitlines()[0]
    assert "(README.md)" in chinese.splitlines()[0]
