"""Platform facts for deployment: which Jetson (or not) this is, what it can run, what fits.

A leaf of the package: it imports nothing of tvswitch outside ``tvswitch.jetson``, so
that the runtime can ask it questions without cycles, and every reader takes a root
folder so that captured copies of real Jetson files stand in for a device in tests.
Modules:

``devices``   the one table of devices and JetPack lines (docs/jetson.md, The device table)
``release``   /etc/nv_tegra_release and the L4T -> JetPack map
``devicetree`` board model, SoC and compute capability from /proc/device-tree
``packages``  CUDA, cuDNN, TensorRT and Python versions from the dpkg database
``memory``    /proc/meminfo, including what NvMap holds for the GPU
``power``     nvpmodel mode and clocks
``platform``  all of the above as one report
``probes``, ``doctor``  what this machine can really run, engine by engine
``plan``      memory, flash and switch-time figures for a bundle on a device
``errors``    ``JetsonInputError``, which the CLI turns into its one-line error
"""
