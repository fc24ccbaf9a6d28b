"""Sub-commands of the ``liversam`` command line, one module each (``add_parser`` + ``run``)."""
