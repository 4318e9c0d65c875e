"""The `gemma-chat` entry point: choose the BLAS before anything imports MLX, then run the CLI."""


def main():
    from .blas import reexec_with_openblas

    reexec_with_openblas()
    from .cli import main as cli_main

    cli_main()
