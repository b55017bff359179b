"""The console's Django management commands, reached as `tracecode console NAME` (console/cli.py
maps NAME's hyphens to the module's underscores) or `tracecode console manage NAME`. Each module
is one command (Django's `Command`); `_common` holds what they share and is no command.

May import: Django, the ledger app and, through it, the project's clients (never the server's
store, API or app)."""
