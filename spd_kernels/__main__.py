"""Command line: ``python -m spd_kernels {demo,verify,bench} [options]``.

``python -m spd_kernels --help`` lists the commands; ``python -m spd_kernels
COMMAND --help`` documents each command's options.
"""
from __future__ import annotations

import os
import sys

#: command -> what it does (the first line of its module's docstring says the same)
COMMANDS = {
    "demo": "robust fine-tuning demo: OOD accuracy at matched ID, AdamSPD against AdamW, WiSE-FT, LP-FT and L2-SP "
            "(the main job)",
    "verify": "check every backend here against the pure-PyTorch reference (exits 1 on a FAIL)",
    "bench": "benchmark report: AdamSPD backends vs AdamW fused/foreach and a compiled SPD",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: python -m spd_kernels COMMAND [options]",
        "",
        "Selective Projection Decay (AdamSPD): demo, verification and benchmarks.",
        "",
        "commands:",
        *(f"  {name:{width}s}  {what}" for name, what in COMMANDS.items()),
        "",
        "python -m spd_kernels COMMAND --help documents a command's options.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"python -m spd_kernels: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        # No GPU: run the real Triton kernels under the interpreter. Triton reads
        # this when a kernel is first defined, so it is set before that import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from .verify import main as run
    elif command == "demo":
        from .demo import main as run
    else:
        from .bench import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
