"""The argparse layers of the commands that are not one module's own: each defines add_arguments(parser) and run(args)."""
