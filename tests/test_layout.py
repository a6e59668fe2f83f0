"""The package's shape: decoding commands load no training or corpus code; modules and functions stay small."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import charlm

PACKAGE = Path(charlm.__file__).parent
FORBIDDEN = ("charlm.training", "charlm.data.prepare", "charlm.data.corpus", "charlm.data.sourcetree", "torch.distributed.run")

PROBE = """
import json, sys
from charlm.cli import app
for args in {commands!r}:
    try:
        app(args=args, standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("charlm", "torch.distributed.run")))))
"""


def test_decoding_commands_import_no_training_or_corpus_code(trained):
    ckpt = str(trained / "best.safetensors")
    text = trained.parent / "score.txt"
    text.write_text("the quick brown fox jumps over a lazy dog.\n")
    commands = [
        ["sample", ckpt, "--length", "5", "--seed", "1"],
        ["beam", ckpt, "--length", "5"],
        ["eval", ckpt, "--text", str(text)],
        ["info", ckpt],
    ]
    out = subprocess.run([sys.executable, "-c", PROBE.format(commands=commands)], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "charlm.decoding.beam" in loaded and "charlm.cli.decode" in loaded  # the probe did run the commands
    assert [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)] == []


def sizes() -> tuple[list, list]:
    """(lines, module) for every module; (lines, function) for every function, largest first."""
    modules, functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(PACKAGE.parent))
        modules.append((text.count("\n"), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # The body, from its first line (a docstring counts): a command's signature, one option per line
                # as the formatter lays it out, is its options' declarations, not logic to keep short.
                functions.append((node.end_lineno - node.body[0].lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def test_no_module_over_400_lines_and_no_function_over_60():
    modules, functions = sizes()
    print("largest modules:", modules[:3], "largest functions:", functions[:3])
    assert modules[0][0] <= 400, modules[:3]
    assert functions[0][0] <= 60, functions[:3]
