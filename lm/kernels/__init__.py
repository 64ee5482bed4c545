"""Our Triton kernels (fused attention, fused LayerNorm/RMSNorm), selected from the model config.

They live in the repository's top-level `kernels/` folder and are imported as `lm.kernels.flash_attention`,
`lm.kernels.layer_norm`: the top-level name `kernels` belongs to Hugging Face's distribution (which
transformers >= 5.25 imports), so that folder has no `__init__.py` and never shadows it. An installed wheel
holds the folder's files here (pyproject's package-dir); in a checkout (editable install, PYTHONPATH=.)
this package's path is the folder itself. The submodules import Triton; this package does not.
"""
from pathlib import Path

_folder = Path(__file__).resolve().parents[2] / "kernels"
if (_folder / "flash_attention.py").is_file():  # a checkout: the kernels are the top-level folder
    __path__ = [str(_folder)]
