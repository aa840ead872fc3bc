"""``python -m train`` is the ``train`` command (the form torchrun uses: ``torchrun ... -m train run``)."""

from train.cli import main

main()
