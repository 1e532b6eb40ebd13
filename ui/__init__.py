"""The web app's tabs, one module each: a class of module-level handlers (each a named API endpoint, testable
without a server) and a ``render`` function that lays the tab out and wires its events. ``app.py`` puts the
tabs on one page. Every handler reaches the model and the library only through ``m3bind.workspace.Workspace``.
"""
