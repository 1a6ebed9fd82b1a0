"""The package's import graph: no module imports one that imports it back (directly or through others, function-level
imports included), library modules never import the command line, and the operators stand alone."""
import ast
import sys

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / 'timm_internimage'


def _module_name(path):
    parts = path.relative_to(REPO_ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _all_imports(path, name):
    """Every module that the module ``name`` (file ``path``) imports, anywhere in its code, as absolute names (for
    ``from m import x`` both ``m`` and ``m.x``, which may be a module)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition('.')[0]
            module = f'{base}.{node.module}' if node.level and node.module else (node.module or base)
            found.update([module] + [f'{module}.{alias.name}' for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _imports(path, name):
    """The package modules that the module ``name`` (file ``path``) imports, anywhere in its code."""
    return {t for t in _all_imports(path, name) if t.startswith('timm_internimage')}


def _graph():
    modules = {_module_name(path): path for path in PACKAGE.rglob('*.py')}
    return {name: {t for t in _imports(path, name) if t in modules and t != name} for name, path in modules.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None. A package's ``__init__`` importing its own submodules
    is not a cycle of interest (``timm_internimage.ops`` -> ``timm_internimage.ops.dcn_v3``): edges from a module
    to its own package are left out."""
    edges = {m: {t for t in targets if not m.startswith(t + '.')} for m, targets in graph.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = 'open'
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 'open':
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 'done'
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_library_modules_do_not_import_the_command_line():
    importers = {m for m, targets in _graph().items() if 'timm_internimage.cli' in targets}
    assert importers <= {'timm_internimage.__main__'}


# The floors of the house, bottom up: a module imports only from its own floor or the floors below.
FLOORS = (
    ('timm_internimage.ops', 'timm_internimage._manifest'),
    ('timm_internimage.pretrained',),
    ('timm_internimage.models',),
    ('timm_internimage',),  # the package root: registers the models, exports the settings
    ('timm_internimage.tools',),
    ('timm_internimage.cli',),
    ('timm_internimage.__main__',),
)


def _floor(module):
    """Index in FLOORS of the longest prefix naming ``module`` (or its package)."""
    best = max((len(prefix), floor) for floor, prefixes in enumerate(FLOORS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + '.'))
    return best[1]


def _upward_imports(graph):
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if _floor(t) > _floor(m) and not m.startswith(t + '.'))


def test_imports_only_run_down_the_floors():
    graph = _graph()
    assert {_floor(m) for m in graph} == set(range(len(FLOORS)))  # every floor is occupied
    assert _upward_imports(graph) == []


def test_the_floor_check_finds_an_upward_import():
    graph = {'timm_internimage.ops.dcn_v3': {'timm_internimage.models.internimage'},
             'timm_internimage.tools.predict': {'timm_internimage.models.internimage'}}
    assert _upward_imports(graph) == [('timm_internimage.ops.dcn_v3', 'timm_internimage.models.internimage')]


def _allowed_in_ops(module):
    """What an operator module may import: the operators, torch, timm's layers and the standard library (never the
    package root, the models or the tools)."""
    top = module.partition('.')[0]
    return (module.startswith('timm_internimage.ops.') or module == 'timm_internimage.ops' or top == 'torch'
            or module == 'timm.layers' or module.startswith('timm.layers.') or top in sys.stdlib_module_names)


def test_the_operators_import_only_operators_torch_timm_layers_and_the_standard_library():
    ops = PACKAGE / 'ops'
    imports = {_module_name(path): _all_imports(path, _module_name(path)) for path in ops.rglob('*.py')}
    assert 'timm_internimage.ops.dcn_v3' in imports
    outside = {name: sorted(m for m in found if not _allowed_in_ops(m)) for name, found in imports.items()}
    assert {name: found for name, found in outside.items() if found} == {}


def test_the_operator_import_rule_rejects_the_package_root_and_the_models():
    assert not _allowed_in_ops('timm_internimage')
    assert not _allowed_in_ops('timm_internimage.internimage')
    assert not _allowed_in_ops('timm_internimage.models.internimage')
    assert not _allowed_in_ops('timm.models')
    assert _allowed_in_ops('timm_internimage.ops.geometry') and _allowed_in_ops('torch.nn.functional')
