"""The gradient-flow engine. Its modules, in the order a run uses them:

_options       FlowOptions (every option, its default, its validation) and the static config
_engine        gradient_flow, gradient_flow_batch: the chain of stages for the chosen solver
_pipeline      the stages compiled as separate programs, the later ones while the first runs
_phase1        phase 1: the seed's clock tau to t0 (Dormand-Prince 5(4): _dormand_prince)
_asymptotic    the asymptotic chain: phase 1, the stiff stage, the limit flow, the rows
_stiff_stage   Rosenbrock-W steps after t0 (the step: _w_step; its stiff part implicit)
_kinks         ReLU kinks: the Clarke element and the sliding set of a step
_kink_landing  kink crossings landed like events; held pairs projected back onto their kinks
_projectors    projections off the held kinks' gradients
_limit_field   the beta -> infinity limit field (min-norm Clarke element of the minimum margin)
_limit_stage   the limit flow integrated (Dormand-Prince with an active set)
_limit_landing the limit flow's kink landings on the dense output
_limit_flow    limit_flow: the limit flow on its own, to the direction's convergence
_clocks        tau and ln(t L) by quadrature along each step
_stepping      what the integrators share: Outcome, the loop's carry, step control, saves,
               the kink slots of a step sized by the pairs on kinks (loop_by_slots)
_explicit      the reference chain on diffrax's explicit solvers
_fields        the seed's and the polar field (docs/background.md §2)
_sliding       the Filippov velocity on sliding kinks, for phase 1 and the explicit solvers
_kink_geometry per-example margins, gradients and pre-activations of a predictor
_box_qp        the box QP of the Clarke elements
_records, _rows, _solution   saved rows, the status, FlowSolution
"""

from ._engine import gradient_flow as gradient_flow
from ._engine import gradient_flow_batch as gradient_flow_batch
from ._limit_flow import LimitFlowSolution as LimitFlowSolution
from ._limit_flow import limit_flow as limit_flow
from ._options import FlowOptions as FlowOptions
from ._sliding import SlidingOptions as SlidingOptions
from ._solution import FlowSolution as FlowSolution
from ._solution import FlowStatus as FlowStatus
from ._solution import Status as Status
