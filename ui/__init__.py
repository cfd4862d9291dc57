"""Front ends over the engine: the Gradio page (ui.page), the A1111-compatible REST API (ui.api)
and the server that serves both on one port (ui.server).

Nothing is imported here, so `import ui.server` for argument parsing stays cheap.
"""
