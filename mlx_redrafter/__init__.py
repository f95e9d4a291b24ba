"""mlx-redrafter: lossless speculative decoding for mlx-lm models.

Importing this package first routes MLX's CPU BLAS to OpenBLAS on Linux (see
:mod:`mlx_redrafter._blas`); import it before ``mlx.core`` for fast CPU matmuls. On glibc
it also keeps large freed buffers in the heap (:mod:`mlx_redrafter._malloc`).
"""

from mlx_redrafter._blas import ensure_openblas
from mlx_redrafter._malloc import tune_malloc

BLAS = ensure_openblas()
MALLOC_TUNED = tune_malloc()

# isort: split
from mlx_redrafter.cli import DEFAULT_HEAD  # noqa: E402
from mlx_redrafter.drafters import (  # noqa: E402
    CombinedDrafter,
    Draft,
    DraftContext,
    Drafter,
    DraftModelDrafter,
    PromptLookupDrafter,
    ReDrafter,
    SlemDrafter,
    draft_model_drafter,
    load_drafter,
)
from mlx_redrafter.engine import (  # noqa: E402
    GenerationResponse,
    StepStats,
    generate,
    stream_generate,
)
from mlx_redrafter.models import ModelLoadError, load  # noqa: E402
from mlx_redrafter.prompt_cache import (  # noqa: E402
    PromptCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_redrafter.sampling import SamplingParams  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BLAS",
    "CombinedDrafter",
    "DEFAULT_HEAD",
    "Draft",
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "GenerationResponse",
    "ModelLoadError",
    "PromptCache",
    "PromptLookupDrafter",
    "ReDrafter",
    "SamplingParams",
    "SlemDrafter",
    "StepStats",
    "__version__",
    "draft_model_drafter",
    "generate",
    "load",
    "load_drafter",
    "load_prompt_cache",
    "make_prompt_cache",
    "save_prompt_cache",
    "stream_generate",
]
