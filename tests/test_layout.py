"""The module layout's promises: no import circle among oodray's modules, imports inside functions only where they
defer a heavy library, and the public names of earlier layouts still importable from where they used to live."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "oodray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.ImportFrom, known: set[str]) -> set[str]:
    """The oodray modules an import statement loads: the module, its parent packages, and submodules it names."""
    out = set()
    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return out & known


def _executed(tree: ast.AST, top_level_only: bool):
    """The statements that run: `if TYPE_CHECKING:` blocks (annotations only) are skipped."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        if not top_level_only:
            yield from _executed(node, top_level_only)


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in mods.items():
        deps: set[str] = set()
        for node in _executed(tree, top_level_only):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oodray"):
                deps |= _imported(node, set(mods))
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return found


def test_no_import_circle_among_oodray_modules():
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_circle_even_through_imports_inside_functions():
    """A function-local import hides a circle from Python, not from the reader: there must be none either."""
    graph = _graph(top_level_only=False)
    # config resolves dataset names through data only when called (data imports config for annotations only)
    assert _cycles(graph) == []


def test_function_local_imports_of_oodray_are_the_listed_deferrals():
    """Inside functions, oodray modules are imported only to defer torch (reading a config must not import it)."""
    local = set()
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oodray"):
                        local.add((name, node.module))
    assert local == {("oodray.config.resolve", "oodray.data"), ("oodray.config.resolve", "oodray.io"),
                     ("oodray.config.keys", "oodray.data")}  # keys: is the dataset in memory (its root no key)?


# ConfigSpace: also optional (the bohb extra), imported only when tune.scheduler=bohb
HEAVY = ("ray", "torch", "torchvision", "sklearn", "matplotlib", "pyarrow", "optuna", "tqdm", "pandas", "ConfigSpace")


def test_other_imports_inside_functions_defer_a_heavy_library():
    """Imports inside functions are kept for heavy libraries, which a module imports only when it needs them."""
    light = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                    light += [(name, m) for m in mods if not m.startswith("oodray") and m.split(".")[0] not in HEAVY]
    assert light == []


def test_reading_a_config_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import oodray.config as c; c.resolve_config; c.ExperimentConfig.from_dict({}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("module, names", [
    ("oodray.train", ["init_ray", "pin_ray_address", "load_translator_checkpoint", "load_defended", "attack_specs",
                      "proxy_metrics", "config_hash", "storage_uri", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT",
                      "fit_translator", "prepare_run", "train_step", "PairedImages", "main"]),
    ("oodray.evaluate", ["run_evaluation", "block_size", "shard_ranges", "attack_shard", "is_stochastic",
                         "build_defended", "shift_accuracies", "sanity_checks", "summary_tables", "main",
                         "EvaluationFailed", "RESULT_FORMAT", "BASELINES", "TARGETS"]),
    ("oodray.attacks", ["ATTACKS", "NORMS", "AUTOATTACK_VERSIONS", "AttackSpec", "pgd", "fgsm", "apgd_ce",
                        "mixed_attack", "assign_specs", "run_attack", "autoattack", "autoattack_settings",
                        "validate_eps", "AutoAttackResult"]),
    ("oodray.classifier", ["classifier_key", "classifier_path", "get_classifier", "split_accuracy", "accuracy",
                           "train_classifier", "main"]),
    ("oodray.config", ["ExperimentConfig", "resolve_config", "load_yaml", "parse_override", "save_config",
                       "flatten", "PRESETS", "NORMS", "LOSS_TERMS", "_check_eps"]),
    ("oodray.tune", ["SPACE", "CONDITIONAL", "DefineByRun", "narrowed_space", "trial_overrides", "main"]),
])
def test_public_names_of_the_earlier_layout_still_import(module, names):
    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []


def test_accepted_names_are_defined_once():
    from oodray import attacks, config

    assert attacks.NORMS is config.NORMS
    assert attacks.ATTACKS is config.TRAIN_ATTACKS
    assert attacks.AUTOATTACK_VERSIONS is config.AA_VERSIONS
