"""Check that every command in bench/RESULTS.md and bench/history/*.md runs as written from the repository root.

    .venv/bin/python scripts/check_results_commands.py [FILE.md ...]      # exit 1 and one line per problem

Why: a benchmark number is only worth its command. Commands once read ``cd bench && python x.py --model
models/smollm2-135m``, which resolves the model under bench/, then as a hub id, and fails offline (issue 28,
item 2). This script checks every command without running any compression or evaluation:

- where commands are: fenced code blocks with no language or a shell one (``sh``, ``bash``, ``shell``, ``console``),
  and any line outside a block that starts like a command (``cd ``, ``python``, ``lrcompress``, ``.venv/bin/``).
  Continuation lines (``\\``) are joined, comments dropped, ``;``/``&&``/``|`` split a line into commands;
- the command runs from the root: no ``cd``, and the interpreter is the checkout's own (``.venv/bin/python``,
  ``.venv/bin/lrcompress``), not whatever ``python`` is on PATH;
- the script, recipe or test file it names exists, and so does every path-like argument (a value with a ``/``
  or a file extension), unless an earlier command *in the same file* writes it (``--out``, ``--output``, ``--save``,
  ``--json``, ``--jsonl``, ``-o``, ``>``, a recipe's ``output.dir``), it is ``models/smollm2-135m`` (``make
  model`` fetches it), it holds a variable the preamble documents (``$DATA``, ``$FIXTURE``, ``$LLMC_VENV``), or
  the command's trailing comment names it after ``needs:`` (a scratch file, a placeholder, another tree);
- the arguments parse: a bench or scripts/ script's argparse parser is rebuilt from its source (its
  ``add_argument`` calls, read with ``ast``: no import, so no torch and no work) and parses the arguments,
  types and choices included; ``lrcompress`` subcommands go through click's own parser
  (``lrcompress.cli.main.cli``); ``lrcompress run RECIPE --set ...`` loads the recipe with its overrides
  through ``lrcompress.recipe.load_recipe``, which validates every section and every stage's options.

What it does not check: that a command still gives the recorded number at today's commit (that needs the
run), that ``$DATA`` and the other documented variables are set, what a script does with its arguments after
parsing them (a model path is only checked to exist), options read outside argparse, the contents of what
``needs:`` names, and commands written only inside prose (inline backticks).
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
COMMAND_START = re.compile(r"^(cd |python|lrcompress |\.venv/bin/)")
OUTPUT_FLAGS = {"--out", "--output", "--json", "--jsonl", "-o", "--save"}
PATH_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".jsonl", ".txt", ".md", ".png", ".sh", ".safetensors", ".gguf"}
ARTIFACTS = {"models/smollm2-135m": "make model"}
DOCUMENTED_VARIABLES = {"DATA", "FIXTURE", "LLMC_VENV", "LRCOMPRESS_DATA", "HOME", "PWD"}
PYTHON, LRCOMPRESS = ".venv/bin/python", ".venv/bin/lrcompress"
BARE = {"python": PYTHON, "python3": PYTHON, "lrcompress": LRCOMPRESS}
EXTERNAL = {"py-spy"}           # tools outside the checkout: only the generic checks apply
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")       # <tree>, <its pid>; not a redirection "< file"
TYPES = {"int": int, "float": float, "str": str, "Path": Path}


@dataclass
class Command:
    """One simple command as written: where it is, its shell words and its trailing comment."""

    file: Path
    line: int
    words: list[str]
    comment: str
    outputs: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"{_display(self.file)}:{self.line}"


class ParseError(Exception):
    """An argument that the command's own parser refuses."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise ParseError(message)


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def split_comment(text: str) -> tuple[str, str]:
    """(code, comment): a ``#`` at the start of a word, outside quotes, starts the comment."""
    quote = ""
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index], text[index + 1:].strip()
    return text, ""


def logical_lines(path: Path) -> list[tuple[int, str, int]]:
    """(line number, text, block id) of every command line: continuations joined, comment-only lines dropped.
    Lines outside a fenced block get block id -1 (no shared variables)."""
    lines = path.read_text().splitlines()
    result: list[tuple[int, str, int]] = []
    fence, info, block = "", "", 0
    index = 0
    while index < len(lines):
        raw = lines[index]
        stripped = raw.strip()
        if stripped.startswith(("```", "~~~")):
            if not fence:
                fence, info, block = stripped[:3], stripped[3:].strip().lower(), block + 1
            elif stripped.startswith(fence):
                fence = ""
            index += 1
            continue
        if (fence and info in SHELL_BLOCKS) or (not fence and COMMAND_START.match(raw)):
            start, text = index + 1, raw
            while text.rstrip().endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text.rstrip()[:-1] + " " + lines[index].strip()
            if text.strip() and not text.strip().startswith("#"):
                result.append((start, text, block if fence else -1))
        index += 1
    return result


def needs_of(comment: str) -> str:
    """What a trailing ``# ... needs: X (why)`` comment names: inputs the file does not make itself."""
    return comment.split("needs:", 1)[1] if "needs:" in comment else ""


def _expand(text: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def extract(path: Path) -> tuple[list[Command], list[str]]:
    """Every simple command of a markdown file, and the problems found while reading them (cd, unknown $VAR)."""
    commands: list[Command] = []
    problems: list[str] = []
    variables: dict[str, str] = {}
    loop_variables: set[str] = set()
    current_block = None
    for number, text, block in logical_lines(path):
        if block != current_block or block == -1:
            variables, loop_variables, current_block = {}, set(), block
        code, comment = split_comment(text)
        needs = needs_of(comment)
        for placeholder in PLACEHOLDER.findall(code):
            if placeholder not in needs:
                problems.append(f"{_display(path)}:{number}: placeholder {placeholder} cannot run as written "
                                "(say what it stands for after '# needs:')")
        code = PLACEHOLDER.sub("PLACEHOLDER", code)
        lexer = shlex.shlex(_expand(code, variables), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as error:
            problems.append(f"{_display(path)}:{number}: cannot split the command ({error})")
            continue
        for words in _simple_commands(tokens):
            if words[0] == "for" and len(words) >= 3 and words[2] == "in":
                loop_variables.add(words[1])
                continue
            if words[0] == "do":
                words = words[1:]
            if not words or words == ["done"]:
                continue
            if words[0] == "export":
                for item in words[1:]:
                    if match := ASSIGNMENT.match(item):
                        variables[match.group(1)] = _expand(match.group(2), variables)
                continue
            words, outputs = _redirections(words)
            for name in {m.group(1) for w in words for m in VARIABLE.finditer(w)}:
                if name not in DOCUMENTED_VARIABLES | loop_variables | variables.keys():
                    problems.append(f"{_display(path)}:{number}: ${name} is neither defined in its block nor "
                                    "one of the variables the preamble documents")
            commands.append(Command(path, number, words, comment, outputs))
    return commands, problems


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    commands, current = [], []
    for token in tokens:
        if token in (";", "&&", "||", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def _redirections(words: list[str]) -> tuple[list[str], list[str]]:
    """The words without ``> FILE`` / ``2> FILE``, and the files they write."""
    kept, outputs, index = [], [], 0
    while index < len(words):
        if words[index] in (">", ">>"):
            if kept and kept[-1].isdigit():
                kept.pop()
            if index + 1 < len(words):
                outputs.append(words[index + 1])
            index += 2
            continue
        kept.append(words[index])
        index += 1
    return kept, outputs


def _looks_like_path(value: str) -> bool:
    if not value or value.startswith("-") or "=" in value or "," in value or "{" in value or "$" in value:
        return False
    return "/" in value or Path(value).suffix in PATH_SUFFIXES


class Checker:
    """Checks the commands of one markdown file in order, remembering what earlier commands write."""

    def __init__(self, path: Path):
        self.path = path
        self.produced: list[str] = []
        self.problems: list[str] = []

    def problem(self, command: Command, message: str) -> None:
        self.problems.append(f"{command.where()}: {message}")

    def run(self) -> list[str]:
        commands, problems = extract(self.path)
        self.problems += problems
        for command in commands:
            self.check(command)
        return self.problems

    # --- paths -------------------------------------------------------------------------------------
    def _produced(self, value: str) -> bool:
        value = value.rstrip("/")
        for output in self.produced:
            if VARIABLE.fullmatch(output):          # --out $FIXTURE: a documented placeholder, not a wildcard
                continue
            output = VARIABLE.sub("*", output.rstrip("/"))
            if value == output or value.startswith(output + "/") or fnmatch.fnmatch(output, value) \
                    or fnmatch.fnmatch(value, output) or output.startswith(value + "/"):
                return True
        return False

    def require(self, command: Command, value: str, what: str = "path") -> None:
        """A path the command reads must exist, be fetched by make, or be written by an earlier command."""
        value = value[2:] if value.startswith("./") else value
        needs = needs_of(command.comment)
        if needs and value in needs:
            return
        if self._produced(value) or value in ARTIFACTS:
            return
        if not value.startswith(("/", "~")) and (any(ROOT.glob(value)) if "*" in value else (ROOT / value).exists()):
            return
        self.problem(command, f"{what} {value!r} does not exist and no earlier command in this file writes it "
                              "(annotate the command with '# needs: ...' if it is a scratch file)")

    def check_values(self, command: Command, values: list[str]) -> None:
        for value in values:
            if _looks_like_path(value):
                self.require(command, value)

    # --- one command -------------------------------------------------------------------------------
    def check(self, command: Command) -> None:
        words = list(command.words)
        environment = {}
        while words and (match := ASSIGNMENT.match(words[0])):
            environment[match.group(1)] = match.group(2)
            words = words[1:]
        for name in environment:
            if any(re.search(rf"\$\{{?{name}\b", word) for word in words):
                self.problem(command, f"${name} is read on the line that sets it: the shell expands it before "
                                      "the assignment takes effect")
        for entry in environment.get("PYTHONPATH", "").split(":"):
            if entry and entry != "PLACEHOLDER" and "$" not in entry:
                self.require(command, entry, "PYTHONPATH entry")
        if words[:1] == ["nice"]:
            words = words[3:] if words[1:2] == ["-n"] else words[1:]
        if not words:
            return
        program, arguments = words[0], words[1:]
        if program == "cd":
            self.problem(command, "'cd': every command runs from the repository root as written")
            return
        if program in BARE:
            self.problem(command, f"bare '{program}': write {BARE[program]} (the checkout's venv, `make venv`), "
                                  "so the command runs as written without an activated venv")
            program = BARE[program]
        if program == LRCOMPRESS:
            self.check_lrcompress(command, arguments)
        elif program == PYTHON:
            self.check_python(command, arguments)
        elif program == "bash":
            if arguments:
                self.require(command, arguments[0], "script")
        elif program in EXTERNAL or "$" in program:
            outputs = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a in OUTPUT_FLAGS]
            self.check_values(command, [a for a in arguments if a not in outputs])
            command.outputs += outputs
        else:
            self.problem(command, f"unknown program {program!r}")
        self.produced += command.outputs

    def check_python(self, command: Command, arguments: list[str]) -> None:
        if arguments[:2] == ["-m", "lrcompress"]:
            self.check_lrcompress(command, arguments[2:])
        elif arguments[:2] == ["-m", "pytest"]:
            self.check_values(command, [a.split("::")[0] for a in arguments[2:] if not a.startswith("-")])
        elif arguments and arguments[0].endswith(".py"):
            self.check_script(command, arguments[0], arguments[1:])
        else:
            self.problem(command, f"cannot tell what '{' '.join(arguments[:2])}' runs")

    # --- bench and scripts/ -----------------------------------------------------------------------
    def check_script(self, command: Command, script: str, arguments: list[str]) -> None:
        path = ROOT / script
        if script.startswith(("/", "..")) or not path.is_file():
            self.problem(command, f"script {script!r} is not a file of the repository")
            return
        if script == "bench/byte_identity.py":
            self.check_byte_identity(command, arguments)
            return
        if script == "bench/inference_table.py":
            self.check_values(command, arguments)
            return
        try:
            parser = rebuild_parser(path)
        except ValueError as error:
            self.problem(command, f"{script}: {error}")
            return
        try:
            parsed = parser.parse_args(arguments)
        except ParseError as error:
            self.problem(command, f"{script}: {error}")
            return
        outputs = [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a in OUTPUT_FLAGS]
        self.check_values(command, [a for a in arguments if a not in outputs])
        command.outputs += outputs
        if hasattr(parsed, "out") and "--out" not in arguments and parsed.out is not None:
            command.outputs.append(str(parsed.out))

    def check_byte_identity(self, command: Command, arguments: list[str]) -> None:
        usage = {"tiny": "tiny MODELS OUT", "compare": "compare A B"}
        if len(arguments) != 3 or arguments[0] not in usage:
            self.problem(command, f"bench/byte_identity.py takes {' or '.join(usage.values())}")
        elif arguments[0] == "tiny":
            command.outputs += arguments[1:]
        else:
            for value in arguments[1:]:
                self.require(command, value)

    # --- lrcompress -------------------------------------------------------------------------------
    def check_lrcompress(self, command: Command, arguments: list[str]) -> None:
        import click
        from lrcompress.cli.main import cli

        try:
            root = cli.make_context("lrcompress", list(arguments), resilient_parsing=False)
            rest = [*(getattr(root, "_protected_args", None) or getattr(root, "protected_args", [])), *root.args]
            name, subcommand, rest = cli.resolve_command(root, rest)
            context = subcommand.make_context(name, rest, parent=root)
        except click.ClickException as error:
            self.problem(command, f"lrcompress {' '.join(arguments[:1])}: {error.format_message()}")
            return
        params = context.params
        for key in ("output", "output_dir", "json_path"):
            if params.get(key) is not None:
                command.outputs.append(str(params[key]))
        inputs = [str(v) for k, v in params.items() if k not in ("output", "output_dir", "json_path")
                  and isinstance(v, (str, Path))]
        inputs += [str(v) for value in params.values() if isinstance(value, tuple) for v in value
                   if isinstance(v, (str, Path))]
        if name == "run":
            self.check_recipe(command, str(params["recipe"]), list(params.get("overrides") or ()))
            inputs = [v for v in inputs if v != str(params["recipe"])]
        self.check_values(command, inputs)

    def check_recipe(self, command: Command, recipe: str, overrides: list[str]) -> None:
        from lrcompress.recipe import RecipeError, load_recipe

        needs = needs_of(command.comment)
        if (needs and recipe in needs) or self._produced(recipe):
            return
        if not (ROOT / recipe).is_file():
            self.require(command, recipe, "recipe")
            return
        try:
            loaded = load_recipe(ROOT / recipe, overrides)
        except RecipeError as error:
            self.problem(command, f"recipe {recipe} with its --set overrides: {error}")
            return
        except Exception as error:  # noqa: BLE001 - a loader bug is still this command's problem, not a crash
            self.problem(command, f"recipe {recipe}: loading it raised {type(error).__name__}: {error}")
            return
        command.outputs.append(str(loaded.output.dir))


def rebuild_parser(script: Path) -> argparse.ArgumentParser:
    """The script's argparse parser, rebuilt from its ``add_argument`` calls without importing the script
    (importing a bench script loads torch and the whole package; this needs neither)."""
    tree = ast.parse(script.read_text(), str(script))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"]
    if not calls or any(isinstance(node, ast.Attribute) and node.attr == "add_subparsers" for node in ast.walk(tree)):
        raise ValueError("no plain argparse parser to read its arguments from")
    parser = _Parser(prog=_display(script), add_help=True)
    for call in calls:
        try:
            names = [ast.literal_eval(arg) for arg in call.args]
        except ValueError:
            raise ValueError(f"line {call.lineno}: an argument name that is not a literal") from None
        options = {}
        for keyword in call.keywords:
            if keyword.arg in ("action", "nargs", "choices", "required", "dest", "const"):
                try:
                    options[keyword.arg] = ast.literal_eval(keyword.value)
                except ValueError:
                    if keyword.arg == "action":
                        raise ValueError(f"line {call.lineno}: action {ast.unparse(keyword.value)} is not a name "
                                         "this checker knows") from None
            elif keyword.arg == "type":
                options["type"] = TYPES.get(ast.unparse(keyword.value), str)
        parser.add_argument(*names, **options)
    return parser


def default_files() -> list[Path]:
    return [ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "bench" / "history").glob("*.md"))]


def check_files(files: list[Path]) -> tuple[int, list[str]]:
    """(commands checked, problems) over the files, each file on its own (outputs do not cross files)."""
    count, problems = 0, []
    for path in files:
        checker = Checker(path)
        problems += checker.run()
        count += len(extract(path)[0])
    return count, problems


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))           # check against this checkout's lrcompress, not another install
    files = [Path(a).resolve() for a in (argv if argv is not None else sys.argv[1:])] or default_files()
    count, problems = check_files(files)
    for problem in problems:
        print(problem)
    print(f"{count} commands in {len(files)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
