"""LiverSAM in the browser: a trame-slicer web app that is a client of ``liversam serve``.

Runs in its own environment (trame-slicer needs slicer-core 5.11; see docs/WEB.md). It imports trame,
trame-slicer, VTK, slicer-core, numpy and LiverSAM's stdlib client ``LiverSAMLib.ServerClient``; never torch.
"""

__version__ = "0.1.0"
