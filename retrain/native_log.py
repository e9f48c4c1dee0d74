"""Native libraries' start-up chatter, kept off the log: the lines no user can act on.

TensorFlow's and LiteRT's C++ code writes straight to file descriptor 2, bypassing Python and the
log-level variables for some lines (absl's "All log messages before absl::InitializeLog()",
"oneDNN custom operations are on", "Created TensorFlow Lite XNNPACK delegate for CPU", and on a
machine with AVX-512 the false alarm "oneDNN supports DT_UINT8 only on platforms with AVX-512").
`filtered_stderr` runs a block with descriptor 2 captured to a file and writes back every line but
those, so a real warning or error still shows, in order, once the block ends.
"""

import contextlib
import os
import sys
import tempfile

CHATTER = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Created TensorFlow Lite XNNPACK delegate for CPU",
    "oneDNN supports DT_UINT8 only on platforms with AVX-512",
)


@contextlib.contextmanager
def filtered_stderr(chatter: tuple[str, ...] = CHATTER):
    """Within the block, native writes to stderr are held back; afterwards every line that is not
    chatter is written to stderr."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(known in line for known in chatter):
                    sys.stderr.write(line)
            sys.stderr.flush()
