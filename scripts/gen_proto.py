"""Regenerate the protobuf/gRPC modules in splitmirror/v1 from proto/.

``--check`` regenerates into a temporary folder and exits non-zero when the
committed modules differ (stale).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path("splitmirror") / "v1"


def generate(out: Path) -> list[Path]:
    sources = sorted((PROTO_DIR / PACKAGE_DIR).glob("*.proto"))
    # The mypy-protobuf plugins sit next to this Python (the virtualenv's
    # bin/), which need not be on PATH.
    bindir = Path(sys.executable).parent
    plugins = [f"--plugin=protoc-gen-{name}={bindir / f'protoc-gen-{name}'}" for name in ("mypy", "mypy_grpc")
               if (bindir / f"protoc-gen-{name}").exists()]
    args = [
        "grpc_tools.protoc",
        *plugins,
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s.relative_to(PROTO_DIR)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in (out / PACKAGE_DIR).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        stale = [f for f in files if not (ROOT / f).exists() or not filecmp.cmp(out / f, ROOT / f, shallow=False)]
        if opts.check:
            for f in stale:
                print(f"stale generated module: {f} (run `make proto`)", file=sys.stderr)
            return 1 if stale else 0
        for f in files:
            shutil.copyfile(out / f, ROOT / f)
            print(f"generated {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
