"""The commands of `lmforge`, one module per stage: each command a config dataclass of its flags
(:func:`lmforge.config.option` fields, checked in ``__post_init__``) and a ``run(cfg)`` function.

These modules are torch-free at module level (the library is imported inside ``run``), so the
command line builds any parser for nothing. They sit above every library package (a command may
use any of them) and below ``quickstart`` and ``cli.py``; a command module never imports another
stage's command module (ARCHITECTURE.md, "Layers")."""
