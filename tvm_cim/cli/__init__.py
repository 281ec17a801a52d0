"""The command lines: ``tvm-cim`` (``main``) and ``cim-sim`` (``sim``), on one scaffolding
(``common``)."""
