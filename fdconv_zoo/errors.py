"""The errors that mean bad input, and how every command reports them.

A checkpoint, a config, an option, a file or the Hub can be wrong; what the library raises for those is one of
``USER_ERRORS`` and its message names the thing (key, shape, file, repo). Anything else is a bug: the commands
(``fdconv-zoo``, ``scripts/finetune.py`` ...) let it keep its traceback. Bad input exits with ``EXIT_BAD_INPUT``,
the code argparse gives a bad flag, so that a caller sees one code for "fix your input".
"""
from __future__ import annotations

import sys

from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError

EXIT_BAD_INPUT = 2


class HubError(RuntimeError):
    """A checkpoint or Hub operation failed; the message names the repo, file or key."""


class CheckpointKeyError(KeyError):
    """A checkpoint's keys do not fit the model or layer; the message names them."""


class OptionError(TypeError):
    """An option that a model or layer does not take; the message names it."""


# a bad option or config, a missing or unreadable file, an unreachable Hub, a checkpoint larger than memory
USER_ERRORS = (HubError, CheckpointKeyError, OptionError, ValueError, OSError, MemoryError, SafetensorError,
               EntryNotFoundError)


def one_line(e: BaseException) -> str:
    """A user error as one line: a KeyError's message without its quotes, and of an error re-raised from a
    DataLoader worker only the original message (not the worker's traceback)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if 'Original Traceback' in text:
        text = text.strip().splitlines()[-1].partition(': ')[2]
    return ' '.join(text.split())


def report(prog: str, e: BaseException, hint: str = '') -> int:
    """Print a user error as ``prog: message`` on stderr; the exit code for it."""
    print(f"{prog}: {one_line(e)}{hint}", file=sys.stderr)
    return EXIT_BAD_INPUT
