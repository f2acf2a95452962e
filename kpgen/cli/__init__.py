"""The ``kpgen`` command line (``main``)."""
