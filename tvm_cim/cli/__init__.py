"""The command lines on one scaffolding (``common``): ``tvm-cim`` (``main``, with
``compile``, ``run``, ``train``, ``report`` and ``search`` holding its subcommands) and
``cim-sim`` (``sim``)."""
