"""One module per `sowa` command: `add_arguments(parser)` and `run(args) -> exit status`."""
