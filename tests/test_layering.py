"""The one-way architecture (docs/architecture.md), checked on the source with `ast`:

- imports only run downward through LAYERS (lazy imports inside functions count too);
- only `nemotron_train/distributed/groups.py` reads megatron-core's global `parallel_state`;
- the schema's `Literal` types are the only lists of allowed config values.

Each rule is also shown failing on a planted violation, so a broken checker cannot pass.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from nemotron_train.config import schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nemotron_train", "launch", "data_tools", "bench")

# Top to bottom. A module may import its own layer and any layer below it, never one above.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("front doors", ("nemotron_train.cli", "nemotron_train.__main__", "nemotron_train.commands",
                     "launch", "data_tools", "bench")),
    ("ablation", ("nemotron_train.ablation",)),
    ("training", ("nemotron_train.training",)),
    ("checkpoint / HF interop", ("nemotron_train.checkpoint", "nemotron_train.hf")),
    ("models", ("nemotron_train.models",)),
    ("resolve", ("nemotron_train.resolve",)),
    ("fp8", ("nemotron_train.fp8",)),
    ("data, distributed", ("nemotron_train.data", "nemotron_train.distributed")),
    ("config", ("nemotron_train.config",)),
    ("errors, platform, run directory", ("nemotron_train.errors", "nemotron_train.platform",
                                         "nemotron_train.rundir", "nemotron_train")),
]
# The package itself is the bottom layer, but only as itself: a new `nemotron_train.x` must be placed.
EXACT = {"nemotron_train"}
PARALLEL_STATE_READER = "nemotron_train.distributed.groups"
SCHEMA_MODULE = "nemotron_train.config.schema"


def layer_of(module: str) -> Optional[int]:
    """Index in LAYERS of the longest prefix matching `module`; None if it has no layer."""
    best: Optional[Tuple[int, int]] = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix not in EXACT and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def modules(root: Path) -> Iterator[Tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports(module: str, path: Path, tree: ast.AST) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones made absolute."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # `from pkg import submodule`
                yield f"{name}.{alias.name}", node.lineno


def literal_value_sets() -> Dict[frozenset, str]:
    """Allowed-value sets of every Literal field of the config schema -> the field's name."""
    found: Dict[frozenset, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                found[frozenset(typing.get_args(tp))] = prefix + name
            elif dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")

    walk(schema.Config, "")
    for value in vars(schema).values():  # Literal aliases not (yet) used by a field
        if typing.get_origin(value) is typing.Literal:
            found.setdefault(frozenset(typing.get_args(value)), "a schema Literal")
    return found


def check_tree(root: Path, value_sets: Dict[frozenset, str]) -> List[str]:
    """Every violation of the three rules under `root`, one readable line each."""
    problems: List[str] = []
    for module, path in modules(root):
        where = path.relative_to(root)
        own = layer_of(module)
        if own is None:
            problems.append(f"{where}: module {module} belongs to no layer; add it to LAYERS and docs/architecture.md")
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in imports(module, path, tree):
            if "parallel_state" in name.split(".") and module != PARALLEL_STATE_READER:
                problems.append(f"{where}:{line}: {module} reads megatron-core's parallel_state; "
                                f"only {PARALLEL_STATE_READER} may (take groups as arguments)")
            if name.split(".")[0] not in PACKAGES:
                continue
            target = layer_of(name)
            if target is not None and target < own:
                problems.append(f"{where}:{line}: upward import: {module} ({LAYERS[own][0]}) imports "
                                f"{name} ({LAYERS[target][0]})")
        if module == SCHEMA_MODULE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
                if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                    values = frozenset(e.value for e in node.elts)
                    if values in value_sets:
                        problems.append(f"{where}:{node.lineno}: allowed values of {value_sets[values]} spelled "
                                        f"again; use choices(...) of the schema's Literal")
    return problems


def test_the_tree_has_one_way_imports_one_parallel_state_reader_and_one_list_of_choices() -> None:
    problems = check_tree(ROOT, literal_value_sets())
    assert not problems, "\n".join(problems)


def _plant(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (root / package).mkdir(exist_ok=True)


def test_checker_names_a_planted_upward_import(tmp_path: Path) -> None:
    _plant(tmp_path, {
        "nemotron_train/__init__.py": "",
        "nemotron_train/config/__init__.py": "",
        "nemotron_train/config/validate.py": "def f():\n    from nemotron_train.models.cost import compute_plan\n",
        "nemotron_train/models/__init__.py": "",
        "nemotron_train/models/cost.py": "from nemotron_train.config import validate\n",
        "nemotron_train/training/__init__.py": "from launch.sbatch import render_job\n",
    })
    problems = check_tree(tmp_path, {})
    assert problems == [
        "nemotron_train/config/validate.py:2: upward import: nemotron_train.config.validate (config) imports "
        "nemotron_train.models.cost (models)",
        "nemotron_train/config/validate.py:2: upward import: nemotron_train.config.validate (config) imports "
        "nemotron_train.models.cost.compute_plan (models)",
        "nemotron_train/training/__init__.py:1: upward import: nemotron_train.training (training) imports "
        "launch.sbatch (front doors)",
        "nemotron_train/training/__init__.py:1: upward import: nemotron_train.training (training) imports "
        "launch.sbatch.render_job (front doors)",
    ]


def test_checker_names_a_planted_parallel_state_read_and_a_second_list_of_choices(tmp_path: Path) -> None:
    _plant(tmp_path, {
        "nemotron_train/__init__.py": "",
        "nemotron_train/fp8/__init__.py": "from megatron.core import parallel_state\n",
        "nemotron_train/distributed/__init__.py": "",
        "nemotron_train/distributed/groups.py": "from megatron.core import parallel_state\n",
        "nemotron_train/models/specs.py": 'SPECS = ("auto", "te", "local")\nOTHER = ("te", "local")\n',
    })
    problems = check_tree(tmp_path, literal_value_sets())
    assert problems == [
        "nemotron_train/fp8/__init__.py:1: nemotron_train.fp8 reads megatron-core's parallel_state; "
        "only nemotron_train.distributed.groups may (take groups as arguments)",
        "nemotron_train/models/specs.py:1: allowed values of model.spec spelled again; use choices(...) of the "
        "schema's Literal",
    ]


def test_checker_refuses_a_module_without_a_layer(tmp_path: Path) -> None:
    _plant(tmp_path, {"nemotron_train/__init__.py": "", "nemotron_train/extras/x.py": "", "launch/y.py": ""})
    assert check_tree(tmp_path, {}) == [
        "nemotron_train/extras/x.py: module nemotron_train.extras.x belongs to no layer; "
        "add it to LAYERS and docs/architecture.md"
    ]


@pytest.mark.parametrize("module, layer", [
    ("nemotron_train.commands.train", "front doors"),
    ("nemotron_train.cli", "front doors"),
    ("nemotron_train.training.loop", "training"),
    ("nemotron_train.hf.mapping", "checkpoint / HF interop"),
    ("nemotron_train.config.pattern", "config"),
    ("nemotron_train.rundir", "errors, platform, run directory"),
    ("nemotron_train", "errors, platform, run directory"),
])
def test_layer_of_uses_the_longest_prefix(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer


def test_architecture_doc_names_every_layer_folder_and_module() -> None:
    """docs/architecture.md matches the tree: every package folder and top-level module of
    the library, and every tool package, is named there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    names = [f"{p}/" for p in PACKAGES if p != "nemotron_train"]
    lib = ROOT / "nemotron_train"
    names += [f"nemotron_train/{d.name}/" for d in sorted(lib.iterdir()) if (d / "__init__.py").is_file()]
    names += [f"nemotron_train/{f.name}" for f in sorted(lib.glob("*.py")) if f.name not in ("__init__.py", "__main__.py")]
    missing = [name for name in names if name not in doc]
    assert not missing, f"docs/architecture.md does not name {missing}"
