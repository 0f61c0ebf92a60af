"""The import rules of docs/design.md ("Layers"), checked statically on the source tree.

No jaxdiff code runs here: every module under jaxdiff/ is parsed with ``ast``.
"""
import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PKG = os.path.join(ROOT, "jaxdiff")

# First matching prefix wins (longest prefixes first). docs/design.md, "Layers".
LAYERS = (
    ("jaxdiff.cli", 4), ("jaxdiff.app", 4), ("jaxdiff.sampling", 3), ("jaxdiff.dit_sampling", 3),
    ("jaxdiff.guided_sampling", 3), ("jaxdiff.clip_guidance", 3),
    ("jaxdiff.gligen_sampling", 3), ("jaxdiff.control", 3),
    ("jaxdiff.editing", 3),
    ("jaxdiff.training", 3), ("jaxdiff.eval", 3), ("jaxdiff.adapters", 2),
    ("jaxdiff.pipeline", 1), ("jaxdiff.denoiser", 1), ("jaxdiff.guidance", 1),
    ("jaxdiff.weights", 1),
    ("jaxdiff.models", 0), ("jaxdiff.schedules", 0), ("jaxdiff.samplers", 0),
    ("jaxdiff.parallel", 0), ("jaxdiff.data", 0),
)


def _modules():
    mods = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _layer(mod):
    for prefix, layer in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return layer
    return None


def _imports(mod, path):
    """(target module, imported name, line, top_level) for every jaxdiff import."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    guarded = {id(n) for t in tree.body if isinstance(t, (ast.If, ast.Try)) for n in ast.walk(t)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            pairs = [(base, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            pairs = [(a.name, None) for a in node.names]
        else:
            continue
        for base, name in pairs:
            if not base.startswith("jaxdiff"):
                continue
            target = f"{base}.{name}" if f"{base}.{name}" in MODULES else base
            out.append((target, name, node.lineno, id(node) in top or id(node) in guarded))
    return out


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "jaxdiff" and _layer(m) is None] == []


def test_imports_go_downward_only():
    upward = []
    for mod, path in MODULES.items():
        if mod == "jaxdiff" or mod.startswith("jaxdiff.cli"):
            continue
        for target, _, line, _ in _imports(mod, path):
            if target == "jaxdiff" or target.startswith("jaxdiff.cli"):
                upward.append(f"{path}:{line} imports {target}")
            elif _layer(target) is not None and _layer(target) > _layer(mod):
                upward.append(f"{path}:{line} ({_layer(mod)}) imports {target} "
                              f"({_layer(target)})")
    assert upward == []


# The one allowed function-local import: ``jaxdiff serve`` imports the Gradio app (the
# optional ``app`` extra) only when it runs, so other commands do not import gradio.
OPTIONAL_EXTRA_IMPORTS = {("jaxdiff.cli.serve", "jaxdiff.app.ui")}


def test_no_function_local_jaxdiff_imports():
    local = [f"{path}:{line} -> {target}" for mod, path in MODULES.items()
             for target, _, line, top in _imports(mod, path)
             if not top and (mod, target) not in OPTIONAL_EXTRA_IMPORTS]
    assert local == []


def test_gradio_only_in_the_app_ui():
    """Only the app's UI modules import gradio (the optional extra), never at the top of a
    module every command loads."""
    ui = {"jaxdiff.app.ui", "jaxdiff.app.generate_tab", "jaxdiff.app.edit_tab",
          "jaxdiff.app.personalize_tab"}
    users = {mod for mod, path in MODULES.items()
             if re.search(r"^\s*(import gradio|from gradio)", open(path).read(), re.M)}
    assert users <= ui, users - ui


def test_no_private_names_across_modules():
    private = [f"{path}:{line} {name} from {target}" for mod, path in MODULES.items()
               for target, name, line, _ in _imports(mod, path)
               if name and name.startswith("_") and not name.startswith("__") and target != mod]
    assert private == []


def test_no_import_cycles():
    edges = {m: {t for t, _, _, _ in _imports(m, p) if t in MODULES and t != m
                 and not (p.endswith("__init__.py") and t.startswith(m + "."))}
             for m, p in MODULES.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("folder", ["jaxdiff", "train", "edit", "configs", "bench", "tests"])
def test_doc_references_point_inside_the_repository(folder):
    """Every ``*.md`` / ``docs/...`` file a source file names exists in the repository."""
    missing = []
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if not f.endswith(".py"):
                continue
            text = open(os.path.join(d, f)).read()
            if "DESIGN " + "contract" in text:  # the old notes' numbering, not in the repository
                missing.append(f"{f}: numbered design contract")
            for ref in set(re.findall(r"\b([A-Z][A-Z_]+\.md|docs/[a-z_]+\.md)\b", text)):
                if not os.path.exists(os.path.join(ROOT, ref)):
                    missing.append(f"{os.path.join(d, f)}: {ref}")
    assert missing == []
