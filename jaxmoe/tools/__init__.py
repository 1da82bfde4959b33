"""The command-line tools behind ``python -m jaxmoe``: ``check``, ``bench``, ``tune``."""
