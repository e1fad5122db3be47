"""The ``editkit`` subcommands: one module each, registered by ``editkit.cli``.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``run`` (a function of
the parsed arguments returning an exit code) as the parser's default.
"""
