"""Difference target propagation (Lee et al. 2015) with the DRL variant (Meulemans et al. 2020).

``DTPNet`` holds the forward layers ``f_i`` and feedback layers ``g_i``; ``pcfast.dtp.targets``
computes targets and the local losses; ``pcfast.dtp.rule`` is the ``dtp`` training rule
(imported by the trainer's rule registry, not here, so that this package needs no trainer).

Example::

    from pcfast.dtp import DTPNet, feedback_losses, forward_pass

    net = DTPNet((3072, 256, 256, 10))
    fp = forward_pass(net, x, y, eta_hat=0.5)
    loss = sum(fp.losses) + sum(feedback_losses(net, fp.activations, sigma=0.1))
    loss.backward()                      # every layer gets its own local loss's gradient
"""

from pcfast.dtp.net import ACTIVATIONS, BASELINE_SIZES, DTPNet
from pcfast.dtp.targets import (
    FEEDBACK_LOSSES,
    ForwardPass,
    difference_targets,
    feedback_losses,
    forward_pass,
    reconstruction_errors,
)

__all__ = ["ACTIVATIONS", "BASELINE_SIZES", "FEEDBACK_LOSSES", "DTPNet", "ForwardPass",
           "difference_targets", "feedback_losses", "forward_pass", "reconstruction_errors"]
