"""Widgets in the notebooks: a row of controls above figures that follow them, and the same figures without a
frontend.

:func:`show` displays the controls, then every figure ``render(**values)`` returns for the controls' current values.
Each figure is one output whose data holds both the figure (plotly's JSON, as ``display(figure)`` writes it) and a
view of an ``ipywidgets.Output`` showing it: a widget frontend (JupyterLab) draws the Output, which moving a control
refills; a notebook executed headless (papermill: nothing draws widgets) keeps the figure's JSON as its static record,
exactly what the notebook showed before it had controls, and viewers without the widget state show that. Nothing
here computes: ``render`` is a function of :mod:`workbench.explore` or :mod:`workbench.filters`, and these helpers only
build and connect widgets.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import ipywidgets as widgets

from .errors import WorkbenchError

_LAYOUT = dict(width="auto")
_STYLE = {"description_width": "initial"}


def dropdown(options: Sequence[Any], value: Any = None, description: str = "") -> widgets.Dropdown:
    """A dropdown over ``options`` (values, or (label, value) pairs) at ``value`` (None: the first, unless None is
    one of the values); a value not among the options joins them."""
    options = [o if isinstance(o, tuple) else (str(o), o) for o in options]  # (label, value) pairs throughout
    if not options:
        raise WorkbenchError(f"control {description!r} has no options")
    values = [v for _, v in options]
    if value is None and None not in values:
        value = values[0]
    if value not in values:
        options.append((str(value), value))
        values.append(value)
    # by index: a value of None (e.g. "fresh network") would otherwise mean "nothing selected"
    return widgets.Dropdown(options=options, index=values.index(value), description=description, layout=_LAYOUT,
                            style=_STYLE)


def text(value: str, description: str = "") -> widgets.Text:
    """A text field that reports when Enter is pressed or it loses focus."""
    return widgets.Text(value=value, description=description, continuous_update=False, style=_STYLE,
                        layout=widgets.Layout(width="16em"))


def slider(low: float, high: float, step: float, value: float, description: str = "") -> widgets.Widget:
    """An integer slider when every bound is an int, else a float slider; it reports on release, not while dragged."""
    kind = widgets.IntSlider if all(isinstance(v, int) for v in (low, high, step, value)) else widgets.FloatSlider
    return kind(min=low, max=max(high, low), step=step, value=min(max(value, low), max(high, low)),
                description=description, continuous_update=False, style=_STYLE)


def filters(runs: Any, *columns: str) -> dict[str, widgets.Dropdown]:
    """One dropdown per column of a study's run frame (target, arch, method, seed, run), each starting at "all"."""
    from .filters import run_choices

    return {column: dropdown(run_choices(runs, column), description=column) for column in columns}


class Panel:
    """Controls and the figures they select: ``values()`` are the controls' current values, ``figures`` what
    ``render`` returned for them (or the placeholder saying why it could not), ``refresh()`` renders again."""

    def __init__(self, render: Callable[..., Any], controls: Mapping[str, widgets.Widget]):
        self.render = render
        self.controls = dict(controls)
        self.figures: list[Any] = []
        self.error: Optional[str] = None
        self.outputs: list[widgets.Output] = []

    def values(self) -> dict[str, Any]:
        return {name: widget.value for name, widget in self.controls.items()}

    def _figures(self) -> list[Any]:
        result = self.render(**self.values())
        return list(result) if isinstance(result, (list, tuple)) else [result]

    def refresh(self, change: Any = None) -> list[Any]:
        """Render for the current values and refill the shown outputs; a refusal (a WorkbenchError, e.g. a site the
        network does not have) replaces the first figure by a note saying so and keeps the others."""
        from . import plots

        try:
            figures = self._figures()
            self.error = None
        except WorkbenchError as exc:
            self.error = str(exc)
            figures = [plots.empty("This selection cannot be shown", self.error)] + self.figures[1:]
        self.figures = figures
        for output, figure in zip(self.outputs, figures):
            _show_in(output, figure)
        return figures

    def display(self) -> "Panel":
        """Show the controls and the current figures (the first render's errors are raised: the default must work)."""
        self.figures = self._figures()
        self.outputs = [widgets.Output() for _ in self.figures]
        if _shell() is not None:  # outside IPython there is nothing to display to
            from IPython.display import display

            display(widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap")))
            for output, figure in zip(self.outputs, self.figures):
                _show_in(output, figure)
                data, metadata = output.outputs[0]["data"], output.outputs[0]["metadata"]
                data = {**data, WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": output.model_id}}
                display(data, metadata=metadata, raw=True)
        for widget in self.controls.values():
            widget.observe(self.refresh, names="value")
        return self


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance() if InteractiveShell.initialized() else None


def _show_in(output: widgets.Output, figure: Any) -> None:
    """Make ``output`` show ``figure``: its ``outputs`` state is set directly (no capture of messages, which the
    frontend could receive before it has built the Output widget, and then show outside it)."""
    shell = _shell()
    if shell is None:
        return
    if hasattr(figure, "_repr_mimebundle_"):  # plotly: what its own display publishes (IPython's format() skips
        bundle = figure._repr_mimebundle_()  # objects that display themselves, and plotly's figures do)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    else:
        data, metadata = shell.display_formatter.format(figure)
    output.outputs = ({"output_type": "display_data", "data": dict(data), "metadata": dict(metadata or {})},)


def show(render: Callable[..., Any], **controls: widgets.Widget) -> Panel:
    """Display ``controls`` and the figure(s) ``render(**values)`` returns, re-rendered whenever a control moves."""
    return Panel(render, controls).display()


__all__ = ["Panel", "WIDGET_VIEW", "dropdown", "filters", "show", "slider", "text"]
