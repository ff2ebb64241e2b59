"""The backend switch: env var, context manager, auto resolution, and the package layout."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vlmcore.kernels import _backend

import vlmcore
from vlmcore import kernels

REPO = Path(__file__).resolve().parents[2]


def test_default_is_auto_and_cpu_runs_reference(monkeypatch):
    monkeypatch.delenv("VLMCORE_BACKEND", raising=False)
    assert kernels.get_backend() == "auto"
    assert _backend.use_triton(torch.zeros(1)) is False


@pytest.mark.interpreter
def test_env_var_sets_default(monkeypatch):
    monkeypatch.setenv("VLMCORE_BACKEND", "triton")
    assert kernels.get_backend() == "triton"
    assert _backend.use_triton(torch.zeros(1)) is True  # interpreter is on in tests
    monkeypatch.setenv("VLMCORE_BACKEND", "Reference")
    assert kernels.get_backend() == "reference"


def test_bad_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv("VLMCORE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VLMCORE_BACKEND"):
        kernels.get_backend()


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")
    with kernels.backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.backend("reference"):
            assert kernels.get_backend() == "reference"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "reference"


def test_context_manager_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend name"):
        with kernels.backend("fast"):
            pass


@pytest.mark.interpreter
def test_interpreter_enabled_without_cuda():
    assert _backend.interpreter_enabled()


def test_forcing_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.backend("triton"):
        with pytest.raises(RuntimeError, match="interpreter"):
            _backend.use_triton(torch.zeros(1))


def test_import_names_from_another_directory(tmp_path):
    """The folders map to vlmcore.* import names from anywhere, and no generic name is installed."""
    code = (
        "import vlmcore, vlmcore.kernels, importlib.util as u;"
        "import os;"
        f"assert os.path.samefile(os.path.dirname(vlmcore.kernels.__file__), {str(REPO / 'kernels')!r});"
        "assert u.find_spec('train') is None or 'vlmcore' not in (u.find_spec('train').origin or '');"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_public_api_exports():
    for name in ("contrastive_loss", "masked_cross_attention", "media_index_from_locations",
                 "resampler_attention", "backend", "get_backend"):
        assert callable(getattr(kernels, name)), name
    assert issubclass(vlmcore.ContrastiveLoss, torch.nn.Module)


def test_backend_choice_is_traced_by_torch_compile_and_reguarded():
    """fullgraph compile traces the dispatch, and entering a block recompiles (no stale choice)."""

    def marker(x):
        return x + (1.0 if kernels.get_backend() == "triton" else 0.0)

    compiled = torch.compile(marker, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    with kernels.backend("reference"):
        assert compiled(x).tolist() == [0.0, 0.0]
    with kernels.backend("triton"):
        assert compiled(x).tolist() == [1.0, 1.0]


def _run_from_repo_root(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root: its sys.path begins with '' (the root)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_repo_root_on_sys_path_leaves_pypi_kernels_to_transformers():
    """From the repository root the folder ``kernels/`` is importable as a top-level ``kernels``, the
    name of the PyPI package that transformers >= 5.25 imports from its model modules. That name must
    give the real package (when installed), transformers' model classes must import, and vlmcore's ops
    must be registered once and work in the same process."""
    code = (
        "import os, sys, torch\n"
        "assert os.path.abspath(sys.path[0] or '.') == os.getcwd(), sys.path[:2]\n"
        "import transformers\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "import vlmcore, vlmcore.kernels as vk\n"
        "import kernels\n"
        "assert kernels is not vk\n"
        f"assert not os.path.abspath(kernels.__file__).startswith({str(REPO / 'kernels')!r}), kernels.__file__\n"
        "assert hasattr(kernels, 'CUDAProperties'), dir(kernels)\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.') and 'vlmcore' in str(sys.modules[m])]\n"
        "GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))\n"
        "q = torch.randn(1, 4, 1, 16, device='cuda' if torch.cuda.is_available() else 'cpu')\n"
        "with vk.backend('triton'):\n"
        "    out = vk.resampler_attention(q, q, q, q, q)\n"
        "assert torch.allclose(out, vk.reference.resampler_attention_reference(q, q, q, q, q), atol=1e-5)\n"
        "print('ok')\n"
    )
    try:  # by its distribution: tests/kernels/ (on sys.path via tests/) would satisfy a plain import probe
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI 'kernels' package is not installed here (transformers < 5.25 does not need it)")
    out = _run_from_repo_root(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def test_repo_root_kernels_name_is_missing_without_the_pypi_package():
    """Without a PyPI ``kernels`` anywhere on sys.path, ``import kernels`` from the root fails as a
    missing module (what older transformers expect of an absent optional package), instead of
    handing out vlmcore.kernels under a second name."""
    code = (
        "import os, sys\n"
        "sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'kernels'))\n"
        "               or os.path.abspath(p or '.') == os.getcwd()]\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as e:\n"
        "    assert e.name == 'kernels', e.name\n"
        "    assert 'kernels' not in sys.modules\n"
        "    print('ok')\n"
        "else:\n"
        "    raise SystemExit(f'imported {kernels.__file__}')\n"
    )
    out = _run_from_repo_root(code)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout
    assert "ok" in out.stdout
