"""Every documented command runs as written: each `python X.py ...` or `python -m
synthetic.coco ...` in README.md, docs/*.md and gpu/README.md, in fenced code blocks and in
inline code spans (also those that wrap onto the next line), is parsed by that script's own
get_args_parser() and, where the script has one, checked by its resolve_args(), without
running anything. A documented script that is not in the repository, an option the parser
refuses (misspelt, or a required one missing) and a combination resolve_args() refuses are
failures; every failing command of a file is reported at once, with file:line.

The shell syntax of the docs is understood: `\\` continuations, environment prefixes
(`CUDA_VISIBLE_DEVICES=$i python ...`), wrappers (`/usr/bin/time -v`, `env`, `exec`,
`nohup`), redirections (`> seed$i.log 2>&1`), separators (`&&`, `||`, `;`, `|`, `&`),
trailing comments, `for ...; do ... done` loops; a shell variable ($i, ${X}, "$X") becomes
the string 0, so that an int option still parses. Commands that are not this repository's
(`python -m pytest`, `python -m pip`, `python -c`, `pip`, `sbatch`, ...) are skipped.
"""
import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))) \
    + ["gpu/README.md"]

SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh", "shell-session"}
PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(\{[^}]*\}|\([^)]*\)|[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])")
OPERATOR_CHARS = set("();<>|&")
# Words that open or continue a compound command; what follows them is the command.
PREFIX_WORDS = {"do", "then", "else", "elif", "if", "while", "until", "!", "{", "(", "exec", "nohup", "command"}
# Words after which nothing is a command of ours (a loop's header, a compound's end).
HEADER_WORDS = {"for", "select", "case", "done", "fi", "esac", "}", ")", "function"}
TIME_OPTIONS_WITH_VALUE = {"-o", "-f", "--output", "--format"}
PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}


@dataclass
class Command:
    source: str        # the markdown file, relative to the repository
    line: int          # where the command (or its code span) starts
    written: str       # the command as written (a code span's line break as a space)
    kind: str = None   # "script" (python X.py) or "module" (python -m X); None: not parsed
    target: str = ""   # the script's path as written, or the module's name
    argv: list = None  # the arguments after the script or module
    problem: str = None  # why it could not be read as a command

    def where(self):
        return f"{self.source}:{self.line}"


# --- reading markdown ---------------------------------------------------------------------

def code_blocks_and_spans(text):
    """(line, code, in_block) for every logical line of a fenced code block whose language
    is a shell's (or none), `\\`-continued lines joined, and for every inline code span
    outside the blocks, a span's line breaks turned into spaces (line: where it opens)."""
    lines = text.split("\n")
    out, prose = [], []  # prose: (line number, text) of the lines outside the code blocks
    i = 0
    while i < len(lines):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)", lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, language = m.group(1), m.group(2).lower()
        prose.append((i + 1, ""))  # a block ends a paragraph
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^ {0,3}" + fence[0] + "{" + str(len(fence)) + r",}\s*$", lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1  # the closing fence
        if language in SHELL_FENCES:
            out.extend((n, code, True) for n, code in logical_lines(body))
    out.extend((n, code, False) for n, code in inline_spans(prose))
    return sorted(out, key=lambda t: t[0])


def logical_lines(numbered):
    """Join each line that ends in a backslash with the next one."""
    out, start, parts = [], None, []
    for n, line in numbered:
        if start is None:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.endswith("\\\\"):
            parts.append(stripped[:-1])
            continue
        parts.append(line)
        code = " ".join(p.strip() for p in parts).strip()
        if code.startswith("$ "):  # a console prompt
            code = code[2:]
        out.append((start, code))
        start, parts = None, []
    if parts:
        out.append((start, " ".join(p.strip() for p in parts).strip()))
    return out


def paragraphs(prose):
    """Group the lines outside code blocks into the runs a code span may cross: a blank
    line, a heading, a table row or a new list item starts a new one."""
    group = []
    for n, line in prose:
        starts_block = (not line.strip() or line.lstrip().startswith(("#", "|"))
                        or re.match(r"^\s*([-*+]|\d+[.)])\s", line))
        if starts_block and group:
            yield group
            group = []
        if line.strip():
            group.append((n, line))
        if line.lstrip().startswith(("#", "|")):  # a heading or table row stands alone
            yield group
            group = []
    if group:
        yield group


def inline_spans(prose):
    """CommonMark code spans: a run of n backticks up to the next run of exactly n."""
    out = []
    for group in paragraphs(prose):
        text = "\n".join(line for _, line in group)
        starts = [0]
        for _, line in group:
            starts.append(starts[-1] + len(line) + 1)
        i = 0
        while i < len(text):
            if text[i] == "\\" and i + 1 < len(text):
                i += 2
                continue
            if text[i] != "`":
                i += 1
                continue
            j = i
            while j < len(text) and text[j] == "`":
                j += 1
            run = text[i:j]
            close = re.compile(r"(?<!`)" + run + r"(?!`)").search(text, j)
            if not close:
                i = j  # an unmatched run is literal text
                continue
            code = text[j:close.start()].replace("\n", " ")
            if code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            line_index = max(k for k, s in enumerate(starts) if s <= i)
            out.append((group[line_index][0], code))
            i = close.end()
    return out


# --- reading shell ------------------------------------------------------------------------

def expand(code):
    """The code with each shell variable (outside single quotes) replaced by 0, and the file
    descriptor of a redirection (the 2 of 2>&1) dropped; a comment is left as it is."""
    out, i, quote, word_start = [], 0, None, True
    while i < len(code):
        c = code[i]
        if quote == "'":
            quote = None if c == "'" else quote
            out.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < len(code):
            out.append(code[i:i + 2])
            i, word_start = i + 2, False
            continue
        if quote is None and c == "#" and word_start:
            out.append(code[i:])
            break
        if c == "$":
            m = VARIABLE.match(code, i)
            if m:
                out.append("0")
                i, word_start = m.end(), False
                continue
        if quote == '"':
            quote = None if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif word_start and c.isdigit():
            m = re.compile(r"\d+(?=[<>])").match(code, i)
            if m:
                i = m.end()
                continue
        out.append(c)
        word_start = quote is None and (c.isspace() or c in OPERATOR_CHARS)
        i += 1
    return "".join(out)


def simple_commands(code):
    """The words of each simple command in code, redirections and comments left out.
    Raises ValueError when the code does not split (an unclosed quote)."""
    lexer = shlex.shlex(expand(code), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, tokens = [], [], list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token and set(token) <= OPERATOR_CHARS:
            if "<" in token or ">" in token:
                i += 2  # the operator and its target
                continue
            commands.append(words)  # ; & && || | |& ( )
            words = []
        else:
            words.append(token)
        i += 1
    commands.append(words)
    return [w for w in commands if w]


def strip_prefixes(words):
    """The command after keywords, VAR=value assignments and wrappers (env, time,
    /usr/bin/time -v, exec, nohup); [] for a loop header or a compound's end."""
    words = list(words)
    while words:
        w = words[0]
        if w in HEADER_WORDS:
            return []
        if w in PREFIX_WORDS or ASSIGNMENT.match(w):
            words.pop(0)
        elif w == "env":
            words.pop(0)
            while words and (words[0].startswith("-") or ASSIGNMENT.match(words[0])):
                option = words.pop(0)
                if option in ("-u", "--unset", "-C", "--chdir") and words:
                    words.pop(0)
        elif os.path.basename(w) == "time":
            words.pop(0)
            while words and words[0].startswith("-"):
                option = words.pop(0)
                if option in TIME_OPTIONS_WITH_VALUE and words:
                    words.pop(0)
        else:
            break
    return words


def python_invocation(words):
    """(kind, target, argv) when words start Python on a script or module, else None:
    ("script", "path/x.py", argv), ("module", "pkg.mod", argv), or ("other", ...) for
    python -c, python - and an interactive python."""
    if not words or not PYTHON.match(os.path.basename(words[0])):
        return None
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-":
        option = rest.pop(0)
        if option.startswith("-m"):
            module = option[2:] or (rest.pop(0) if rest else "")
            return "module", module, rest
        if option.startswith("-c"):
            return "other", "-c", rest
        if option in PYTHON_OPTIONS_WITH_VALUE and rest:
            rest.pop(0)
    if not rest or rest[0] == "-":
        return "other", "", rest
    return "script", rest[0], rest[1:]


def is_our_module(name):
    """A module whose top-level package or module is in the repository (python -m pytest,
    pip and venv are not)."""
    top = name.split(".")[0]
    return bool(top) and (os.path.isfile(os.path.join(ROOT, top + ".py"))
                          or os.path.isfile(os.path.join(ROOT, top, "__init__.py")))


def extract_commands(text, source):
    """Every command in the markdown text that starts a script or module of this
    repository, as Commands; a code line that mentions python and does not split is a
    Command with its problem."""
    found = []
    for line, code, _ in code_blocks_and_spans(text):
        if "python" not in code:
            continue
        try:
            commands = simple_commands(code)
        except ValueError as e:
            found.append(Command(source, line, code, problem=f"does not split as a shell command ({e})"))
            continue
        for words in commands:
            invocation = python_invocation(strip_prefixes(words))
            if invocation is None:
                continue
            kind, target, argv = invocation
            if kind == "script" and target.endswith(".py") or kind == "module" and is_our_module(target):
                found.append(Command(source, line, code, kind, target, argv))
    return found


# --- checking a command against its script's parser ---------------------------------------

_modules = {}


@contextlib.contextmanager
def script_context(command):
    """sys.path with the repository and the script's folder first, and sys.argv as the
    command would set it; both restored afterwards."""
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    if command.kind == "module":
        sys.path[:0] = [ROOT]
        sys.argv = [command.target, *command.argv]
    else:
        path = os.path.join(ROOT, command.target)
        sys.path[:0] = [os.path.dirname(path), ROOT]
        sys.argv = [path, *command.argv]
    try:
        yield
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv


def load(command):
    """The module a command starts, imported once (a script from its path, under a name
    of its own, so that its __main__ block does not run), or a RuntimeError."""
    key = (command.kind, command.target)
    if key not in _modules:
        try:
            with script_context(command), contextlib.redirect_stdout(io.StringIO()):
                if command.kind == "module":
                    _modules[key] = importlib.import_module(command.target)
                else:
                    name = "docs_command_" + re.sub(r"\W", "_", command.target)
                    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, command.target))
                    module = importlib.util.module_from_spec(spec)
                    sys.modules[name] = module
                    try:
                        spec.loader.exec_module(module)
                    except BaseException:
                        del sys.modules[name]
                        raise
                    _modules[key] = module
        except BaseException as e:  # a SystemExit too, from a script that runs on import
            _modules[key] = e
    if isinstance(_modules[key], BaseException):
        e = _modules[key]
        raise RuntimeError(f"importing it failed: {type(e).__name__}: {e}")
    return _modules[key]


def argparse_message(stderr):
    """argparse's own error line(s) ('prog: error: ...'), else the last line printed."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    return " ".join(errors) if errors else (lines[-1] if lines else "")


def check(command):
    """Why the command would fail, in one line; None when its script's parser (and its
    resolve_args) accept it."""
    if command.problem:
        return command.problem
    if command.kind == "script" and not os.path.isfile(os.path.join(ROOT, command.target)):
        return f"{command.target} is not in the repository"
    if command.kind == "module":
        parts = command.target.split(".")
        if not (os.path.isfile(os.path.join(ROOT, *parts) + ".py")
                or os.path.isfile(os.path.join(ROOT, *parts, "__main__.py"))):
            return f"module {command.target} is not in the repository"
    try:
        module = load(command)
    except RuntimeError as e:
        return str(e)
    if not hasattr(module, "get_args_parser"):
        return f"{command.target} has no get_args_parser() to check the command with"
    stderr = io.StringIO()
    try:
        with script_context(command), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(stderr):
            parser = module.get_args_parser()
            args = parser.parse_args(command.argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            return None
        return argparse_message(stderr.getvalue()) or f"argparse exited with status {e.code}"
    except Exception as e:
        return f"get_args_parser().parse_args() raised {type(e).__name__}: {e}"
    if hasattr(module, "resolve_args"):
        try:
            with script_context(command), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                module.resolve_args(args)
        except SystemExit as e:
            return f"resolve_args() exited with status {e.code}"
        except Exception as e:
            return f"resolve_args() refused it: {type(e).__name__}: {e}"
    return None


def failures(commands):
    return [f"{c.where()}: {c.written}\n    {reason}" for c in commands for reason in [check(c)] if reason]


# --- the tests ----------------------------------------------------------------------------

def commands_of(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return extract_commands(f.read(), doc)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_documented_commands_parse(doc):
    commands = commands_of(doc)
    problems = failures(commands)
    if problems:
        pytest.fail(f"{len(problems)} of the {len(commands)} commands in {doc} would not run as written:\n"
                    + "\n".join(problems), pytrace=False)


def test_the_docs_have_commands():
    """The extractor finds the docs' commands at all (a broken one would pass every file)."""
    found = {doc: commands_of(doc) for doc in DOC_FILES}
    assert all(os.path.isfile(os.path.join(ROOT, doc)) for doc in DOC_FILES)
    targets = {c.target for commands in found.values() for c in commands}
    assert {"hw5_main.py", "train.py", "Dataset.py", "predict.py", "synthetic.coco", "gpu/first_run.py"} <= targets
    assert sum(map(len, found.values())) >= 40


MARKDOWN = r"""# A made-up page

```bash
python train.py --data_dir D \
    --out_dir O   # a comment
for i in 0 1 2; do
  CUDA_VISIBLE_DEVICES=$i python hw5_main.py --seeds 0 1 2 \
      --seed_index $i > seed$i.log 2>&1 &
done; wait
/usr/bin/time -v python hw5_main.py --demo --out_dir "${OUT}" && python -m pytest -q
python -m synthetic.coco --out_dir x | tee log; pip install y
exec python gpu/first_run.py --out_dir "$SLURM_ARRAY_TASK_ID" --thumbs 'a b'
sbatch gpu/seeds.sbatch DATA OUT   # then: python hw5_main.py --out_dir OUT --aggregate
python -c "import torch; print(torch.__version__)"; python -m pip install z
```

```json
{"note": "python train.py --not_a_command"}
```

Text with `python network.py > model_sum.txt` and a span that wraps, `ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 python hw5_main.py --demo --out_dir OUT`, then `--device cpu`,
`hw5_main.py --resume` (a fragment, no python) and ``python missing/nothere.py --x``.

| table | `python predict.py --weights W P` |
"""


def test_extractor_on_each_syntax():
    got = [(c.line, c.kind, c.target, c.argv) for c in extract_commands(MARKDOWN, "made-up.md")]
    assert got == [
        (4, "script", "train.py", ["--data_dir", "D", "--out_dir", "O"]),                    # continuation, comment
        (7, "script", "hw5_main.py", ["--seeds", "0", "1", "2", "--seed_index", "0"]),     # for loop, env, redirection
        (10, "script", "hw5_main.py", ["--demo", "--out_dir", "0"]),                       # /usr/bin/time -v, ${OUT}
        (11, "module", "synthetic.coco", ["--out_dir", "x"]),                              # -m, pipe, ;
        (12, "script", "gpu/first_run.py", ["--out_dir", "0", "--thumbs", "a b"]),         # exec, "$VAR", quotes
        (21, "script", "network.py", []),                                                  # inline, > file
        (21, "script", "hw5_main.py", ["--demo", "--out_dir", "OUT"]),                     # wrapped span, env
        (23, "script", "missing/nothere.py", ["--x"]),                                     # `` span
        (25, "script", "predict.py", ["--weights", "W", "P"]),                             # table cell
    ]
    assert extract_commands(MARKDOWN, "made-up.md")[1].written == (
        "CUDA_VISIBLE_DEVICES=$i python hw5_main.py --seeds 0 1 2 --seed_index $i > seed$i.log 2>&1 &")


def test_extractor_reports_a_line_it_cannot_split():
    [command] = extract_commands("```bash\npython train.py --data_dir 'D\n```\n", "x.md")
    assert command.line == 2 and "does not split" in check(command)


@pytest.mark.parametrize("written, expected", [
    ("python hw5_main.py --demo --out_dir OUT", None),
    ("python hw5_main.py --help", None),
    ("python -m synthetic.coco --out_dir x --n_train 3", None),
    ("python hw5_main.py --out_dir OUT", ["resolve_args() refused it", "--data_dir"]),  # neither data nor --demo
    ("python hw5_main.py --demo --out_dir OUT --seed_index 1", ["resolve_args() refused it", "--seed_index"]),
    ("python train.py --data_dir D --out_dir O --epoch_count 3", ["error: unrecognized arguments: --epoch_count 3"]),
    ("python train.py --epochs 2", ["error: the following arguments are required: --data_dir, --out_dir"]),
    ("python train.py --data_dir D --out_dir O --epochs two", ["--epochs: invalid int value: 'two'"]),
    ("python missing/nothere.py --x", ["missing/nothere.py is not in the repository"]),
    ("python -m synthetic.nothere", ["module synthetic.nothere is not in the repository"]),
])
def test_check_catches(written, expected):
    [command] = extract_commands(f"`{written}`", "x.md")
    reason = check(command)
    if expected is None:
        assert reason is None, reason
    else:
        assert reason and all(part in reason for part in expected), reason
