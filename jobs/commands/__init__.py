"""One module per ``dhrcnn`` subcommand; each defines ``add_arguments(parser)`` and ``run(args) -> int``."""
