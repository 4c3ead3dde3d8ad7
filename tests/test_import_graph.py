"""The layers of the package, checked on its source: the library never imports the VTAB application, nothing
imports in a circle (imports inside functions count too), and the command line's settings modules import no torch."""
import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'capaboost_vision'
APPLICATION = 'capaboost_vision.vtab'
ENTRY_ALIASES = {'capaboost_vision.cli'}  # `python -m capaboost_vision.cli` (torchrun): the application's CLI


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path, modules: Set[str]) -> Set[str]:
    """The package modules ``path`` imports anywhere in its body (``from . import x`` names module x)."""
    name = module_name(path)
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def graph() -> Dict[str, Set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def is_application(name: str) -> bool:
    return name == APPLICATION or name.startswith(APPLICATION + '.') or name in ENTRY_ALIASES


def test_the_library_never_imports_the_application():
    edges = graph()
    library = [m for m in edges if not is_application(m)]
    assert 'capaboost_vision.tuner' in library and 'capaboost_vision.vtab.engine' in edges
    upward = {m: sorted(t for t in edges[m] if is_application(t)) for m in library}
    assert {m: t for m, t in upward.items() if t} == {}


def test_no_import_circles():
    edges = graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                pytest.fail('import circle: ' + ' -> '.join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize('module', ['capaboost_vision.config', 'capaboost_vision.vtab.run_config',
                                    'capaboost_vision.vtab.tasks', 'capaboost_vision.vtab.cli',
                                    'capaboost_vision.vtab'])
def test_settings_modules_import_no_torch_at_module_level(module):
    """What the command line needs to parse and validate before torch loads (answers in a fraction of a second)."""
    path = PACKAGE.parent / (module.replace('.', '/') + '.py')
    path = path if path.is_file() else path.with_suffix('') / '__init__.py'
    tree = ast.parse(path.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert not {n for n in names if n.split('.')[0] in ('torch', 'timm', 'peft', 'safetensors')}


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and a planted library -> application import are found."""
    package = tmp_path / 'capaboost_vision'
    (package / 'vtab').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'a.py').write_text('from .b import x\n')
    (package / 'b.py').write_text('def f():\n    from . import a\n')
    (package / 'vtab' / '__init__.py').write_text('')
    (package / 'vtab' / 'engine.py').write_text('')
    (package / 'tuner.py').write_text('from .vtab.engine import train\n')
    monkeypatch.setattr(__import__(__name__), 'PACKAGE', package)
    with pytest.raises(pytest.fail.Exception, match='import circle: capaboost_vision.a -> capaboost_vision.b'):
        test_no_import_circles()
    with pytest.raises(AssertionError):
        test_the_library_never_imports_the_application()
