"""LiverSAM's Slicer helpers.

MRML only (run under ``slicer-core`` in tests): ``MRMLBridge`` (nodes <-> core data), ``SegmentationLogic``
(Segment-Editor-consistent writes, undo, export), ``PromptPlacement`` (prompt markups). Standard library +
numpy only: ``ServerClient`` (HTTP client of ``liversam serve``), ``ServerConnection`` (local / remote
server), ``ServerRequests`` (prompts and answers), ``BackgroundCalls`` (the I/O thread),
``SlicerCompatibility`` (minimum version). ``Parameters`` needs the Slicer application
(``parameterNodeWrapper``). Import the submodules explicitly.
"""
