"""Our kernels/ folder is the package lm.kernels and never answers to the top-level name `kernels`, which is
Hugging Face's distribution (transformers >= 5.25 imports it): both import side by side, from the repository
root (where the folder sits on sys.path) and from anywhere else."""
import subprocess
import sys

from tests.conftest import ROOT

CHECK = ("import kernels, lm.kernels.flash_attention as fa, lm.kernels.layer_norm; "
         "assert getattr(kernels, 'HF', False), kernels.__path__; "
         "assert fa.__file__.startswith({root!r}), fa.__file__; print('ok')")


def _run(code: str, cwd, extra_path: str = ""):
    env_path = f"{ROOT}:{extra_path}" if extra_path else str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})


def test_a_kernels_distribution_installed_beside_us_is_the_one_named_kernels(tmp_path):
    site = tmp_path / "site"  # stands for site-packages holding Hugging Face's `kernels`
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HF = True\n")
    code = CHECK.format(root=str(ROOT / "kernels"))
    for cwd in (ROOT, tmp_path):  # the repository root first on sys.path, and elsewhere
        r = _run(code, cwd, str(site))
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_transformers_imports_from_the_repository_root():
    r = subprocess.run([sys.executable, "-c", "import transformers, transformers.modeling_utils, "
                        "lm.kernels.flash_attention; print(transformers.__version__)"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_module_of_ours_is_named_kernels():
    """Tests and benches put bench/ on sys.path: a bench/kernels.py there shadowed Hugging Face's package."""
    assert not list(ROOT.glob("*/kernels.py")) and not (ROOT / "kernels" / "__init__.py").exists()
