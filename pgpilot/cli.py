"""The `pgpilot` command: serve, learn, advise, demo. Each subcommand's options live with its module."""
from __future__ import annotations

import sys

USAGE = """usage: pgpilot <command> [options]

commands:
  serve    run the proxy            (pgpilot serve -c config.yaml)
  learn    run the offline learner  (pgpilot learn -c config.yaml --once | --every 10m | --report)
  advise   print advice             (pgpilot advise indexes|partitions|rewrites [--format json|sql|table])
  demo     the whole loop on embedded defaults
  version  print the version

`pgpilot <command> --help` shows a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from proxy.server import main as serve_main
        return serve_main(rest)
    if cmd == "learn":
        from learning.cli import main as learn_main
        return learn_main(rest)
    if cmd == "advise":
        from advisors.cli import main as advise_main
        return advise_main(rest)
    if cmd == "demo":
        from pgpilot.demo import main as demo_main
        return demo_main(rest)
    if cmd in ("version", "--version"):
        from pgpilot import __version__
        print(f"pgpilot {__version__}")
        return 0
    print(f"pgpilot: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
