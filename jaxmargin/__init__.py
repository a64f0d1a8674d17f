"""jaxmargin: what gradient flow does to the margin of homogeneous networks, up to t -> infinity.

Importing jaxmargin turns on float64 in JAX (jax_enable_x64): the flows it integrates reach
||w||^L = 1e12 and beyond, where float32 margins and losses are meaningless.
"""

import importlib.metadata

import jax

# float64 is required, not optional: see the module docstring and the README.
jax.config.update("jax_enable_x64", True)

from ._baselines import GDTrajectory as GDTrajectory  # noqa: E402
from ._baselines import gradient_descent as gradient_descent  # noqa: E402
from ._clarke import MinNormPoint as MinNormPoint  # noqa: E402
from ._clarke import autodiff_subgradient as autodiff_subgradient  # noqa: E402
from ._clarke import chain_rule_element as chain_rule_element  # noqa: E402
from ._clarke import euler_identity_residual as euler_identity_residual  # noqa: E402
from ._clarke import lemma4_slack as lemma4_slack  # noqa: E402
from ._clarke import margin_jacobian as margin_jacobian  # noqa: E402
from ._clarke import min_norm_point as min_norm_point  # noqa: E402
from ._clarke import sampled_clarke_subgradients as sampled_clarke_subgradients  # noqa: E402
from ._data import chizat_bach_clusters as chizat_bach_clusters  # noqa: E402
from ._data import digits_pair as digits_pair  # noqa: E402
from ._data import reference_problem as reference_problem  # noqa: E402
from ._flow import FlowOptions as FlowOptions  # noqa: E402
from ._flow import FlowSolution as FlowSolution  # noqa: E402
from ._flow import FlowStatus as FlowStatus  # noqa: E402
from ._flow import LimitFlowSolution as LimitFlowSolution  # noqa: E402
from ._flow import SlidingOptions as SlidingOptions  # noqa: E402
from ._flow import Status as Status  # noqa: E402
from ._flow import gradient_flow as gradient_flow  # noqa: E402
from ._flow import gradient_flow_batch as gradient_flow_batch  # noqa: E402
from ._flow import limit_flow as limit_flow  # noqa: E402
from ._homogeneity import assert_homogeneous as assert_homogeneous  # noqa: E402
from ._homogeneity import estimate_degree as estimate_degree  # noqa: E402
from ._kkt import KKTCertificate as KKTCertificate  # noqa: E402
from ._kkt import alignment as alignment  # noqa: E402
from ._kkt import kkt_certificate as kkt_certificate  # noqa: E402
from ._margins import hard_margin as hard_margin  # noqa: E402
from ._margins import log_loss as log_loss  # noqa: E402
from ._margins import log_norm as log_norm  # noqa: E402
from ._margins import margins as margins  # noqa: E402
from ._margins import normalized_margins as normalized_margins  # noqa: E402
from ._margins import soft_margin as soft_margin  # noqa: E402
from ._predictors import Predictor as Predictor  # noqa: E402
from ._predictors import deep_linear as deep_linear  # noqa: E402
from ._predictors import diagonal_linear as diagonal_linear  # noqa: E402
from ._predictors import kinked_linear as kinked_linear  # noqa: E402
from ._predictors import linear as linear  # noqa: E402
from ._references_linear import MaxMarginSolution as MaxMarginSolution  # noqa: E402
from ._references_linear import l1_max_margin as l1_max_margin  # noqa: E402
from ._references_linear import l1_max_margin_is_unique as l1_max_margin_is_unique  # noqa: E402
from ._references_linear import soudry_dataset as soudry_dataset  # noqa: E402
from ._references_linear import svm_direction as svm_direction  # noqa: E402
from ._relu_nets import leaky_relu_mlp as leaky_relu_mlp  # noqa: E402
from ._relu_nets import relu_cnn as relu_cnn  # noqa: E402
from ._relu_nets import relu_mlp as relu_mlp  # noqa: E402
from ._sweep import sweep_gradient_flow as sweep_gradient_flow  # noqa: E402
from ._user_predictor import predictor as predictor  # noqa: E402

try:
    __version__ = importlib.metadata.version("jaxmargin")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
