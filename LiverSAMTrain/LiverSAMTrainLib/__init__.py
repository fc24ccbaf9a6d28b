"""LiverSAMTrain's Slicer helpers: MRML-only training logic and the background-process wrapper (no Qt)."""
