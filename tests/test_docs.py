"""Every documented command runs as written: each `python X.py ...` or `python -m synthetic.coco
...` in README.md, docs/*.md and gpu/README.md, in ```bash blocks and in inline code spans (also
those that wrap onto the next line), is parsed by that script's own get_args_parser() and, where
the script has one, checked by its resolve_args(), without running anything. A script that is not
in the repository, an option the parser refuses and a combination resolve_args() refuses are
failures; every failing command of a file is reported at once, with file:line.

Only the shell syntax the docs use is understood: `\\` continuations, `VAR=value` prefixes,
`/usr/bin/time -v`, redirections (`> seed$i.log 2>&1`), separators (`&&`, `;`, `|`, `&`),
comments and `for ...; do ... done` loops. A shell variable ($i, ${X}, "$X") becomes 0, so that
an int option still parses. Commands that are not this repository's (`python -m pytest`,
`python -c`, `pip`, `sbatch`, ...) are skipped.
"""
import collections
import contextlib
import functools
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md")),
             "gpu/README.md"]
SHELL_FENCES = {"", "bash", "sh", "shell"}
# A run of n backticks up to the next run of exactly n (CommonMark); it may span lines.
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
OPERATOR_CHARS = set("();<>|&")

# kind: "script" (python X.py) or "module" (python -m X); target: the script's path or the
# module's name; argv: what follows it; problem: why the code could not be read as a command.
Command = collections.namedtuple("Command", "source line written kind target argv problem",
                                 defaults=(None, None, None, None))


# --- reading markdown and shell ------------------------------------------------------------

def code_lines(text):
    """(line, code) for each line of a shell code block, `\\`-continued lines joined, and for
    each inline code span outside the blocks, its line breaks as spaces."""
    lines, found = text.split("\n"), []
    prose = list(lines)  # the text outside code blocks; a block's lines left blank end a paragraph
    fence, pending = None, None  # the open block's language; a continued line's (start, code)
    for n, line in enumerate(lines, 1):
        m = re.match(r"\s*```\s*(\w*)", line)
        if m or fence is not None:
            prose[n - 1] = ""
        if m:
            fence = m.group(1).lower() if fence is None else None
        elif fence in SHELL_FENCES:
            start, before = pending or (n, "")
            code = f"{before} {line.strip()}".strip()
            pending = (start, code[:-1].rstrip()) if code.endswith("\\") else None
            if not pending:
                found.append((start, code))
    # A paragraph, list item, heading or table row: the lines a code span may cross.
    paragraphs = []
    for n, line in enumerate(prose, 1):
        if (not paragraphs or not line.strip() or re.match(r"\s*([#|]|[-*+] |\d+[.)] )", line)
                or paragraphs[-1][1].lstrip().startswith(("#", "|"))):
            paragraphs.append([n, line])
        else:
            paragraphs[-1][1] += "\n" + line
    for n, paragraph in paragraphs:
        found.extend((n + paragraph.count("\n", 0, m.start()), m.group(2).replace("\n", " ").strip())
                     for m in SPAN.finditer(paragraph))
    return sorted(found, key=lambda t: t[0])


def simple_commands(code):
    """The words of each simple command in code, redirections and comments left out; a
    ValueError when it does not split (an unclosed quote)."""
    code = re.sub(r"\$(\{[^}]*\}|\w+)", "0", code)
    code = re.sub(r"(?<!\S)\d+(?=[<>])", "", code)  # the 2 of 2>&1
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, tokens = [[]], iter(list(lexer))
    for token in tokens:
        if not token or not set(token) <= OPERATOR_CHARS:
            commands[-1].append(token)
        elif "<" in token or ">" in token:
            next(tokens, None)  # the redirection's target
        else:
            commands.append([])  # ; & && || | ( )
    return [words for words in commands if words]


def extract_commands(text, source):
    """Every command in the markdown text that starts a script or module of this repository;
    a code line that mentions python and does not split is a Command with its problem."""
    found = []
    for line, code in code_lines(text):
        if "python" not in code:
            continue
        try:
            commands = simple_commands(code)
        except ValueError as e:
            found.append(Command(source, line, code, problem=f"does not split as a shell command ({e})"))
            continue
        for words in commands:
            while words and (words[0] == "do" or ASSIGNMENT.match(words[0])):
                words = words[1:]
            if words and os.path.basename(words[0]) == "time":  # /usr/bin/time -v
                words = words[1:]
                while words and words[0].startswith("-"):
                    words = words[1:]
            if len(words) < 2 or not re.fullmatch(r"python3?", words[0]):
                continue
            if words[1].endswith(".py"):
                found.append(Command(source, line, code, "script", words[1], words[2:]))
            elif words[1] == "-m" and len(words) > 2:
                top = words[2].split(".")[0]  # ours, not pytest, pip or venv
                if (os.path.isfile(os.path.join(ROOT, top + ".py"))
                        or os.path.isfile(os.path.join(ROOT, top, "__init__.py"))):
                    found.append(Command(source, line, code, "module", words[2], words[3:]))
    return found


# --- checking a command against its script's parser -----------------------------------------

@functools.cache
def load(kind, target):
    """The module, imported once; a script under a name of its own, so its __main__ block
    does not run."""
    if kind == "module":
        return importlib.import_module(target)
    name = "docs_command_" + re.sub(r"\W", "_", target)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, target))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(command):
    """Why the command would fail, in one line; None when its script's parser (and its
    resolve_args) accept it."""
    if command.problem:
        return command.problem
    path = os.path.join(ROOT, command.target)
    if command.kind == "module":
        path = os.path.join(ROOT, *command.target.split("."))
        path = path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__main__.py")
    if not os.path.isfile(path):
        return f"{command.target} is not in the repository"
    stage, stderr = "importing it", io.StringIO()
    try:
        with mock.patch.object(sys, "path", [os.path.dirname(path), ROOT, *sys.path]), \
                mock.patch.object(sys, "argv", [path, *command.argv]), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            module = load(command.kind, command.target)
            stage = "get_args_parser().parse_args()"
            args = module.get_args_parser().parse_args(command.argv)
            stage = "resolve_args()"
            if hasattr(module, "resolve_args"):
                module.resolve_args(args)
    except SystemExit as e:  # argparse's error, its --help, or a script that exits on import
        if stage.startswith("get_args") and e.code in (0, None):
            return None
        errors = [line for line in stderr.getvalue().splitlines() if ": error: " in line]
        return " ".join(errors) or f"{stage} exited with status {e.code}"
    except Exception as e:
        return f"{stage} refused it: {type(e).__name__}: {e}"
    return None


# --- the tests ------------------------------------------------------------------------------

def commands_of(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return extract_commands(f.read(), doc)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_documented_commands_parse(doc):
    commands = commands_of(doc)
    problems = [f"{c.source}:{c.line}: {c.written}\n    {reason}"
                for c in commands for reason in [check(c)] if reason]
    if problems:
        pytest.fail(f"{len(problems)} of the {len(commands)} commands in {doc} would not run as written:\n"
                    + "\n".join(problems), pytrace=False)


def test_the_docs_have_commands():
    """The extractor finds the docs' commands at all (a broken one would pass every file)."""
    found = [c for doc in DOC_FILES for c in commands_of(doc)]
    assert {"hw5_main.py", "train.py", "Dataset.py", "predict.py", "synthetic.coco", "gpu/first_run.py"} \
        <= {c.target for c in found}
    assert len(found) >= 40


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
python gpu/first_run.py --out_dir "$SLURM_ARRAY_TASK_ID" --thumbs 'a b'
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
        (4, "script", "train.py", ["--data_dir", "D", "--out_dir", "O"]),               # \, comment
        (7, "script", "hw5_main.py", ["--seeds", "0", "1", "2", "--seed_index", "0"]),  # for, env, >, 2>&1
        (10, "script", "hw5_main.py", ["--demo", "--out_dir", "0"]),                    # time -v, ${OUT}
        (11, "module", "synthetic.coco", ["--out_dir", "x"]),                           # -m, |, ;
        (12, "script", "gpu/first_run.py", ["--out_dir", "0", "--thumbs", "a b"]),      # "$VAR", quotes
        (21, "script", "network.py", []),                                               # inline, > file
        (21, "script", "hw5_main.py", ["--demo", "--out_dir", "OUT"]),                  # wrapped span, env
        (23, "script", "missing/nothere.py", ["--x"]),                                  # `` span
        (25, "script", "predict.py", ["--weights", "W", "P"]),                          # table cell
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
    ("python hw5_main.py --out_dir OUT", ["resolve_args() refused it", "--data_dir"]),  # no data, no --demo
    ("python hw5_main.py --demo --out_dir OUT --seed_index 1", ["resolve_args() refused it", "--seed_index"]),
    ("python train.py --data_dir D --out_dir O --epoch_count 3",
     ["error: unrecognized arguments: --epoch_count 3"]),
    ("python train.py --epochs 2", ["error: the following arguments are required: --data_dir, --out_dir"]),
    ("python train.py --data_dir D --out_dir O --epochs two", ["--epochs: invalid int value: 'two'"]),
    ("python missing/nothere.py --x", ["missing/nothere.py is not in the repository"]),
    ("python -m synthetic.nothere", ["synthetic.nothere is not in the repository"]),
])
def test_check_catches(written, expected):
    [command] = extract_commands(f"`{written}`", "x.md")
    reason = check(command)
    if expected is None:
        assert reason is None, reason
    else:
        assert reason and all(part in reason for part in expected), reason
