"""Matplotlib set up once for every figure the library writes (files only, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: servers and CI have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, output: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``output`` atomically (parents created; a reader never sees half a PNG) and
    close it. The suffix names the format; one matplotlib cannot write is one line."""
    import io

    from t2t_vit.errors import T2TViTError
    from t2t_vit.storage import atomic_write

    path = Path(output)
    fmt = path.suffix[1:].lower()
    try:
        supported = fig.canvas.get_supported_filetypes()
        if fmt not in supported:
            raise T2TViTError(f"cannot write a figure as {str(path)!r}: end the name in one of "
                              f"{', '.join('.' + k for k in sorted(supported))}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi)
    finally:
        pyplot().close(fig)
    atomic_write(path, buffer.getvalue())
    return path
