"""Install layout: gqn_fast, gqn_fast.kernels and gqn_fast.reference, and no top-level
`kernels` or `reference` (a top-level `kernels` would shadow the package transformers probes for),
and imports that stay light."""

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
import gqn_fast, gqn_fast.kernels, gqn_fast.reference
print(json.dumps({
    "kernels_file": gqn_fast.kernels.__file__,
    "reference_file": gqn_fast.reference.__file__,
    "top_kernels": importlib.util.find_spec("kernels") is not None,
    "top_reference": importlib.util.find_spec("reference") is not None,
}))
"""


def test_installed_names_resolve_to_the_source_folders(tmp_path):
    """The installed package (editable in development and CI) maps the folders to gqn_fast.*."""
    # Run from a neutral folder, so the repository root is not on sys.path.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert Path(found["kernels_file"]).resolve().parent.name == "kernels"
    assert Path(found["reference_file"]).resolve().parent.name == "reference"
    assert not found["top_kernels"] and not found["top_reference"]


def test_wheel_holds_only_gqn_fast(tmp_path):
    """`pip install .` installs the wheel built here: its files must all live under gqn_fast/."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gqn_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"gqn_fast"}
    for module in ["gqn_fast/kernels/__init__.py", "gqn_fast/reference/gqn.py", "gqn_fast/data/__init__.py"]:
        assert module in names


def test_reference_and_config_import_neither_triton_nor_the_fast_model(tmp_path):
    """The oracle imports nothing it judges: gqn_fast.reference and gqn_fast.GQNConfig load
    without Triton, the kernels or the fast model (gqn_fast's top-level names are lazy)."""
    code = (
        "import sys, json\n"
        "import gqn_fast.reference\n"
        "from gqn_fast import GQNConfig\n"
        "GQNConfig()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', "
        "'gqn_fast.model', 'gqn_fast.kernels')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []


# The source folders of the installed names (the package-dir mapping of pyproject.toml).
SOURCE_FOLDERS = {
    "gqn_fast": ROOT / "gqn_fast",
    "gqn_fast.kernels": ROOT / "kernels",
    "gqn_fast.reference": ROOT / "reference",
}


def module_imports() -> dict[str, set[str]]:
    """The project's modules, each with the project modules it imports at module level (not
    inside functions: those run after every module is loaded)."""
    files = {}
    for package, folder in SOURCE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "gqn_fast" and parts and parts[0] in ("kernels", "reference"):
                continue  # the mapped names' own folders
            files[".".join([package, *parts])] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                prefix = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join(prefix + ([node.module] if node.module else []))
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle():
    """A module-level import cycle makes the import order matter (a name is missing when the other
    module is half loaded): none between any of the project's modules."""
    graph = module_imports()
    assert {"gqn_fast.model", "gqn_fast.kernels.gates", "gqn_fast.reference.cores"} <= set(graph)
    assert "gqn_fast.kernels.utils" in graph["gqn_fast.kernels.gates"]  # relative imports are read
    done, cycles = set(), []

    def visit(module, path):
        for target in graph[module]:
            if target in path:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in graph:
        visit(module, [module])
    assert cycles == [], cycles


def test_each_model_kind_and_implementation_builds_its_class():
    import pytest
    import torch

    from gqn_fast.config import GQNConfig
    from gqn_fast.models import CLASSES, IMPLS, model_class

    for kind, classes in CLASSES.items():
        assert set(classes) == set(IMPLS), kind
        config = GQNConfig(model=kind, L=2, z_dim=2, hidden=8, canvas=8, r_dim=16)
        reference, fast = model_class(config, "reference"), model_class(config, "fast")
        assert reference.__module__.startswith("gqn_fast.reference"), kind
        assert issubclass(fast, torch.nn.Module) and fast.__module__.startswith("gqn_fast."), kind
    with pytest.raises(ValueError, match="impl: expected one of"):
        model_class(GQNConfig(), "slow")
    with pytest.raises(ValueError, match="model: expected one of"):
        GQNConfig(model="gqn2")
