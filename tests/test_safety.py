"""Safe loading: every torch.load is weights-only, the remote-code files do no I/O at import, and nothing trusts
remote code on the user's behalf."""

import os
import subprocess
import sys
from conftest import REPO


def test_every_torch_load_is_weights_only():
    sources = list((REPO / "modeling_lightclip").rglob("*.py")) + [REPO / "train_lightclip.py"]
    sources += list((REPO / "tests").glob("*.py")) + list((REPO / "benchmarks").glob("*.py"))
    import ast

    calls = 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{path.name}:{node.lineno}")
    assert calls >= 3  # the bank, the packaged EfficientNet weights, the distributed test's tensors


def test_remote_code_files_do_no_io_at_import(tmp_path):
    """Import the remote-code set with sockets and file writes forbidden."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import builtins, socket, sys
def _no_network(*a, **k):
    raise RuntimeError("network access at import")
socket.socket.connect = _no_network
real_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(m in mode for m in "wax+"):
        raise RuntimeError(f"file write at import: {{file}}")
    return real_open(file, mode, *a, **k)
import torch, transformers  # their own imports may write caches; ours may not
builtins.open = _guarded_open
sys.path.insert(0, {str(REPO / "modeling_lightclip")!r})
import importlib.util
for name in ("configuration_lightclip", "objectives_lightclip", "processing_lightclip", "modeling_lightclip"):
    spec = importlib.util.spec_from_file_location("lightclip_remote." + name, {str(REPO / "modeling_lightclip")!r} + "/" + name + ".py",
                                                  submodule_search_locations=None)
import types
package = types.ModuleType("lightclip_remote"); package.__path__ = [{str(REPO / "modeling_lightclip")!r}]
sys.modules["lightclip_remote"] = package
for name in ("configuration_lightclip", "objectives_lightclip", "processing_lightclip", "modeling_lightclip"):
    importlib.import_module("lightclip_remote." + name)
print("ok")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_nothing_trusts_remote_code_on_the_users_behalf():
    """No call in the library passes trust_remote_code=True (usage examples in strings are fine)."""
    import ast

    sources = list((REPO / "modeling_lightclip").rglob("*.py")) + [REPO / "train_lightclip.py"]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), (
                            f"{path.name}:{node.lineno}")
