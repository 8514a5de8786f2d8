"""The ``convfactor`` command line: convert, inspect, export, bench, demo, methods.

Exit codes: 0 success; 1 the fidelity check (``--check``) failed its tolerances (files are still
written, the report says so); 2 a user error, printed as one line ``error: ...`` on stderr with
nothing written. Anything else is a bug and keeps its traceback.

Every command first validates what it can without loading the model (paths, output locations,
policy, input shape, ``--arch``), then loads, checks the weights (finite) and the input shape (one
forward pass), and only then does the work. Outputs are written to a hidden staging directory beside
their destination and moved into place together at the end, each with an atomic rename.

Layout: one module per command (``convert``, ``inspect``, ``export``, ``bench``, ``demo``,
``methods``), and beside them what they share: ``parser`` (the sub-commands), ``options`` (option
groups and value types), ``console`` (messages, exit codes), ``source`` (loading the model a command
names), ``checks`` (the user's values), ``outputs`` (checking and staging files), ``measure``
(fidelity, latency, profile) and ``inspect_table`` (the text of ``inspect``). The analyses themselves
are library functions (``convfactor.inspect_model``, ``factorize``, ``check_fidelity``, ...).
"""

from .app import main
from .parser import build_parser

__all__ = ["main", "build_parser"]
