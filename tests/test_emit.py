"""The generated runtime module: golden file, safety against hostile names, and that its code
computes what the layer computes."""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, ROOT
from memoplan.emit import emit_module
from memoplan.errors import MemoplanError
from memoplan.runtime import load_plan
from memoplan.trace.layers import capture_layer_call, find_repeated_layer
from memoplan.trace.loader import build, load_model_file

GOLDEN = ROOT / "tests" / "golden"
PLAN = GOLDEN / "plan_llama_tiny.json"


def _load_source(source: str, tmp_path: Path, name: str = "runtime_plan"):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_file():
    """Set MEMOPLAN_UPDATE_GOLDEN=1 to rewrite the golden module after an intended change."""
    text = emit_module(load_plan(PLAN))
    golden = GOLDEN / "runtime_plan_llama_tiny.py"
    if os.environ.get("MEMOPLAN_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    assert emit_module(load_plan(PLAN)) == text  # deterministic


def _imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_module_imports_only_torch_and_the_runtime():
    tree = ast.parse(emit_module(load_plan(PLAN)))
    assert _imports(tree) == {"torch", "memoplan.runtime"}


def test_hostile_names_cannot_inject_code(tmp_path):
    plan = load_plan(PLAN)
    evil = 'Evil"""\nimport os\nos.system("touch PWNED")  # \'\'\' \\'
    text = emit_module(dataclasses.replace(plan, layer_class=evil, profile_hash=evil))
    tree = ast.parse(text)
    assert _imports(tree) == {"torch", "memoplan.runtime"}
    top_calls = [n for n in tree.body if isinstance(n, ast.Expr) and not isinstance(n.value, ast.Constant)]
    assert top_calls == []
    mod = _load_source(text, tmp_path)
    assert mod.LAYER_CLASS == evil and not (tmp_path / "PWNED").exists()
    # names and ops that are not plain identifiers / op paths are refused, not rendered
    for field, value in (("name", "x = 1; import os #"), ("target", "os.system('x')#.a.b")):
        nodes = [dict(n) for n in plan.layer.nodes]
        i = next(i for i, n in enumerate(nodes) if n["class"] != "placeholder")
        nodes[i][field] = value
        with pytest.raises(MemoplanError, match="refusing to generate code"):
            emit_module(dataclasses.replace(
                plan, layer=dataclasses.replace(plan.layer, nodes=tuple(nodes))))


def test_generated_forward_graph_and_segments_compute_what_the_layer_computes(tmp_path):
    plan = load_plan(PLAN)
    mod = _load_source(emit_module(plan), tmp_path)
    mf = load_model_file(EXAMPLES / "llama" / "model.py")
    model = build(mf)
    layer = find_repeated_layer(model).first
    args, kwargs = capture_layer_call(mf, model, layer, 96)
    with torch.no_grad():
        expected = layer(*args, **kwargs)
        params = [p for p in layer.parameters()] + [b for b in layer.buffers()]
        values = mod.forward_graph(*params, *args)
    outputs = [n["name"] for n in plan.layer.nodes if n.get("output")]
    assert len(outputs) == 1
    torch.testing.assert_close(values[outputs[0]], expected, rtol=0, atol=0)
    checked = 0
    for seg in plan.layer.segments:
        fn = getattr(mod, f"segment_{seg['id']}")
        env = {**{n["name"]: v for n, v in zip(
            [n for n in plan.layer.nodes if n["class"] == "placeholder" and n["role"] != "grad_out"],
            [*params, *args])}, **values}
        with torch.no_grad():
            got = fn(*(env[i] for i in seg["inputs"]))
        for name, v in zip(seg["outputs"], got):
            torch.testing.assert_close(v, values[name], rtol=0, atol=0)
            checked += 1
    assert checked >= 10


def test_generated_apply_trains_like_plain_training(tmp_path):
    mod = _load_source(emit_module(load_plan(PLAN)), tmp_path)
    mf = load_model_file(EXAMPLES / "llama" / "model.py")
    model = build(mf)
    ref = copy.deepcopy(model)
    mod.apply(model, debug_poison=True)
    tokens, = mf.example_inputs(80)
    model(tokens).pow(2).mean().backward()
    ref(tokens).pow(2).mean().backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_cli_emit_and_solve_emit(cli, tmp_path):
    out = tmp_path / "rt.py"
    r = cli("emit", PLAN, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert out.read_text() == (GOLDEN / "runtime_plan_llama_tiny.py").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "memoplan.plan/2"}))
    r = cli("emit", bad, "-o", tmp_path / "x.py")
    assert r.exit_code == 2 and "malformed" in r.output and not (tmp_path / "x.py").exists()
    profile = ROOT / "examples" / "profiles" / "llama_tiny.json"
    r = cli("solve", profile, "--seq", "8K", "--time-limit", "2", "-o", tmp_path / "p.json",
            "--emit", tmp_path / "p.py", "-q")
    assert r.exit_code == 0, r.output
    ast.parse((tmp_path / "p.py").read_text())
    assert load_plan(tmp_path / "p.json").layer_class == "LlamaBlock"
