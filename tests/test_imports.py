"""The package's imports run one way, bottom to top, and never in a circle:

    models → diffusion, transport → samplers, editing → sharding, distributed → checkpoint → data
    → port → evaluation → sampling → train → command lines (extract_latents, `python -m` mains)

A module may import modules of its own layer or below. Module-level and function-level imports
of dit_jax modules both count (an import inside a function must be for an optional dependency,
never to hide an upward one). Packages that a branch does not have yet (transport, evaluation)
already have their layer, so that they slot in when merged."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dit_jax"

# Longest prefix wins; a package's __init__ takes the layer of its package.
LAYERS = [
    ("dit_jax.models", 0), ("dit_jax.flops", 0),
    ("dit_jax.diffusion", 1), ("dit_jax.transport", 1),
    ("dit_jax.samplers", 2), ("dit_jax.editing", 2), ("dit_jax", 2),  # the package facade
    ("dit_jax.sharding", 3), ("dit_jax.distributed", 3),
    ("dit_jax.checkpoint", 4),
    ("dit_jax.data", 5),
    ("dit_jax.port", 6),
    ("dit_jax.evaluation", 7),
    ("dit_jax.sampling", 8), ("dit_jax.text_sampling", 8), ("dit_jax.pixart_sampling", 8),
    ("dit_jax.train", 9),
    ("dit_jax.extract_latents", 10), ("dit_jax.port.__main__", 10), ("dit_jax.evaluate", 10),
    ("dit_jax.plan", 10), ("dit_jax.cli", 10), ("dit_jax.extract_text", 10),
]


def layer(module: str) -> int:
    if module.endswith(".__main__"):
        return 10
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The dit_jax modules `path` imports, anywhere in the file (`from dit_jax import x` counts
    as dit_jax.x when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m == "dit_jax" or m.startswith("dit_jax.")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        assert layer(name) >= 0, name


def test_no_import_from_a_higher_layer():
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in graph().items() for d in deps if layer(d) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" → ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_upward_and_circular_imports(tmp_path):
    # The rules above on a made-up pair of modules: they must be able to fail.
    assert layer("dit_jax.sampling") > layer("dit_jax.port") > layer("dit_jax.checkpoint.workdir")
    assert layer("dit_jax.transport.ode") == layer("dit_jax.diffusion.gaussian")
    assert layer("dit_jax.evaluation.fid") == 7
    fake = tmp_path / "dit_jax" / "port"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("def f():\n    from dit_jax.train.loop import train\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "dit_jax"
    try:
        assert imports(fake / "x.py", {"dit_jax.train.loop"}) == {"dit_jax.train.loop"}
    finally:
        PACKAGE = saved
