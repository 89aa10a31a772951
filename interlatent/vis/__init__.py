"""Inspection: query functions (``interlatent.vis.queries``), command-line tools, plots, dashboard."""
