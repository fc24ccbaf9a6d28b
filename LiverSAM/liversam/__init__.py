"""LiverSAM core: liver and liver-tumour segmentation in CT with Segment Anything models.

This package never imports Slicer, Qt, ctk or vtk. Nothing runs at import time: models are
loaded only when asked for, and nothing is ever downloaded implicitly.
"""

__version__ = "0.1.0"
