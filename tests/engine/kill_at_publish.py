"""Runs the needlework command line, killed at the moment it would publish a given path.

Usage: python kill_at_publish.py GLOB needlework-arguments...

Every write in needlework goes to a temporary entry that `os.replace` renames into place; this
process dies with `os._exit` (no cleanup runs, as under SIGKILL) when it is about to rename
something onto a path matching GLOB, i.e. with the output fully written under its temporary
name and not yet published: the latest moment a crash can hit a write.
"""

import fnmatch
import os
import sys

KILLED = 137

pattern = sys.argv[1]
rename = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(os.fspath(dst), pattern):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(KILLED)
    return rename(src, dst, *args, **kwargs)


os.replace = replace_or_die

from engine.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
