"""Tiny random stand-ins for pretrained components, for tests, benchmarks and the demo.

Nothing can be downloaded in CI, so every pretrained component is exercised through
the same loading code users take, with randomly initialised weights written to a
file. Numbers computed with these weights mean nothing beyond "the code path works".
"""

from __future__ import annotations

from unittest import mock

import torch


def write_random_inception_weights(path, seed: int = 0) -> str:
    """Write a randomly initialised torch-fidelity Inception state dict to ``path``.

    With PyTorch's default init the features collapse (every FID ~0), so the
    convolutions are re-initialised with ``kaiming_normal_`` and the logits layer with
    a wide normal, which gives distinguishable features for different images.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    # build the architecture without fetching or loading the real weights
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    torch.save(net.state_dict(), path)
    return str(path)
