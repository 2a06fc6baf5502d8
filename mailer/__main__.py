"""``python -m mailer``: the same as the ``mailer`` console script."""

from mailer.cli import main

main()
