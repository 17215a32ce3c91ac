"""A .npy file written by appending chunks, for arrays too large to hold in memory while they grow."""

import os
import shutil
from pathlib import Path

import numpy as np


class NpyWriter:
    """Appends 1-d chunks to a raw side file; close() writes the .npy header and streams the data after it.

    The length is unknown until the end and the header comes first, hence the side file; memory use is
    one chunk plus a copy buffer, whatever the array's final size.
    """

    def __init__(self, path, dtype):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self.raw_path = self.path.with_name(self.path.name + ".raw")
        self.raw = open(self.raw_path, "wb")

    def append(self, chunk: np.ndarray) -> None:
        self.raw.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.n += len(chunk)

    def close(self) -> None:
        self.raw.close()
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n,),
        }
        with open(self.path, "wb") as out, open(self.raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 20)
        os.remove(self.raw_path)
