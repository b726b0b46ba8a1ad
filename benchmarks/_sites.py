"""What the site benchmarks share (``native_perturb.py``, ``compiled_site.py``): one site's inputs. Files whose
names start with ``_`` are helpers; ``make benchmarks`` does not run them."""
from __future__ import annotations

import torch

from workbench import MetaPerturb


def site_inputs(shape, forms, phi_grad: bool = False):
    """phi, a channels_last map ``h`` (requires grad), the gradient to send back through the site, and running
    statistics (mean, var) for each form timed, so that no form sees another's updates."""
    torch.manual_seed(0)
    phi = MetaPerturb().requires_grad_(phi_grad)
    c = shape[1]
    h = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    stats = {form: (torch.zeros(c, 4), torch.ones(c, 4)) for form in forms}
    return phi, h, grad, stats
