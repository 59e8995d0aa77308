"""``python -m trellis``: the ``trellis`` command."""

from trellis.cli import main

main()
