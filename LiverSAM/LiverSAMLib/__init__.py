"""LiverSAM's Slicer-side helpers.

``MRMLBridge``, ``SegmentationLogic``, ``InferenceWorker`` and ``DependencyInstaller`` use MRML (and the
standard library) only, so they run under ``slicer-core`` in tests; ``Parameters`` (the parameter node)
needs the Slicer application's ``parameterNodeWrapper`` (Qt). Import the submodules explicitly.
"""
