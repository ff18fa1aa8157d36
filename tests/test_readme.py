"""README.md stays a five-minute read, and every shell command in it is run here, by a named test, or by CI."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
MAX_LINES = 200
SHELL_BLOCKS = ("bash", "sh", "shell", "console")  # fenced blocks whose lines are commands
OTHER_BLOCKS = ("text", "mermaid", "python", "json", "toml", "yaml")  # fenced blocks that hold no command

WEIGHTS = "models/backbone/mmserve-vit-p12-96.safetensors"
CHECKPOINT = "~/.cache/mmserve/pretrain/logs/pretrain-mmserve-vit-p12-96/checkpoints/epoch_8.pt"
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[cpu,train,dev]'"
TEST = "ruff check . && python -m pytest -q"
SERVE = "bentoml serve mmserve.service:MmServe"
SPLIT = "mmserve-train split --root ~/.cache/mmserve/tasks/images --out split.json --shots 16 --split-by stem"

SHIPPED_SERVE = "tests/mmserve/test_shipped.py::test_serve_command_with_no_variables_classifies_every_style"
SHIPPED_REPLIES = "tests/mmserve/test_shipped.py::test_readme_shows_the_answers_the_shipped_examples_get"
EVAL_RUN = "tests/training/test_eval.py::test_eval_writes_json_and_markdown_matching_the_run"
CLI_DELEGATION = "tests/training/test_train_cli.py::test_prepare_and_pretrain_get_every_argument"
EXAMPLE_CLIENT = "tests/mmserve/test_example_client.py::test_example_client_prints_what_curl_gets"

# README command -> what runs it: ".ci/run" (CI runs that line verbatim), or tests (file::function) that run the
# same command line. The mmserve-train ones run there on tiny synthetic data: same subcommand and options, other
# paths, and the tiny random backbone instead of the one `--pretrained` names (BACKBONE_OPTIONS).
RUN_ELSEWHERE: dict[str, tuple[str, ...]] = {
    SETUP: (".ci/run",),
    TEST: (".ci/run",),
    SERVE: (SHIPPED_SERVE,),
    "curl -F image=@models/examples/fluent_mono.png 'localhost:3000/classify?task=fluent_mono&top_k=3'":
        (SHIPPED_SERVE, SHIPPED_REPLIES),
    "curl -F image=@models/examples/fluent_flat.png 'localhost:3000/classify?task=fluent_flat&top_k=3'":
        (SHIPPED_SERVE, SHIPPED_REPLIES),
    "curl -F image=@models/examples/noto.png -F 'text=hammer and wrench' 'localhost:3000/fuse?task=emoji_subgroup'":
        (SHIPPED_SERVE, SHIPPED_REPLIES),
    "curl localhost:3000/tasks": (SHIPPED_SERVE,),
    "python examples/client.py --url http://localhost:3000": (EXAMPLE_CLIENT,),  # on the session's server
    "mmserve-train prepare --cache ~/.cache/mmserve":
        (CLI_DELEGATION, "tests/training/test_prepare.py::test_prepare_end_to_end_on_fixtures"),
    "mmserve-train pretrain --cache ~/.cache/mmserve --epochs 8 --name pretrain-mmserve-vit-p12-96":
        (CLI_DELEGATION, "tests/training/test_prepare_errors.py::test_pretrain_missing_train_data_is_one_error_line"),
    f"mmserve-train classify --split split.json --run-dir runs/mmap --pretrained {WEIGHTS}": (EVAL_RUN,),
    f"mmserve-train fuse --train ~/.cache/mmserve/fusion/train.jsonl --run-dir runs/mope --pretrained {WEIGHTS}":
        ("tests/training/test_eval.py::test_eval_of_a_fusion_registry",),
    "mmserve-train eval --registry runs/mmap/registry --split split.json": (EVAL_RUN,),
    "mmserve-train add-task --registry runs/mmap/registry --root ~/.cache/mmserve/tasks/images --task noto --shots 16 "
    "--replace": ("tests/training/test_add_task.py::test_cli_replace_and_one_line_errors",),
    "torchrun --nproc-per-node 2 -m training.cli classify --split split.json --run-dir runs/mmap2 --pretrained "
    f"{WEIGHTS}": ("tests/training/test_distributed.py::test_two_processes_train_what_one_does",),
    f"mmserve-train ship --cache ~/.cache/mmserve --checkpoint {CHECKPOINT} --out models":
        ("tests/training/test_ship.py::test_backbone_is_exported_fp16_weights_only",),
    f"MMSERVE_REGISTRY=runs/mmap/registry {SERVE}": (  # the session's server; the toy test serves a trained run
        "tests/_server_fixture.py::demo_server", "tests/mmserve/test_toy_method.py::test_served_over_http"),
}
BACKBONE_OPTIONS = {"--pretrained", "--model"}  # what the tests swap for the tiny random backbone
CONSOLE_SCRIPTS = ("mmserve", "mmserve-train")


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every fenced block of a Markdown text: (info string's first word, its lines)."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = (line[3:].split() or [""])[0], []
            else:
                blocks.append((lang, body))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "README.md: a fenced block is never closed"
    return blocks


def _strip_comment(line: str) -> str:
    """A command line without its trailing `# comment` (a # outside quotes, after a blank or at the start)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _logical_lines(lines: list[str]) -> list[str]:
    """Lines with backslash continuations joined."""
    out, held = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1].rstrip() + " "
        else:
            out.append(held + line.strip() if held else line)
            held = ""
    return out + ([held.strip()] if held else [])


def readme_commands(text: str) -> list[str]:
    """Every shell command of the README's ```bash / ```sh / ```console blocks, comments and prompts removed."""
    commands = []
    for lang, body in _blocks(text):
        if lang in SHELL_BLOCKS:
            for line in _logical_lines(body):
                if lang == "console":
                    if not line.startswith("$ "):
                        continue  # a reply
                    line = line[2:]
                line = _strip_comment(line).strip()
                if line:
                    commands.append(line)
        else:
            assert lang in OTHER_BLOCKS, f"README.md: a fenced block must name its language (got {lang!r})"
            assert not any(line.startswith("$ ") for line in body), f"a ```{lang} block holds a shell prompt"
    return commands


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def commands(readme: str) -> list[str]:
    return readme_commands(readme)


def _help_argv(command: str) -> list[str] | None:
    """`mmserve[-train] [SUB] --help` as argv, else None."""
    argv = shlex.split(command)
    if argv[0] in CONSOLE_SCRIPTS and argv[-1] in ("--help", "-h") and len(argv) <= 3:
        return argv
    return None


def _runs_here(command: str) -> bool:
    return _help_argv(command) is not None or command.startswith("python -c ") or command == SPLIT


def test_readme_is_a_five_minute_read(readme: str) -> None:
    """At most 200 lines: the measurement narratives live in docs/."""
    assert len(readme.splitlines()) <= MAX_LINES


def test_command_extraction_reads_every_block_kind() -> None:
    """Continuations join, comments and console replies drop, untagged blocks are refused."""
    text = "```bash\nmmserve --help  # hi\nmmserve-train \\\n  --help\n```\n```console\n$ curl x  # c\n{}\n```\n"
    assert readme_commands(text) == ["mmserve --help", "mmserve-train --help", "curl x"]
    assert _strip_comment("curl -F 'text=#1 fan' x # note") == "curl -F 'text=#1 fan' x"
    with pytest.raises(AssertionError, match="language"):
        readme_commands("```\nbentoml serve x\n```\n")


def test_every_readme_command_is_run_here_or_mapped(commands: list[str]) -> None:
    """A README command that is neither run by this file nor in RUN_ELSEWHERE fails; so does a stale entry."""
    assert commands
    unmapped = [c for c in commands if not _runs_here(c) and c not in RUN_ELSEWHERE]
    assert not unmapped, f"README commands nothing runs (run them here or map them in RUN_ELSEWHERE): {unmapped}"
    stale = [c for c in RUN_ELSEWHERE if c not in commands]
    assert not stale, f"RUN_ELSEWHERE names commands the README no longer shows: {stale}"


def test_ci_runs_the_readme_setup_and_test_command_verbatim(commands: list[str]) -> None:
    """.ci/run's command line is the README's set-up command, then its test command."""
    assert SETUP in commands and TEST in commands
    ci_lines = [line.strip() for line in CI.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert f"{SETUP} && {TEST}" in ci_lines


def test_help_commands_run(commands: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`mmserve ... --help` / `mmserve-train ... --help`: the console script's entry point, in process."""
    helps = [argv for argv in map(_help_argv, commands) if argv]
    assert helps
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in CONSOLE_SCRIPTS}
    for argv in helps:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            scripts[argv[0]].load()()
        assert done.value.code in (0, None), argv
        assert "usage:" in capsys.readouterr().out, argv


def test_python_commands_run(commands: list[str], tmp_path: Path) -> None:
    """`python -c ...` commands run as written, in a scratch directory."""
    for command in (c for c in commands if c.startswith("python -c ")):
        done = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr)


def test_split_command_runs_on_a_toy_cache(commands: list[str], tmp_path: Path, monkeypatch) -> None:
    """The README's split, as written, with HOME a scratch directory holding a toy cache in prepare's layout."""
    from training.cli import main
    from training.results.toy import write_toy_cache
    from training.splits import read_split

    assert SPLIT in commands
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    write_toy_cache(tmp_path / ".cache" / "mmserve")
    argv = [os.path.expanduser(a) for a in shlex.split(SPLIT)]  # what the shell hands the command
    assert main(argv[1:]) == 0
    split = read_split(tmp_path / "split.json")
    assert split.tasks and all(task.train and task.test for task in split.tasks.values())


# --- the tests RUN_ELSEWHERE names really run those command lines -------------------------------------------------


def _test_source(test_id: str) -> str:
    """The source of a test function, of the fixtures it takes and of the module-level names it uses."""
    rel, name = test_id.split("::")
    path = ROOT / rel
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            top[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    top[target.id] = node
    assert name in top and isinstance(top[name], ast.FunctionDef), f"{test_id}: no such test"
    source, seen, todo = [], set(), [name]
    while todo:
        node = top[todo.pop()]
        if id(node) in seen:
            continue
        seen.add(id(node))
        source.append(ast.get_source_segment(path.read_text(encoding="utf-8"), node) or "")
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if isinstance(node, ast.FunctionDef):
            used |= {a.arg for a in node.args.args}  # fixtures
        todo += [n for n in used if n in top]
    return "\n".join(source)


def _check_train_command(command: str, sources: str) -> None:
    argv = shlex.split(command)
    sub, options = argv[1], {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
    assert f'"{sub}"' in sources, f"{command}: the named tests never run `mmserve-train {sub}`"
    missing = [o for o in sorted(options - BACKBONE_OPTIONS) if f'"{o}"' not in sources]
    assert not missing, f"{command}: the named tests never pass {missing}"
    if sub not in ("prepare", "pretrain"):  # those two hand their arguments to their own parsers
        from training.cli import build_parser

        build_parser().parse_args(argv[1:])  # the README's command line is one the CLI accepts


def _check_torchrun_command(command: str, sources: str) -> None:
    """`torchrun --nproc-per-node N -m training.cli SUB ...`: the test launches torch.distributed.run with
    --nproc-per-node, and runs `mmserve-train SUB ...` there as _check_train_command asks."""
    argv = shlex.split(command)
    at = argv.index("-m")
    assert argv[at + 1] == "training.cli" and "--nproc-per-node" in argv[:at], command
    assert '"torch.distributed.run"' in sources and '"--nproc-per-node"' in sources, command
    _check_train_command(shlex.join(["mmserve-train", *argv[at + 2:]]), sources)


def _check_serve_command(command: str, sources: str) -> None:
    from mmserve.bench import bentoml_server

    *assignments, tool, verb, target = shlex.split(command)
    assert (tool, verb, target) == ("bentoml", "serve", "mmserve.service:MmServe")
    assert "bentoml_server(" in sources, f"{command}: the named test starts no server"
    launcher = inspect.getsource(inspect.getmodule(bentoml_server))
    assert '"serve"' in launcher and '"mmserve.service:MmServe"' in launcher  # bentoml serve mmserve.service:MmServe
    if not assignments:
        assert 'not k.startswith("MMSERVE_")' in sources, f"{command}: the test must drop every MMSERVE_ variable"
    for assignment in assignments:
        assert f'"{assignment.split("=")[0]}"' in sources, f"{command}: the test never sets {assignment}"


def _check_curl_command(command: str, sources: str) -> None:
    argv = shlex.split(command)
    url = urlsplit("http://" + argv[-1])
    form = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-F")
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert f'"{url.path}"' in sources, f"{command}: the named test never calls {url.path}"
    if url.path == "/tasks":
        assert 'client.get("/tasks")' in sources
        return
    expected = json.loads((ROOT / "models" / "examples" / "expected.json").read_text())
    record = expected["fuse"] if url.path == "/fuse" else expected["classify"][query["task"]]
    assert form["image"] == f"@models/examples/{record['file']}", command  # the upload the test posts
    if url.path == "/fuse":
        assert form["text"] == record["text"] and query["task"] == record["task"], command
        assert 'data={"text": fuse["text"]}' in sources
    else:
        assert f'"top_k": {query["top_k"]}' in sources, f"{command}: the test asks for another top_k"


def _check_example_command(command: str, sources: str) -> None:
    """`python examples/SCRIPT --option VALUE ...`: the named test runs that script as a program, with those
    options (their values are the test's own, e.g. its server's URL)."""
    argv = shlex.split(command)
    script, options = argv[1], [a for a in argv[2:] if a.startswith("--")]
    assert (ROOT / script).is_file(), f"{command}: no {script}"
    assert f'"{script}"' in sources and "subprocess.run(" in sources, f"{command}: the named test never runs {script}"
    missing = [o for o in options if f'"{o}"' not in sources]
    assert not missing, f"{command}: the named test never passes {missing}"


def test_mapped_commands_are_what_the_named_tests_run() -> None:
    """Each RUN_ELSEWHERE entry: CI's line holds it, or its tests exist and run that command line."""
    ci = CI.read_text()
    for command, runners in RUN_ELSEWHERE.items():
        tests = [r for r in runners if r != ".ci/run"]
        if ".ci/run" in runners:
            assert command in ci, f"{command}: not in .ci/run"
        sources = "\n".join(_test_source(t) for t in tests)
        if command.startswith("mmserve-train "):
            _check_train_command(command, sources)
        elif command.startswith("torchrun "):
            _check_torchrun_command(command, sources)
        elif command.startswith("curl "):
            _check_curl_command(command, sources)
        elif re.fullmatch(r"(\w+=\S+ )*bentoml serve \S+", command):
            _check_serve_command(command, sources)
        elif command.startswith("python examples/"):
            _check_example_command(command, sources)
        else:
            assert runners == (".ci/run",), f"{command}: no check says how {runners} run it"


# --- what the README states, checked against its sources -----------------------------------------------------------


def _section(readme: str, title: str) -> str:
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end > 0 else None]


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings."""
    heads = (line.lstrip("#").strip().lower() for line in markdown.splitlines() if line.startswith("#"))
    return {re.sub(r"[^\w\- ]", "", h).replace(" ", "-") for h in heads}


def test_readme_links_resolve(readme: str) -> None:
    """Every relative link of the README names a file that exists (and a heading of it, with an #anchor)."""
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", readme):
        path, _, anchor = link.partition("#")
        if "://" in link:
            continue
        target = ROOT / path if path else README
        if not target.exists() or (anchor and anchor not in _anchors(target.read_text(encoding="utf-8"))):
            broken.append(link)
    assert not broken, f"README links to nothing: {broken}"


def test_every_mmserve_variable_is_in_the_configuration_table(readme: str) -> None:
    """Each MMSERVE_* variable the code reads has a row in the README's configuration table."""
    table = _section(readme, "Configuration")
    names = set()
    for path in [*(ROOT / "mmserve").rglob("*.py"), *(ROOT / "training").rglob("*.py")]:
        names |= set(re.findall(r"\bMMSERVE_[A-Z][A-Z_]*[A-Z]\b", path.read_text(encoding="utf-8")))
    assert "MMSERVE_METHODS" in names
    missing = sorted(n for n in names if f"| `{n}` |" not in table)
    assert not missing, f"variables without a row in the README's configuration table: {missing}"


def test_headline_results_are_the_figures_of_their_json(readme: str) -> None:
    """The README's results table copies models/ship.json and the bench reports exactly."""
    table = _section(readme, "Results")
    ship = json.loads((ROOT / "models" / "ship.json").read_text())
    bench = json.loads((ROOT / "docs" / "bench-avx512.json").read_text())
    vit = json.loads((ROOT / "docs" / "bench-vit-b-16-avx512.json").read_text())
    scores = ship["registry"]["scores"]
    styles = ship["settings"]["styles"]
    mixed = [v for per_batch in bench["ratios"]["mixed_over_single"].values() for v in per_batch.values()]
    http, vit_http = bench["ratios"]["http_over_engine"], vit["ratios"]["http_over_engine"]
    figures = [
        f"| {ship['zero_shot']['mean'] * 100:.1f}% |",
        " / ".join(f"{scores[s] * 100:.1f}" for s in styles) + f", mean {ship['registry']['mmap_mean'] * 100:.1f}%",
        f"| {scores['emoji_subgroup'] * 100:.1f}% |",
        f"| {min(mixed):.2f}-{max(mixed):.2f} |",
        f"| {bench['ratios']['onnx_over_torch']['8']['onnx-int8']:.2f} |",
        f"| {http['single']:.2f} / {http['mixed']:.2f} (ViT-B/16: {vit_http['single']:.2f} / {vit_http['mixed']:.2f})",
        f"at most {bench['cpu_budget']['single']['bound']['best_http_over_engine']:.2f} for a BentoML API",
    ]
    assert " / ".join(styles) in table
    missing = [f for f in figures if f not in table]
    assert not missing, f"README results that differ from their JSON: {missing}"
