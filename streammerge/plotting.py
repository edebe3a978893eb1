"""Charts without pyplot: matplotlib is an optional extra (``pip install 'streammerge[plot]'``),
imported only when a chart is drawn, and a caller's own matplotlib backend is left alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streammerge.errors import MissingExtraError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(**options: Any) -> Figure | None:
    """A figure drawn on its own Agg canvas (``options`` as ``Figure`` takes them), or None where
    matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401 - first: its submodules may be imported already without it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def require_matplotlib(what: str) -> None:
    """Stop with one line naming the extra to install where matplotlib is not installed: called
    before long work whose chart was asked for."""
    try:
        import matplotlib  # noqa: F401 - the optional package
    except ImportError:
        raise MissingExtraError(f"{what} needs matplotlib: pip install 'streammerge[plot]'") from None
