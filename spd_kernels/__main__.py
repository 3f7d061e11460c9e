"""Command line: ``python -m spd_kernels {demo,verify,bench} [...]``."""
from __future__ import annotations

import os
import sys

COMMANDS = ("demo", "verify", "bench")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m spd_kernels {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        # No GPU: run the real Triton kernels under the interpreter. Triton reads
        # this when a kernel is first defined, so it is set before that import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as verify_main

        return verify_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
