"""The layering DESIGN promises: kernels/ is the bottom layer (it imports only kernels/ and
third-party packages), no stage imports another stage, and no project module imports itself
back through others (no cycle). Read from the source with ast, so lazy imports count too."""
import ast
import glob
import os

from conftest import ROOT

STAGES = ("probe", "rehearse", "construct", "finetune", "evaluate")


def project_modules():
    """{'probe': path, 'rait.files': path, 'kernels.lora': path, ...}"""
    mods = {}
    for path in glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/rait/*.py") + \
            glob.glob(f"{ROOT}/kernels/*.py"):
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        if not rel.endswith("__init__"):
            mods[rel] = path
    return mods


def imports_of(path, mods):
    """The project modules a file imports (any depth in the file: lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods}
    return out


def graph():
    mods = project_modules()
    return {m: imports_of(p, mods) for m, p in mods.items()}


def test_kernels_import_only_kernels():
    for m, deps in graph().items():
        if m.startswith("kernels."):
            bad = sorted(d for d in deps if not d.startswith("kernels."))
            assert not bad, f"{m} imports {bad}: kernels/ must import only kernels/ and packages"


def test_rait_imports_no_stage():
    for m, deps in graph().items():
        if m.startswith("rait."):
            bad = sorted(d for d in deps if d in STAGES or d in ("pipeline", "world", "data"))
            assert not bad, f"{m} imports {bad}: rait/ sits below the stages"


def test_no_stage_imports_another_stage():
    g = graph()
    for s in STAGES:
        bad = sorted(d for d in g[s] if d in STAGES)
        assert not bad, f"{s}.py imports the stage(s) {bad}: stages talk through files and commands"


def test_no_import_cycle():
    g = graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m, [m])


# Issue 32: rules a reader relies on, checked from the source
def sources():
    """{relative path: source} of every project module, bench/ script and test."""
    paths = sorted(glob.glob(f"{ROOT}/*.py") + glob.glob(f"{ROOT}/rait/*.py") +
                   glob.glob(f"{ROOT}/kernels/*.py") + glob.glob(f"{ROOT}/bench/*.py") +
                   glob.glob(f"{ROOT}/tests/*.py"))
    return {os.path.relpath(p, ROOT): open(p, encoding="utf-8").read() for p in paths}


def test_input_error_has_one_import_path():
    """InputError is defined in kernels/base.py and everyone imports it from there: no
    `files.InputError`, `runs.InputError`, ... and no `from rait.files import InputError`."""
    for rel, src in sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and any(a.name == "InputError" for a in node.names):
                assert node.module == "kernels.base", (
                    f"{rel}:{node.lineno}: import InputError from kernels.base, not {node.module}")
            if isinstance(node, ast.Attribute) and node.attr == "InputError":
                assert isinstance(node.value, ast.Name) and node.value.id == "base", (
                    f"{rel}:{node.lineno}: InputError through another module; import it from "
                    "kernels.base")


def test_runtime_imports_no_test_package():
    """`make all` installs requirements.txt only: the stages, rait/ and kernels/ never import
    pytest, peft or accelerate (tests and bench/ may)."""
    banned = ("pytest", "peft", "accelerate")
    for m, path in project_modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in banned]
            assert not bad, f"{m}:{node.lineno} imports {bad}: a test-only package (requirements-test.txt)"


def test_one_resume_key_for_the_stages_that_resume():
    """probe, evaluate and finetune build their resume keys with runs.resume_key (arguments minus
    named exceptions, plus input digests), and no stage writes a key of its own."""
    for stage in ("probe", "evaluate", "finetune"):
        src = open(os.path.join(ROOT, f"{stage}.py"), encoding="utf-8").read()
        assert "runs.resume_key(" in src, f"{stage}.py: build the resume key with runs.resume_key"
    for stage in STAGES:
        src = open(os.path.join(ROOT, f"{stage}.py"), encoding="utf-8").read()
        assert '{"args": ' not in src and "_actions" not in src, (
            f"{stage}.py builds a resume key by hand; use runs.resume_key")


def test_resume_key_covers_arguments_but_the_exceptions_and_inputs(tmp_path):
    import argparse
    from rait import runs
    f = tmp_path / "items.jsonl"
    f.write_text("{}\n")
    a = argparse.Namespace(out="x", lr=1.0, items=str(f))
    k = runs.resume_key(a, exclude=("out",), inputs=(("items", str(f)),))
    assert runs.resume_key(argparse.Namespace(out="y", lr=1.0, items=str(f)), exclude=("out",),
                           inputs=(("items", str(f)),)) == k, "an excluded argument changed the key"
    assert runs.resume_key(argparse.Namespace(out="x", lr=2.0, items=str(f)), exclude=("out",),
                           inputs=(("items", str(f)),)) != k, "an argument did not change the key"
    f.write_text("{ }\n")
    assert runs.resume_key(a, exclude=("out",), inputs=(("items", str(f)),)) != k, (
        "the input's contents did not change the key")


STAGE_FILES = [os.path.join(ROOT, f"{s}.py") for s in STAGES]
MAX_LINES = 70          # issue 32: a function of a stage reads in one sitting
MAX_POSITIONAL = 6      # issue 32: "about 5"; more arguments go by keyword


def test_stage_functions_are_short():
    for path in STAGE_FILES:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= MAX_LINES, (f"{os.path.basename(path)}:{node.lineno} {node.name} is "
                                        f"{n} lines (at most {MAX_LINES}): move plumbing out")


def test_stage_calls_name_their_arguments():
    for path in STAGE_FILES:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL:
                raise AssertionError(f"{os.path.basename(path)}:{node.lineno} "
                                     f"{ast.unparse(node.func)}(...) takes {len(node.args)} "
                                     f"positional arguments (at most {MAX_POSITIONAL}): use keywords")
