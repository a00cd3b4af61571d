"""hessian-spectra: Hessian spectral analysis of PyTorch models.

Faithful (the true Hessian: exact double-backward / forward-over-reverse HVPs, or shard-local
central finite differences), fast (an HVP costs about two gradients) and scalable (FSDP2).
"""

from .blockdiag import (
    BlockDiagReport,
    BlockRow,
    block_diagonal_test,
    default_blocks,
    layer_blocks,
)
from .density import SpectralDensity, slq
from .estimators import TRACE_METHODS, EigResult, TraceEstimate, top_eigenvalues, trace
from .fd_step import FDAccuracyError, FDError, FDEstimate, default_eps_scale, fit_error_model
from .fisher import EmpiricalFisherOperator
from .ggn import GGNOperator
from .influence import InfluenceResult, influence
from .lanczos import LanczosResult, lanczos
from .linop import DenseOperator, Operator, as_operator
from .objective import Objective
from .operators import HessianOperator
from .per_block import BlockOperator, per_block_slq, select_params
from .plan import Plan, plan_run, recommend_parallel
from .solvers import CGInfo, cg_solve
from .tracker import CurvatureTracker
from .vectors import (
    add,
    axpy,
    clone,
    dot,
    dots,
    lincomb,
    norm,
    random_probe,
    scale,
    sub,
    unit_probe,
    zeros_like,
)

__version__ = "0.1.0"

__all__ = [
    # operators
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "BlockOperator",
    "Objective",
    "DenseOperator",
    "Operator",
    "as_operator",
    "FDError",
    "FDAccuracyError",
    "FDEstimate",
    "fit_error_model",
    "default_eps_scale",
    # vectors
    "dot",
    "dots",
    "norm",
    "axpy",
    "scale",
    "add",
    "sub",
    "lincomb",
    "clone",
    "zeros_like",
    "random_probe",
    "unit_probe",
    # Lanczos and spectra
    "lanczos",
    "LanczosResult",
    "slq",
    "SpectralDensity",
    "top_eigenvalues",
    "EigResult",
    "trace",
    "TraceEstimate",
    "TRACE_METHODS",
    "per_block_slq",
    "select_params",
    # analyses
    "block_diagonal_test",
    "BlockDiagReport",
    "BlockRow",
    "default_blocks",
    "layer_blocks",
    "cg_solve",
    "CGInfo",
    "influence",
    "InfluenceResult",
    # training
    "CurvatureTracker",
    # planning
    "plan_run",
    "Plan",
    "recommend_parallel",
]
