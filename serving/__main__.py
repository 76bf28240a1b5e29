"""``python -m serving {serve,score} ...``: the serving commands without the rest of the CLI
(the benchmark starts the service this way). ``recpipe serve`` / ``recpipe score`` are the same
handlers. The store is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``<$RECPIPE_HOME or ./workspace>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.cli import add_score_arguments, add_serve_arguments, cmd_score, cmd_serve


@dataclass(frozen=True)
class Store:
    tracking_uri: str

    @classmethod
    def from_env(cls) -> Store:
        """``$RECPIPE_TRACKING_URI`` (as every ``recpipe`` command reads it), else
        ``$MLFLOW_TRACKING_URI``, else the SQLite store of ``$RECPIPE_HOME`` (./workspace)."""
        uri = os.environ.get("RECPIPE_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return cls(uri)
        home = Path(os.environ.get("RECPIPE_HOME") or "workspace").expanduser().resolve()
        return cls(f"sqlite:///{home / 'mlflow.db'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add, handler in (("serve", add_serve_arguments, cmd_serve),
                               ("score", add_score_arguments, cmd_score)):
        sub = commands.add_parser(name)
        add(sub)
        sub.add_argument("--json", action="store_true", help="print a JSON summary last")
        sub.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    try:
        summary = args.handler(args, Store.from_env())
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
