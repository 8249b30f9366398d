"""Builds the jobd package: compiles the gRPC stubs from the .proto files.

The stubs are generated, never committed: the .proto files under the
repository's ``proto/`` directory are the one source of the wire contract,
and a stub that drifted from them would be a bug nobody could see in review.
``build_py`` runs ``grpc_tools.protoc`` (a build requirement, see
pyproject.toml) into the build directory as ``jobd/v1/`` (the proto package
``jobd.v1`` maps onto the Python package ``jobd.v1`` by itself, so the
generated imports need no rewriting), with ``.pyi`` stubs for type checkers.

Where the protos are: ``JOBD_PROTO_DIR`` if set, else ``../../proto`` from
this file (the repository layout), else ``proto/`` beside this file (an
sdist, which carries a copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_FILES = ("jobd/v1/jobd.proto", "jobd/v1/worker.proto")


def proto_root() -> Path:
    """The directory holding ``jobd/v1/*.proto``."""
    candidates = []
    if os.environ.get("JOBD_PROTO_DIR"):
        candidates.append(Path(os.environ["JOBD_PROTO_DIR"]))
    candidates += [HERE.parent.parent / "proto", HERE / "proto"]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in PROTO_FILES):
            return candidate
    raise SystemExit(
        "jobd: cannot find the .proto files (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); build from the repository checkout (pip install ./client/python) "
        "or set JOBD_PROTO_DIR"
    )


def compile_protos(out: Path) -> None:
    """Generates jobd/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under ``out``."""
    from importlib.resources import files

    from grpc_tools import protoc

    root = proto_root()
    include = str(files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"jobd: protoc failed on {root}")
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update((root / name).read_bytes())
    package = out / "jobd" / "v1"
    (package / "__init__.py").write_text(
        '"""The gRPC stubs generated from proto/jobd/v1 (jobd.proto and worker.proto)\n'
        "when this package was built. Use them for plain gRPC calls; the rest of\n"
        'the jobd package wraps them."""\n\n'
        f'PROTO_SHA256 = "{digest.hexdigest()}"\n'
        '"""SHA-256 of the .proto files these stubs were generated from, in order."""\n'
    )


class BuildPyWithProtos(build_py):
    """build_py that first generates the stubs into the build (or, for an
    editable install, the source) tree."""

    def run(self) -> None:
        target = Path(self.build_lib)
        if getattr(self, "editable_mode", False):
            target = HERE / "src"
        compile_protos(target)
        super().run()

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        # jobd.v1 is generated straight into the build tree: there is
        # nothing of it in src/ to copy (unless an editable build made it).
        if package == "jobd.v1" and not Path(package_dir).is_dir():
            return []
        return super().find_package_modules(package, package_dir)

    def check_package(self, package: str, package_dir: str | None) -> str | None:
        if package == "jobd.v1" and package_dir and not Path(package_dir).is_dir():
            return None
        return super().check_package(package, package_dir)


class SdistWithProtos(sdist):
    """sdist that carries a copy of the .proto files, so it builds alone."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = proto_root()
        for name in PROTO_FILES:
            target = Path(base_dir) / "proto" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target)


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
