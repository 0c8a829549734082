"""The ``memoplan`` command line (installed as the package ``memoplan.cli``)."""
