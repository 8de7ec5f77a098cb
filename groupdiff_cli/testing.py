"""Tiny random stand-ins for pretrained components, for tests and benchmarks.

Nothing can be downloaded in CI, so every pretrained component is exercised through
the same loading code users take, with randomly initialised weights written to a
file. Numbers computed with these weights mean nothing beyond "the code path works".
"""

from __future__ import annotations

import torch

from groupdiff_cli.evaluation.inception import fidelity_skeleton
from groupdiff_cli.plumbing.seeds import seed_initialisation


def write_random_inception_weights(path, seed: int = 0) -> str:
    """Write a randomly initialised torch-fidelity Inception state dict to ``path``.

    With PyTorch's default init the features collapse (every FID ~0), so the
    convolutions are re-initialised with ``kaiming_normal_`` and the logits layer with
    a wide normal, which gives distinguishable features for different images.
    """
    seed_initialisation(seed)
    net = fidelity_skeleton()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    torch.save(net.state_dict(), path)
    return str(path)
