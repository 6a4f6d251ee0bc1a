"""The shape the redesigns promised, checked on the source: short functions, a training
loop that knows no stage names (``ofq_jax/stages.py`` alone names them), and narrow
constructors."""

import ast

from support import REPO

PACKAGE = REPO / "ofq_jax"
STAGE_NAMES = {"float", "qat", "cga"}


def test_no_function_longer_than_80_lines():
  long = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
  assert not long, long


def test_the_loop_names_no_stage():
  """No string literal in train.py or step.py is a stage name: nothing branches on one."""
  for name in ("train.py", "step.py"):
    tree = ast.parse((PACKAGE / name).read_text())
    literals = {n.value for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & STAGE_NAMES, (name, literals & STAGE_NAMES)


def test_no_constructor_takes_more_than_7_parameters():
  """Model-wide settings (precision, matmul keys, QKR's form) reach a layer through its
  QuantSpec, not through every constructor on the way down."""
  wide = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef):
        for init in node.body:
          if isinstance(init, ast.FunctionDef) and init.name == "__init__":
            args = init.args
            count = (len(args.posonlyargs) + len(args.args) - 1 + len(args.kwonlyargs)
                     + bool(args.vararg) + bool(args.kwarg))
            if count > 7:
              wide.append(f"{path.relative_to(REPO)}:{init.lineno} {node.name} ({count})")
  assert not wide, wide
