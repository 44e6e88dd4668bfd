"""Command-line subcommands that live in their own modules (each has ``add_parser`` and ``run``)."""
