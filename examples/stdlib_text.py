"""Real English text that ships with Python: the docstrings of standard-library modules (no download)."""

from __future__ import annotations

import importlib
import re

_MODULES = """
abc argparse base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal difflib
email enum fractions functools gettext glob gzip hashlib heapq hmac html http inspect io ipaddress
itertools json logging mailbox mimetypes numbers operator optparse os pathlib pickle pprint queue
random re sched secrets selectors shelve shlex shutil signal smtplib socket statistics string
struct subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback types typing
unittest urllib uuid warnings weakref zipfile
""".split()


def load_text() -> str:
    """English prose shipped with Python: module docstrings of the standard library."""
    docs = [importlib.import_module(name).__doc__ or "" for name in _MODULES]
    return "\n".join(d for d in docs if d)


def load_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """The docstrings split into sentences of a reasonable length, deduplicated, in a fixed order."""
    seen, sentences = set(), []
    for raw in re.split(r"(?<=[.!?])\s+", " ".join(load_text().split())):
        words = raw.split()
        if min_words <= len(words) <= max_words and raw not in seen:
            seen.add(raw)
            sentences.append(raw)
    return sentences
