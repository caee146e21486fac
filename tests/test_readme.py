"""The READMEs and docs/ say the same in both languages, link to what exists, every command they show runs a
script, flags and make targets that exist (flags and values parsed by the script's own argparse parser) or is
checked against what it names (pip requirement files and extras, service routes and parameters, environment
variables), and every ``python`` block runs on generated data (see :func:`python_blocks`)."""

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import re
import shlex
import shutil
import sys
import typing
import urllib.parse
import warnings
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
import timm
import torch
from pydantic import BaseModel, ValidationError

import export
from artifacts.glance_focus_folder import save_model_folder
from artifacts.model_folder import build_export_config
from data import read_class_mapping, write_class_mapping
from data.multilabel import read_multilabel_csv
from model.glance_focus import create_glance_focus
from predictor import load_model_bundle
from service import create_app, schemas

ROOT = Path(__file__).resolve().parents[1]
README, README_ZH = ROOT / "README.md", ROOT / "README.zh-CN.md"
DOCS_INDEX = ROOT / "docs" / "README.md"
PAGES = [README, README_ZH, *sorted((ROOT / "docs").glob("*.md"))]
# Shell wrappers that pass their extra arguments on to a Python script.
WRAPPERS = {"run_multigpu_linux.sh": "train_artist_style.py", "run_multigpu.bat": "train_artist_style.py"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "powershell", "bat", "cmd"}
INLINE_COMMAND = re.compile(r"`((?:(?:python|torchrun|make|pip)(?=[\s`])|\./|\.\\)[^`\n]*)`")
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
    has_parser = re.compile(r"def get_args_parser|import .*\bget_args_parser\b")  # its own, or its package's
    scripts = [p.relative_to(ROOT).as_posix() for pattern in ("*.py", "tools/*.py", "bench/*.py")
               for p in sorted(ROOT.glob(pattern)) if has_parser.search(read(p))]
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


# ------------------------------------------------------------------------------------- commands beyond the scripts

# Environment variables the pages set that are read by a library rather than by this project's code.
OTHER_ENV = {"USE_LIBUV"}  # PyTorch's: Windows builds of torch.distributed have no libuv
# Commands whose program is not one of the project's scripts, and how each is checked.
KNOWN_PROGRAMS = {
    "pip install": "requirement files and extras exist (check_pip)",
    "curl": "route, method and query parameters of the service (test_curl_commands_match_the_service_routes)",
    "export": "the variable is read by the project or is in OTHER_ENV (check_env)",
    "$env:": "the variable is read by the project or is in OTHER_ENV (check_env)",
    "python -m venv": "the standard library's venv",
    ". .venv/bin/activate": "the activation script venv writes",
    "kill -HUP": "serve.py reloads on SIGHUP (check_sighup)",
    "python -c": "inline Python: it compiles (check_inline_python)",
}
# Program names alone in the text (their commands with a script or a make target are checked as such).
PROGRAM_NAMES = {"python", "torchrun", "make"}


def check_pip(command: str) -> list[str]:
    """``pip install`` of the project's requirement / constraint files and of ``-e .[extra]``."""
    words = shlex.split(command)[2:]
    extras = set(re.findall(r"^optional-dependencies\.(\w+)", read(ROOT / "pyproject.toml"), flags=re.M))
    problems = [f"{file} does not exist" for flag, file in zip(words, words[1:], strict=False)
                if flag in ("-r", "-c") and not (ROOT / file).is_file()]
    for word in words:
        extra = re.fullmatch(r"\.\[(\w+)\]", word)
        if extra and extra.group(1) not in extras:
            problems.append(f"pyproject.toml has no extra {extra.group(1)!r}")
    return problems


def check_inline_python(command: str) -> list[str]:
    """``python -c CODE``: the code compiles."""
    try:
        compile(shlex.split(command)[2], "<python -c>", "exec")
    except SyntaxError as err:
        return [f"python -c code does not compile: {err.msg}"]
    return []


def check_sighup(command: str) -> list[str]:
    """``kill -HUP`` of serve.py: the service installs a SIGHUP handler."""
    if "serve.py" not in command:
        return ["kill -HUP is documented for serve.py only"]
    return [] if "signal.SIGHUP" in read(ROOT / "serve.py") else ["serve.py installs no SIGHUP handler"]


def check_env(command: str) -> list[str]:
    """``export NAME=...`` / ``$env:NAME = ...``: NAME is read by the project's code, or is in OTHER_ENV."""
    name = re.match(r"(?:export |\$env:)(\w+)", command).group(1)
    code = " ".join(read(p) for pattern in ("*.py", "*/*.py") for p in ROOT.glob(pattern) if ".venv" not in p.parts)
    return [] if name in OTHER_ENV or f'"{name}"' in code else [f"nothing reads the environment variable {name}"]


def check_any_command(command: str) -> list[str]:
    """Problems with any command a page shows; a program this test does not know is one too."""
    if command.startswith("make ") or any(map(SCRIPT_TOKEN.fullmatch, command.split())):
        return check_command(command)
    if command in PROGRAM_NAMES:
        return []
    program = next((p for p in KNOWN_PROGRAMS if command.startswith(p)), None)
    if program is None:
        return ["no check for this command: add its program to KNOWN_PROGRAMS with a check"]
    return {"pip install": check_pip, "export": check_env, "$env:": check_env,
            "kill -HUP": check_sighup, "python -c": check_inline_python}.get(program, lambda c: [])(command)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_is_checked(page):
    problems = {c: p for c in commands(read(page)) if (p := check_any_command(c))}
    assert not problems, "\n".join(f"{c}\n    -> {'; '.join(p)}" for c, p in problems.items())


def test_command_checks_catch_missing_files_extras_variables_and_programs():
    assert check_any_command("pip install -r requirements-serve.txt -c constraints.txt") == []
    assert check_any_command("pip install -r requirements-gpu.txt") == ["requirements-gpu.txt does not exist"]
    assert check_any_command('pip install -e ".[servr]"') == ["pyproject.toml has no extra 'servr'"]
    assert check_any_command("export ARTIST_API_KEY=x") == []
    assert check_any_command("export ARTIST_KEY=x") == ["nothing reads the environment variable ARTIST_KEY"]
    assert "no check" in check_any_command("wget https://example.com/lsnet_t.pth")[0]
    assert "invalid int value" in check_any_command("python tools/compare_vectors.py --top-k five")[0]


def test_demo_prints_own_data_commands_that_parse_and_name_the_run_length():
    """tools/run_demo.py's summary ends with commands for the user's own data: they parse like the pages' commands,
    and the trainings name --epochs (the default, 300, is the ImageNet recipe's)."""
    spec = importlib.util.spec_from_file_location("_demo", ROOT / "tools" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for summary in (demo.OWN_DATA, demo.OWN_DATA_MULTILABEL):
        found = script_commands(f"```bash\n{summary.split(chr(10), 1)[1]}\n```")
        assert len(found) >= 3 and not {c: p for c in found if (p := check_command(c))}
        assert all("--epochs" in c for c in found if "train_" in c)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_json_examples_parse(page):
    for lang, body in code_blocks(read(page)):
        if lang == "json":
            json.loads(body)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_csv_examples_are_read_by_their_reader(page, tmp_path):
    """Class mappings and annotation CSVs shown on a page are files the project reads as shown."""
    readers = {"class_id,class_name": read_class_mapping, "image_path,labels": read_multilabel_csv}
    for number, (lang, body) in enumerate(code_blocks(read(page))):
        if lang == "csv":
            (tmp_path / f"{number}.csv").write_text(body, encoding="utf-8")
            rows = readers[body.splitlines()[0]](tmp_path / f"{number}.csv")
            assert len(rows) == len(body.splitlines()) - 1


def nested_model(annotation: object) -> type[BaseModel] | None:
    """The service schema in a field's annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if typing.get_origin(annotation) is None:
        return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return next(filter(None, map(nested_model, typing.get_args(annotation))), None)


def schema_problems(example: dict, model: type[BaseModel]) -> list[str]:
    """How a documented answer differs from ``model`` (a service schema): keys it lacks or requires, and values of
    the wrong type where nothing is elided (``"..."`` elides fields and list items)."""
    fields = model.model_fields
    problems = [f"{model.__name__} has no field {k!r}" for k in example if k != "..." and k not in fields]
    if "..." not in example:
        problems += [f"{model.__name__}.{k} is missing" for k, f in fields.items()
                     if f.is_required() and k not in example]
    if not problems and '"..."' not in json.dumps(example):
        try:
            model.model_validate(example)
        except ValidationError as err:
            problems.append(f"{model.__name__}: {err}")
    for key, value in example.items():
        inner = nested_model(fields[key].annotation) if key in fields else None
        for item in value if isinstance(value, list) else [value]:
            problems += schema_problems(item, inner) if inner and isinstance(item, dict) else []
    return problems


def test_schema_check_sees_wrong_keys_and_types():
    gallery = {"artists": 2, "works": 24, "unknown_threshold": 0.8, "artist_thresholds": None, "index": "flat_ip"}
    assert schema_problems({"model": "m", "...": "...", "gallery": gallery}, schemas.ModelInfo) == []
    assert "GalleryInfo has no field 'architecture'" in schema_problems(
        {"...": "...", "gallery": {**gallery, "architecture": "x"}}, schemas.ModelInfo)
    assert "valid integer" in schema_problems({"...": "...", "gallery": {**gallery, "artists": ["Alice", "Bob"]}},
                                              schemas.ModelInfo)[0]


def test_service_answers_shown_match_the_schemas():
    answers = [schemas.ClassifyResponse, schemas.FeaturesResponse, schemas.SimilarResponse, schemas.ModelInfo,
               schemas.ErrorBody]
    for lang, body in code_blocks(read(ROOT / "docs" / "service.md")):
        if lang == "json":
            example = json.loads(body)
            found = {m.__name__: schema_problems(example, m) for m in answers}
            assert any(not p for p in found.values()), f"{body}\n -> {found}"


# ------------------------------------------------------------------------------------------- Python blocks

ILLUSTRATIVE = "<!-- illustrative:"  # a line before a ```python block that does not run on purpose, saying why


def python_blocks(text: str) -> list[str]:
    """A page's fenced ``python`` blocks that :func:`test_python_blocks_run` runs: all but those right after an
    ``<!-- illustrative: why -->`` line."""
    return [match.group(2) for match in FENCE.finditer(text) if match.group(1).strip().lower() == "python"
            and not text[:match.start()].rstrip().rsplit("\n", 1)[-1].startswith(ILLUSTRATIVE)]


def test_illustrative_blocks_are_left_out():
    page = "```python\nrun()\n```\n\n<!-- illustrative: needs a GPU -->\n```python\nnot_run()\n```\n"
    assert python_blocks(page) == ["run()\n"]


@pytest.fixture(scope="module")
def snippet_folder(tmp_path_factory) -> dict:
    """A folder holding what the pages' Python blocks name, from random tiny models and generated images:
    ``runs/artist`` (and ``runs/artists``), a 64 px lsnet_t_artist model folder; ``exported/``, its ONNX export (its
    warnings and console output kept); ``runs/gf``, a glance-and-focus folder; ``lsnet_t.pth``, official-layout
    weights (also put into an offline Hugging Face cache per test); images ``painting.jpg``, ``other.png``,
    ``a.jpg``, ``b.jpg``, ``scan.png`` and ``gallery/``; ``feats/features.npy`` + ``image_names.txt``."""
    root = tmp_path_factory.mktemp("snippets")
    torch.manual_seed(0)
    classes = ["Alice", "Bob", "Chloé"]
    net = timm.create_model("lsnet_t_artist", num_classes=3, feature_dim=16).eval()
    folder = root / "runs" / "artist"
    folder.mkdir(parents=True)
    torch.save({"model": net.state_dict()}, folder / "model_best.pth")
    write_class_mapping(folder / "class_mapping.csv", classes)
    (folder / "config.json").write_text(json.dumps({"model": "lsnet_t_artist", "input_size": 64}))
    shutil.copytree(folder, root / "runs" / "artists")
    for seed, name in enumerate(["painting.jpg", "other.png", "a.jpg", "b.jpg", "scan.png", "gallery/Alice/1.png",
                                 "gallery/Alice/2.jpg", "gallery/Bob/3.png"]):
        gen.noise_image(root / name, (96, 80), seed=seed)
    gf = create_glance_focus("lsnet_t_gf", num_classes=3, glance_size=64, patch_size=32, focus_steps=2).eval()
    save_model_folder(gf, "lsnet_t_gf", root / "runs" / "gf", classes)
    official = {"model": timm.create_model("lsnet_t").state_dict()}
    torch.save(official, root / "lsnet_t.pth")
    rng = np.random.default_rng(0)
    (root / "feats").mkdir()
    centres = rng.normal(size=(3, 16))
    np.save(root / "feats" / "features.npy", (centres.repeat(6, 0) + rng.normal(0, 0.1, (18, 16))).astype(np.float32))
    (root / "feats" / "image_names.txt").write_text("".join(f"{classes[i // 6]}/{i}.jpg\n" for i in range(18)))
    console = io.StringIO()
    with warnings.catch_warnings(record=True) as export_warnings, contextlib.redirect_stdout(console):
        # The filters a script user has: Python hides DeprecationWarning outside __main__, and torch its own modules'
        # TracerWarnings (a filter set at import, which pytest's per-phase filters may have dropped). Changing the
        # filters also makes this process forget which warnings it has shown already.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.TracerWarning.ignore_lib_warnings()
        export.main(export.get_args_parser().parse_args(["--checkpoint", str(folder), "--output-dir",
                                                         str(root / "exported")]))
    return {"root": root, "official": official, "net": net, "export_warnings": export_warnings,
            "export_output": console.getvalue()}


SNIPPET_PAGES = [p for p in PAGES if python_blocks(read(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, snippet_folder, offline_hub, monkeypatch):
    """A page's python blocks run as written, in order and sharing their names (like a notebook), in
    :func:`snippet_folder` with an offline Hub cache holding the official lsnet_t weights."""
    offline_hub("jameslahm/lsnet_t", snippet_folder["official"])
    monkeypatch.chdir(snippet_folder["root"])
    namespace = {"__name__": f"blocks_of_{page.stem}"}
    for number, block in enumerate(python_blocks(read(page)), start=1):
        exec(compile(block, f"{page.name}, python block {number}", "exec"), namespace)


@pytest.mark.slow
def test_export_prints_its_verification_without_exporter_warnings(snippet_folder):
    """export.py's known-harmless tracer and constant-folding warnings no longer come before its verification."""
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in snippet_folder["export_warnings"]] == []
    assert snippet_folder["export_output"].startswith("verify probe images: ")


@pytest.mark.slow
def test_config_json_fields_are_the_documented_ones(snippet_folder):
    """docs/file-formats.md shows exactly the fields a model folder's config.json gets (the export's, less its own
    format and onnx), and docs/deployment.md names only fields an exported config.json has."""
    exported = json.loads((snippet_folder["root"] / "exported" / "config.json").read_text(encoding="utf-8"))
    example = next(json.loads(body) for lang, body in code_blocks(read(ROOT / "docs" / "file-formats.md"))
                   if lang == "json" and '"crop_pct"' in body)
    assert list(example) == [key for key in exported if key not in ("format", "onnx")]
    multi_label = build_export_config("lsnet_t_artist", snippet_folder["net"], 64, {"multi_label": True}, "onnx",
                                      "model.onnx")
    row = next(line for line in read(ROOT / "docs" / "deployment.md").splitlines()
               if line.startswith("| `config.json`"))
    named = set(re.findall(r"`(\w+)`", row))
    assert named and named <= {*exported, *exported["onnx"], *multi_label}, named - {*exported, *exported["onnx"]}


@pytest.mark.slow
def test_curl_commands_match_the_service_routes(snippet_folder):
    """Every curl command of docs/service.md asks for a route the service has, with its method and query
    parameters."""
    app = create_app(load_model_bundle(snippet_folder["root"] / "runs" / "artist", device="cpu"))
    routes = {(path, method.upper()): {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
              for path, operations in app.openapi()["paths"].items() for method, operation in operations.items()}
    curls = [c for c in commands(read(ROOT / "docs" / "service.md")) if c.startswith("curl ")]
    assert len(curls) >= 4
    for command in curls:
        words = shlex.split(command)
        url = urllib.parse.urlsplit(next(w for w in words if w.startswith("http")))
        method = words[words.index("-X") + 1] if "-X" in words else "POST" if {"-F", "-d"} & set(words) else "GET"
        route = next((key for key in routes if key[1] == method and re.fullmatch(
            re.sub(r"\\{\w+\\}", "[^/]+", re.escape(key[0])), url.path)), None)
        assert route is not None, command
        assert set(urllib.parse.parse_qs(url.query)) <= routes[route], command
