"""The READMEs and docs/ say the same in both languages, link to what exists, and every command they show runs a
script, flags and make targets that exist (flags and values parsed by the script's own argparse parser)."""

import argparse
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README, README_ZH = ROOT / "README.md", ROOT / "README.zh-CN.md"
DOCS_INDEX = ROOT / "docs" / "README.md"
PAGES = [README, README_ZH, *sorted((ROOT / "docs").glob("*.md"))]
# Shell wrappers that pass their extra arguments on to a Python script.
WRAPPERS = {"run_multigpu_linux.sh": "train_artist_style.py", "run_multigpu.bat": "train_artist_style.py"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "powershell", "bat", "cmd"}
INLINE_COMMAND = re.compile(r"`((?:python|torchrun|make|pip|\./|\.\\)[^`\n]*)`")
SCRIPT_TOKEN = re.compile(r"[\w./\\:-]+\.(?:py|sh|bat)")
# Flags of the other programs the pages show (torchrun, tensorboard).
OTHER_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
               "--logdir"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(lang.strip().lower(), body) for lang, body in FENCE.findall(text)]


def without_comment(line: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def inline_commands(text: str) -> list[str]:
    """Commands in inline code spans outside code blocks."""
    return INLINE_COMMAND.findall(FENCE.sub("", text))


def commands(text: str) -> list[str]:
    """Command lines of the shell blocks (continuation lines joined, comments dropped) and of inline code spans."""
    found = []
    for lang, body in code_blocks(text):
        if lang in SHELL_BLOCKS:
            joined = re.sub(r"[\\`]\s*\n\s*", " ", body)
            found += [c for line in joined.splitlines() if (c := without_comment(line).strip())]
    return found + inline_commands(text)


def script_commands(text: str) -> list[str]:
    """The commands that run one of the project's scripts or a make target."""
    return [c for c in commands(text) if c.startswith("make ") or any(map(SCRIPT_TOKEN.fullmatch, c.split()))]


def headings(text: str) -> list[int]:
    """The level of every heading outside code blocks, in order."""
    return [len(m.group(1)) for m in re.finditer(r"^(#{1,6}) ", FENCE.sub("", text), flags=re.M)]


def code_lines(text: str) -> list[str]:
    """What a translation keeps byte for byte: the lines of code blocks in order (comments aside), then the inline
    commands sorted (a sentence may name them in another order)."""
    lines = [without_comment(line) for _, body in code_blocks(text) for line in body.splitlines()]
    return [line for line in lines if line.strip()] + sorted(inline_commands(text))


@functools.cache
def script_parser(script: str) -> argparse.ArgumentParser | None:
    """The script's ``get_args_parser()``, made lenient about required flags and raising instead of exiting."""
    spec = importlib.util.spec_from_file_location("_documented_" + re.sub(r"\W", "_", script), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    folder = str((ROOT / script).parent)
    sys.path.insert(0, folder)  # as `python bench/x.py` does: its neighbours (bench/scale_common.py) import
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_args_parser"):
        return None
    parser = module.get_args_parser()
    for action in parser._actions:  # a documented command may leave a required flag to the text around it
        action.required = False
    for group in parser._mutually_exclusive_groups:
        group.required = False

    def error(message: str):
        raise ValueError(message)

    parser.error = error
    return parser


@functools.cache
def project_flags() -> frozenset[str]:
    """Every flag of every script that has a ``get_args_parser()``."""
    scripts = [p.relative_to(ROOT).as_posix() for pattern in ("*.py", "tools/*.py", "bench/*.py")
               for p in sorted(ROOT.glob(pattern)) if "def get_args_parser" in read(p)]
    return frozenset(flag for script in scripts for flag in script_parser(script)._option_string_actions)


def check_make(command: str) -> list[str]:
    makefile = read(ROOT / "Makefile")
    return [f"make target {t!r} missing" for t in command.split()[1:]
            if not t.startswith("-") and "=" not in t and not re.search(rf"^{re.escape(t)}:", makefile, re.M)]


def check_command(command: str) -> list[str]:
    """Problems with one command line ([] when it is fine)."""
    if command.startswith("make "):
        return check_make(command)
    words = command.split()
    index = next((i for i, w in enumerate(words) if SCRIPT_TOKEN.fullmatch(w)), None)
    if index is None:
        return []
    script = re.sub(r"^\./", "", words[index].replace("\\", "/"))
    if not (ROOT / script).is_file():
        return [f"{script} does not exist"]
    target = WRAPPERS.get(script, script)
    if not target.endswith(".py"):
        return []
    args = re.split(r"\s(?:;|&&|\|\|?|>)", " " + " ".join(words[index + 1:]))[0]
    tokens = shlex.split(args)
    if not tokens:
        return []
    parser = script_parser(target)
    if parser is None:
        return [f"{target} has no get_args_parser(), so its flags cannot be checked"]
    known = parser._option_string_actions
    problems = [f"{target} has no flag {flag}" for flag in dict.fromkeys(t.split("=")[0] for t in tokens)
                if flag.startswith("--") and flag not in known]
    placeholders = any(t in ("...", "-h", "--help") or re.search(r"[<>\[\]]", t) for t in tokens)
    if not problems and not placeholders:
        try:
            parser.parse_args(tokens)
        except ValueError as e:
            problems.append(f"{target}: {e}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_commands_run_existing_scripts_and_flags(page):
    found = script_commands(read(page))
    problems = {c: p for c in found if (p := check_command(c))}
    assert not problems, "\n".join(f"{c}\n    -> {'; '.join(p)}" for c, p in problems.items())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_named_in_the_text_exist(page):
    text = INLINE_COMMAND.sub("", FENCE.sub("", read(page)))
    unknown = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", text)) - project_flags() - OTHER_FLAGS
    assert not unknown, f"{page.name} names flags that no script has: {sorted(unknown)}"


def test_readme_shows_the_workflow():
    found = " ".join(script_commands(read(README)))
    for step in ("make demo", "make test", "prepare_dataset.py", "train_artist_style.py", "inference_artist.py",
                 "tools/extract_cluster_features.py", "tools/compare_vectors.py", "train_artist_multilabel.py",
                 "predict_artist_multilabel.py", "torchrun"):
        assert step in found, f"README.md shows no command with {step}"
    assert len(read(README).splitlines()) <= 250


def test_translation_has_the_same_sections_and_commands():
    english, chinese = read(README), read(README_ZH)
    assert headings(chinese) == headings(english), "README.zh-CN.md must have the sections of README.md, in order"
    missing = [line for line in code_lines(english) if line not in code_lines(chinese)]
    assert code_lines(chinese) == code_lines(english), "code differs between the READMEs, e.g.:\n" + "\n".join(
        missing[:5])


def test_readmes_link_each_other():
    assert "(README.zh-CN.md)" in read(README).splitlines()[0]
    assert "(README.md)" in read(README_ZH).splitlines()[0]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    titles = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", read(path)), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", read(page))):
        if re.match(r"\w+:", link):
            continue
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_docs_page_is_in_the_index():
    index = read(DOCS_INDEX)
    missing = [p.name for p in PAGES[2:] if p != DOCS_INDEX and f"]({p.name})" not in index]
    assert not missing, f"add a row for {missing} to docs/README.md"


def test_checker_catches_wrong_scripts_flags_and_values():
    assert check_command("python prepare_dataset.py --source-dir a --output-dir b") == []
    assert check_command("python prepare_dataset.py --source-dir a --no-such-flag") == [
        "prepare_dataset.py has no flag --no-such-flag"]
    assert check_command("python tools/missing_tool.py --x") == ["tools/missing_tool.py does not exist"]
    assert check_command("make no-such-target") == ["make target 'no-such-target' missing"]
    assert "invalid choice" in check_command("python inference_artist.py --input a --mode everything")[0]
    assert "invalid int value" in check_command("python tools/compare_vectors.py --top-k five")[0]
    assert check_command("./run_multigpu_linux.sh --epochs 100 --feature-dim 512") == []
    assert check_command("./run_multigpu_linux.sh --epoch 100") == ["train_artist_style.py has no flag --epoch"]


def test_translation_check_sees_differences():
    english = "# A\n\n## B\n\n```bash\npython x.py --a 1   # comment\n```\n"
    assert code_lines(english) == code_lines(english.replace("# comment", "# 注释").replace("B", "乙"))
    assert headings(english) == [1, 2] != headings(english.replace("## B", "### B"))
    assert code_lines(english) != code_lines(english.replace("--a 1", "--a 2"))
