"""`UserError`: the base of every error caused by the user's input, config, data or disk.

Such an error carries a one-line message that names the key, file:line or path at fault; the
CLI prints it without a traceback and exits with `exit_code` (2 unless the class says otherwise).
JAX-free and import-free, so that every layer (configlib, files, the LLM client, data_gen) can
raise it and the CLI can catch it without importing the modules that define the subclasses.

Not here: the subclasses themselves (each lives beside the code that raises it).
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input the user can fix; the message is one line naming what is wrong and where."""

    exit_code = 2
