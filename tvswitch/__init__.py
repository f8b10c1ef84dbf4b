"""tvswitch: one pretrained network, many tasks stored as packed task vectors.

The namespace's parts live in the repository's top-level folders:
``tvswitch.export`` (offline: checkpoints -> packed bundle), ``tvswitch.runtime``
(on device: bundle reader, rebuild, engines), ``tvswitch.kernels`` (the decode header,
its CPU build and the CUDA kernels) and ``tvswitch.jetson`` (platform facts).
Importing this package loads none of them, so ``import tvswitch`` stays cheap on a
device that only serves.
"""

__version__ = "0.1.0"
