"""``python -m chaos``: see :mod:`chaos.cli`."""

from chaos.cli import app

app(prog_name="python -m chaos")
