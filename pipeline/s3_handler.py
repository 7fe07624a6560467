"""A pyarrow ``FileSystemHandler`` around a native ``S3FileSystem`` whose pickle carries no credentials.

``pyarrow.fs.S3FileSystem`` pickles its access key and secret. When credentials are given explicitly (not via
the environment), :func:`pipeline.storage.resolve` wraps the native filesystem in
``PyFileSystem(ExplicitCredentialsS3Handler(config))``: every call is delegated unchanged (files opened are the
native ones, so reads and writes run at native speed), and pickling keeps only the secret-free settings. The
unpickled copy, on a Ray worker for example, rebuilds the native filesystem with credentials from that
process's environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from pipeline.storage import StorageConfig


class ExplicitCredentialsS3Handler(pafs.FileSystemHandler):
    """Delegates to ``build()``'s filesystem, built lazily; pickles as ``config`` without its secrets."""

    def __init__(self, config: StorageConfig, build: Callable[[], pafs.FileSystem] | None = None) -> None:
        self._config = config
        self._build = build or config.build_s3
        self._fs: pafs.FileSystem | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = self._build()
        return self._fs

    def __reduce__(self) -> tuple[type[ExplicitCredentialsS3Handler], tuple[Any, ...]]:
        return (ExplicitCredentialsS3Handler, (self._config.without_secrets(),))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExplicitCredentialsS3Handler):
            return self._config == other._config
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._config)

    def get_type_name(self) -> str:
        return "s3-explicit-credentials"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)
